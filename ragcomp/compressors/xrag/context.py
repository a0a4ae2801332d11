"""The context xrag hands to a reader: text for any reader, one embedding per document for a local one.

Kept free of torch so the eval runner and the integrations can recognise it without loading models.
A reader that takes embeddings generates through the context (`EmbeddingContext.generate_batch`), so
readers never import the compressor package; the torch side (`model.py`) loads on that call only.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np


class EmbeddingContext(str):
    """A context string that also carries one projected embedding per document.

    The string is the text fallback (what a reader that cannot take embeddings reads, e.g. a
    remote API); `embeddings` is a float32 array (n_docs, hidden) already in the reader LLM's
    input-embedding space; `model` names the LLM the projector was trained for (None: any LLM with
    that hidden size); `fallback` names the text method behind the string.
    """

    embeddings: np.ndarray
    model: str | None
    fallback: str

    def __new__(cls, text: str, embeddings: np.ndarray, model: str | None = None,
                fallback: str = "full text") -> EmbeddingContext:
        self = super().__new__(cls, text)
        arr = np.asarray(embeddings, dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"embeddings must be (n_docs, hidden), got shape {arr.shape}")
        self.embeddings = arr
        self.model = model
        self.fallback = fallback
        return self

    @property
    def n_docs(self) -> int:
        return int(self.embeddings.shape[0])

    def __reduce__(self) -> Any:  # copy/pickle keep the embeddings
        return (EmbeddingContext, (str(self), self.embeddings, self.model, self.fallback))

    @classmethod
    def generate_batch(cls, lm: Any, items: Sequence[tuple[str, EmbeddingContext]], max_new_tokens: int,
                       stop_at_line: bool = False) -> list[str]:
        """Raw greedy generations of `lm` (a `ragcomp.models.CausalLM`) for (question, context) pairs in
        one left-padded batch: the readers' short-answer prompt with one placeholder token per document,
        whose input embedding is the document's projected embedding (new text only, not cleaned)."""
        from ragcomp.compressors.xrag.model import generate_with_embeddings, placeholder_id, reader_prompt_ids

        pid = placeholder_id(lm.tokenizer)
        prompts = [reader_prompt_ids(lm.tokenizer, q, c.n_docs, pid) for q, c in items]
        return generate_with_embeddings(lm, prompts, [c.embeddings for _, c in items], pid, max_new_tokens,
                                        stop_at_line=stop_at_line)


_WARNED: set[tuple[str, str]] = set()
_WARN_LOCK = threading.Lock()


def note_text_fallback(reader: str, context: EmbeddingContext) -> bool:
    """Say once per (reader, fallback) that xrag falls back to text; True when it printed."""
    key = (reader, context.fallback)
    with _WARN_LOCK:
        if key in _WARNED:
            return False
        _WARNED.add(key)
    print(f"ragcomp xrag: reader {reader!r} cannot take document embeddings; "
          f"it reads the text fallback ({context.fallback}) instead", file=sys.stderr, flush=True)
    return True


def reader_takes_embeddings(reader: Any) -> bool:
    return bool(getattr(reader, "accepts_embeddings", False))
