"""`ragcomp bench NAME`: benchmarks that print a table. Each NAME is a module here with
`add_parser(subparsers)`. A bench imports only its own parts (`kv` its `kv_*`, `pages` its
`pages_docs`, `prune_gpu` its `prune_gpu_profile`), never the other way round, and what several
benches share from common.py, a leaf."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print a table")
    bench_sub = parser.add_subparsers(dest="bench", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(bench_sub)


def standalone_main(prog: str, description: str | None, arguments: Callable[[argparse.ArgumentParser], None],
                    run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """`python -m ragcomp.bench.NAME ...`: a module's own arguments and run, without the ragcomp
    CLI (for machines where only the package folder is on the path, without ragcomp.stores)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(parser)
    return run(parser.parse_args(argv))


def print_table(rows: list[dict[str, object]], title: str | None = None) -> str:
    """Render rows (dicts with the same keys) as a markdown table; print and return it."""
    if not rows:
        text = f"{title or ''}\n(no rows)"
        print(text)
        return text
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)
