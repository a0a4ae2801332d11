"""Which runs an eval makes: methods x parameter sweeps, each a `RunSpec` with a readable label.

Unknown method names and parameters that no method takes fail here, before anything is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragcomp.registry import compressor_class

BASELINE = "none"  # method name of the uncompressed top-k context
NO_RETRIEVAL = "no-retrieval"  # method name of the closed-book row: the reader gets no context
_SPECIAL = (BASELINE, NO_RETRIEVAL)


@dataclass
class RunSpec:
    """One row of the report: a method with its parameters (and the swept value, if any)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    sweep: tuple[str, Any] | None = None

    @property
    def label(self) -> str:
        if self.method == BASELINE:
            return "none (uncompressed)"
        if self.method == NO_RETRIEVAL:
            return "no retrieval"
        # Every parameter the user set, the swept one last: rows must say what they ran.
        shown = [(k, v) for k, v in self.params.items() if self.sweep is None or k != self.sweep[0]]
        if self.sweep is not None:
            shown.append(self.sweep)
        return " ".join([self.method, *(f"{k}={v}" for k, v in shown)])


SweepSpec = str | tuple[str, Sequence[Any]]


def parse_sweep(spec: SweepSpec | Sequence[SweepSpec] | None) -> list[tuple[str, list[Any]]]:
    """Sweeps from 'KEY=V1,V2,...' strings (values parsed like --param) or (key, values)
    tuples; one spec or a list of them."""
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, (str, tuple)) else list(spec)
    out = []
    for one in specs:
        if isinstance(one, tuple):
            key, values = one[0], list(one[1])
        else:
            from ragcomp.cli import parse_value

            if not isinstance(one, str) or "=" not in one:
                raise ValueError(f"sweep expects KEY=V1,V2,..., got {one!r}")
            key, raw = one.split("=", 1)
            values = [parse_value(v.strip()) for v in raw.split(",") if v.strip()]
        key = key.strip()
        if not key or not values:
            raise ValueError(f"sweep needs a key and at least one value, got {one!r}")
        out.append((key, values))
    return out


def accepts(method: str, key: str) -> bool:
    sig = inspect.signature(compressor_class(method).__init__)
    return key in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _split_key(key: str, methods: Sequence[str]) -> tuple[str | None, str]:
    """'rerank.top_n' -> ('rerank', 'top_n'); a key without a method prefix -> (None, key)."""
    if "." in key:
        prefix, rest = key.split(".", 1)
        if prefix in methods or prefix in _SPECIAL:
            return prefix, rest
        raise ValueError(
            f"parameter {key!r} names method {prefix!r}, which is not among the methods run "
            f"({', '.join(methods)})"
        )
    return None, key


def plan_runs(
    methods: Sequence[str],
    params: Mapping[str, Any] | None = None,
    sweep: SweepSpec | Sequence[SweepSpec] | None = None,
    baseline: bool = False,
    no_retrieval: bool = False,
) -> list[RunSpec]:
    """Expand methods x sweep values into rows, routing parameters to the methods that take them.

    A plain KEY goes to every method that accepts it (an error if none does); METHOD.KEY goes
    to that method only. Sweeps route the same way; a method is swept by at most one key.
    The baseline comes first.
    """
    methods = list(dict.fromkeys(methods))  # de-duplicate, keep order
    if baseline and BASELINE not in methods:
        methods.insert(0, BASELINE)
    if no_retrieval and NO_RETRIEVAL not in methods:
        methods.insert(0, NO_RETRIEVAL)
    if not methods:
        raise ValueError("no method to evaluate: give --method NAME and/or --baseline")
    real = [m for m in methods if m not in _SPECIAL]
    for m in real:
        compressor_class(m)  # unknown names fail here, with a suggestion
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in (params or {}).items():
        target, name = _split_key(key, methods)
        if target in _SPECIAL:
            raise ValueError(f"the {target!r} row takes no parameters (got {key!r})")
        targets = [target] if target else [m for m in real if accepts(m, name)]
        if not targets:
            raise ValueError(f"no method among {', '.join(methods)} accepts parameter {name!r}")
        for m in targets:
            if not accepts(m, name):
                raise ValueError(f"method {m!r} does not accept parameter {name!r}")
            per_method[m][name] = value
    swept: dict[str, tuple[str, list[Any]]] = {}
    for key, values in parse_sweep(sweep):
        target, name = _split_key(key, methods)
        if target in _SPECIAL:
            raise ValueError(f"the {target!r} row cannot be swept")
        if target is not None and not accepts(target, name):
            raise ValueError(f"method {target!r} does not accept sweep key {name!r}")
        targets = [target] if target else [m for m in real if accepts(m, name)]
        if not targets:
            raise ValueError(f"no method among {', '.join(real) or '(none)'} accepts sweep key {name!r}")
        for m in targets:
            if m in swept:
                raise ValueError(f"method {m!r} is swept by both {swept[m][0]!r} and {name!r}; "
                                 "sweep one key per method")
            swept[m] = (name, values)
    runs: list[RunSpec] = []
    for m in methods:
        if m in swept:
            name, values = swept[m]
            runs.extend(RunSpec(m, {**per_method[m], name: v}, (name, v)) for v in values)
        else:
            runs.append(RunSpec(m, per_method[m]))
    return runs
