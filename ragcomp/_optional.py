"""Lazy imports of optional dependencies with an install hint naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

_PIP_NAMES = {
    "llama_index.core": "llama-index-core",
    "langchain_core": "langchain-core",
    "faiss": "faiss-cpu",
    "redis": "redis",
    "sentence_transformers": "sentence-transformers",
    "transformers": "transformers",
    "torch": "torch",
    "gguf": "gguf",
    "tiktoken": "tiktoken",
    "matplotlib": "matplotlib",
    "peft": "peft",
}


def require(module: str, extra: str) -> ModuleType:
    """Import `module` or raise ImportError saying which ragcomp extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip_name = _PIP_NAMES.get(module, module.split(".")[0])
        raise ImportError(
            f"{module} is needed for this feature: pip install 'ragcomp[{extra}]' "
            f"(or pip install {pip_name})"
        ) from e
