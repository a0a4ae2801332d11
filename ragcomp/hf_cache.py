"""The KV cache argument of a transformers forward under its name in the installed version.

transformers 5.25 renamed `past_key_values` to `cache` (forward arguments and model outputs); the
old name still works there but warns, and older 5.x releases (the GPU machine runs 5.17) know only
the old one. Every forward that takes or returns a cache goes through these two helpers.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any


@cache
def _takes_cache(forward_owner: type) -> bool:
    try:  # deprecate_kwarg wraps with functools.wraps, so the signature is the real one
        params = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params and "past_key_values" not in params


def cache_arg(model: Any, kv_cache: Any) -> dict[str, Any]:
    """`{name: kv_cache}` for `model(**inputs, **cache_arg(model, kv_cache))`."""
    return {("cache" if _takes_cache(type(model)) else "past_key_values"): kv_cache}


def returned_cache(output: Any) -> Any:
    """The cache a forward returned (`output.cache` in 5.25+, `output.past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None
