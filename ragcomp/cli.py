"""`ragcomp` command line: demo, eval, kv, bench. Each subcommand lives in its own module
and registers its parser through `add_parser(subparsers)`, so modules stay independent."""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module that defines add_parser(subparsers) and sets func on its parser)
SUBCOMMANDS = [
    ("demo", "ragcomp.demo"),
    ("eval", "ragcomp.eval.cli"),
    ("kv", "ragcomp.kv.cli"),
    ("bench", "ragcomp.bench"),
    ("train", "ragcomp.train.cli"),
    ("methods", "ragcomp.cli"),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the registered compression methods")
    p.set_defaults(func=_methods)


def _methods(args: argparse.Namespace) -> int:
    from ragcomp.registry import available_methods

    for name in available_methods():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragcomp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for _name, module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # that subcommand is not built yet
            raise
        mod.add_parser(sub)
    return parser


def parse_params(pairs: list[str] | None) -> dict[str, object]:
    """KEY=VALUE strings to a dict; values parsed as int, float, bool, None or kept as text."""
    out: dict[str, object] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--param expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key.strip()] = parse_value(raw)
    return out


def parse_value(raw: str) -> object:
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        # Bad input and missing resources end with one readable line, not a traceback.
        print(f"ragcomp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
