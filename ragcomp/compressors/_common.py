"""Parameter checks shared by the compressors, so every method words its errors the same way."""

from __future__ import annotations

import math
from typing import Any


def check_fraction(name: str, value: Any, low_open: bool = False) -> float:
    """A number in [0, 1] ((0, 1] with `low_open`); bools and NaN are refused."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        return float(value)
    interval = "(0, 1]" if low_open else "[0, 1]"
    raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def check_int(name: str, value: Any, low: int, allow_none: bool = True) -> int | None:
    """An integer >= low (or None when allowed); bools are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        suffix = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {low}{suffix}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
