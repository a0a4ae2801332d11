"""Methods by name: `load_compressor("recomp-extractive", top_k=5)` and the CLI use this."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from ragcomp.base import Compressor

# Built-in methods are imported lazily: naming one must not import every other's deps.
_BUILTIN: dict[str, str] = {
    "rerank": "ragcomp.compressors.rerank:Reranker",
    "recomp-extractive": "ragcomp.compressors.recomp_extractive:RecompExtractive",
    "budget": "ragcomp.base:TokenBudget",
    "provence": "ragcomp.compressors.provence:ProvenceCompressor",
    "exit": "ragcomp.compressors.exit:ExitCompressor",
    "recomp-abstractive": "ragcomp.compressors.recomp_abstractive:RecompAbstractive",
    "lingua": "ragcomp.compressors.lingua:LinguaCompressor",
    "xrag": "ragcomp.compressors.xrag:XragCompressor",
}
_USER: dict[str, type[Compressor]] = {}


def register(name: str):
    """Class decorator: make a Compressor available by name."""

    def deco(cls: type[Compressor]) -> type[Compressor]:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TypeError(f"{cls!r} is not a Compressor subclass")
        _USER[name] = cls
        return cls

    return deco


def register_builtin(name: str, target: str) -> None:
    """Register a lazily imported method, `target` being 'module:Class'."""
    _BUILTIN[name] = target


def available_methods() -> list[str]:
    return sorted(set(_BUILTIN) | set(_USER))


def compressor_class(name: str) -> type[Compressor]:
    if name in _USER:
        return _USER[name]
    if name not in _BUILTIN:
        close = difflib.get_close_matches(name, available_methods(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}.{hint} Available: {', '.join(available_methods())}"
        )
    module, cls = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_compressor(name: str, **params: Any) -> Compressor:
    """Build a registered method with its parameters; unknown parameters are named."""
    cls = compressor_class(name)
    sig = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [p for p in sig.parameters if p not in ("self",)]
    unknown = [k for k in params if k not in allowed]
    if unknown and not accepts_any:
        raise TypeError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {name!r}; "
            f"it accepts: {', '.join(a for a in allowed if sig.parameters[a].kind.name != 'VAR_POSITIONAL')}"
        )
    return cls(**params)
