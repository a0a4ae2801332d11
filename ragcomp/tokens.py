"""Token counting with a named tokenizer, so budgets are honoured for the target LLM."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class WhitespaceCounter:
    """Counts whitespace-separated words; dependency free, used when nothing is named."""

    name = "whitespace"

    def count(self, text: str) -> int:
        return len(text.split())

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        words = text.split()
        if len(words) <= max_tokens:
            return text
        # Keep the original spacing up to the cut.
        pos = 0
        for w in words[:max_tokens]:
            pos = text.index(w, pos) + len(w)
        return text[:pos]


class TiktokenCounter:
    """OpenAI's BPE tokenizers (cl100k_base, o200k_base), offline from llama-index-core's copy."""

    def __init__(self, encoding: str) -> None:
        point_tiktoken_at_offline_files()
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("tiktoken is needed for this tokenizer: pip install tiktoken") from e
        self.name = encoding
        self._enc = tiktoken.get_encoding(encoding)

    def count(self, text: str) -> int:
        return len(self._enc.encode(text, disallowed_special=()))

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        ids = self._enc.encode(text, disallowed_special=())
        return text if len(ids) <= max_tokens else self._enc.decode(ids[:max_tokens])


class HFCounter:
    """Any Hugging Face tokenizer: a model alias from ragcomp.models, a hub id or a local path."""

    def __init__(self, name: str) -> None:
        from ragcomp.models import load_tokenizer

        self.name = name
        self._tok = load_tokenizer(name)
        self._lock = threading.Lock()

    def _ids(self, text: str) -> list[int]:
        with self._lock:  # fast tokenizers are not safe to share across threads
            return self._tok(text, add_special_tokens=False)["input_ids"]

    def count(self, text: str) -> int:
        return len(self._ids(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        with self._lock:
            enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_tokens:
            return text
        return text[: offsets[max_tokens - 1][1]]


_TIKTOKEN_NAMES = {"cl100k": "cl100k_base", "cl100k_base": "cl100k_base",
                   "o200k": "o200k_base", "o200k_base": "o200k_base"}


def point_tiktoken_at_offline_files() -> None:
    """llama-index-core ships tiktoken's files; use them so counting works with no network."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_index.core")
    except (ImportError, ValueError):
        return
    if spec and spec.submodule_search_locations:
        cache = Path(spec.submodule_search_locations[0]) / "_static" / "tiktoken_cache"
        if cache.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


@functools.lru_cache(maxsize=16)
def get_counter(name: str | None = None) -> TokenCounter:
    """A counter by name: `whitespace`, `cl100k`, `o200k`, a model alias, a hub id or a path."""
    if not name or name == "whitespace":
        return WhitespaceCounter()
    if name in _TIKTOKEN_NAMES:
        return TiktokenCounter(_TIKTOKEN_NAMES[name])
    return HFCounter(name)


def counter_from(value: str | TokenCounter | Callable[[str], int] | None) -> TokenCounter:
    """Accept a name, a counter object, or a plain callable text -> int."""
    if value is None or isinstance(value, str):
        return get_counter(value)
    if hasattr(value, "count") and hasattr(value, "name"):
        return value  # type: ignore[return-value]
    if callable(value):
        return _CallableCounter(value)
    raise TypeError(f"tokenizer must be a name, a TokenCounter or a callable, got {value!r}")


class _CallableCounter:
    def __init__(self, fn: Callable[[str], int]) -> None:
        self._fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def count(self, text: str) -> int:
        return int(self._fn(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        words = text.split(" ")
        lo, hi = 0, len(words)
        while lo < hi:  # longest word prefix that fits
            mid = (lo + hi + 1) // 2
            if self.count(" ".join(words[:mid])) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo])
