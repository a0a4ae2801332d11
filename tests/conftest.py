"""Shared fixtures.

Redis: `redis_url` (one real redis-server per test session) and `redis_cluster_urls` (a real
3-node Redis Cluster). Both run on loopback with no persistence; tests share them, so each test
uses its own key prefix. Without a `redis-server` binary the tests that use them are skipped
(or fail when the CI environment variable is set, so CI never silently skips them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

# Tests use only packaged or locally saved weights: never wait on hub retries for a name
# that is meant to be missing. Set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} not found on PATH; install it (Debian: apt-get install redis-server) to run Redis tests"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Model tests run torch on one thread: on shared 2-core machines two OpenMP threads stall
    on each other's barriers when another process holds a core (small forwards ran ~20x slower).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    """The offline SmolLM2 in fp32 on CPU (loaded once per process by load_causal_lm's cache)."""
    from ragcomp.models import load_causal_lm

    try:
        return load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    except (ImportError, OSError) as e:  # pragma: no cover - offline weights missing
        pytest.skip(f"SmolLM2 weights unavailable: {e}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (redis://127.0.0.1:PORT/0) of a real redis-server started for this test session."""
    binary = _require_binary("redis-server")
    from ragcomp.stores.redis import local_redis_server

    with local_redis_server(tmp_path_factory.mktemp("redis"), binary=binary) as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """URLs (redis://127.0.0.1:PORT) of the 3 primaries of a real Redis Cluster on loopback."""
    binary = _require_binary("redis-server")
    cli = _require_binary("redis-cli")
    redis = pytest.importorskip("redis")
    from ragcomp.stores.redis import local_redis_server

    root = tmp_path_factory.mktemp("redis-cluster")
    with ExitStack() as stack:
        urls = [
            stack.enter_context(local_redis_server(root / f"node{i}", cluster=True, binary=binary))
            for i in range(3)
        ]
        nodes = [u.removeprefix("redis://") for u in urls]
        done = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        deadline = time.monotonic() + 30
        clients = [redis.Redis.from_url(u) for u in urls]
        while not all(_cluster_ok(c) for c in clients):
            if time.monotonic() > deadline:
                pytest.fail("Redis Cluster did not reach cluster_state:ok within 30 s")
            time.sleep(0.05)
        for c in clients:
            c.close()
        yield urls


def _cluster_ok(client: object) -> bool:
    # redis-py parses CLUSTER INFO into a dict (or returns the raw text for older versions)
    info = client.execute_command("CLUSTER", "INFO")  # type: ignore[attr-defined]
    if isinstance(info, dict):
        return str(info.get("cluster_state", "")) == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text
