"""ragcomp inside RAG frameworks: `ragcomp.integrations.llama_index` and `ragcomp.integrations.langchain`.

Nothing here imports a framework: each submodule imports its own, lazily, and names the extra to
install when it is missing. The helpers below are shared by both submodules.
"""

from __future__ import annotations

from typing import Any

from ragcomp.base import Compressor
from ragcomp.registry import load_compressor
from ragcomp.types import Compressed

# Metadata keys written on every compressed node/document. They describe the compression, not
# the content, so the LlamaIndex integration hides them from the LLM prompt and the embedder.
SPANS_KEY = "ragcomp_spans"
TOKENS_IN_KEY = "ragcomp_tokens_in"
TOKENS_OUT_KEY = "ragcomp_tokens_out"
METHOD_KEY = "ragcomp_method"
SCORE_KEY = "ragcomp_score"
METADATA_KEYS = (SPANS_KEY, TOKENS_IN_KEY, TOKENS_OUT_KEY, METHOD_KEY, SCORE_KEY)

DEFAULT_METHOD = "recomp-extractive"

__all__ = ["DEFAULT_METHOD", "METADATA_KEYS", "build_compressor", "compression_metadata"]


def build_compressor(
    method: str | None, compressor: Compressor | str | None, params: dict[str, Any]
) -> Compressor:
    """The Compressor a wrapper runs: built from a method name and its params, or given as is."""
    if isinstance(compressor, str):  # `compressor="rerank"` reads naturally too
        if method is not None:
            raise ValueError("give either method=... or compressor=..., not both")
        method, compressor = compressor, None
    if compressor is not None:
        if method is not None:
            raise ValueError("give either method=... or compressor=..., not both")
        if params:
            raise TypeError(
                f"parameters {sorted(params)} only apply with method=...; "
                "configure the compressor object itself instead"
            )
        if not isinstance(compressor, Compressor):
            raise TypeError(
                f"compressor must be a ragcomp Compressor or a method name, got {type(compressor).__name__}"
            )
        return compressor
    return load_compressor(method or DEFAULT_METHOD, **params)


def compression_metadata(item: Compressed, compressor: Compressor) -> dict[str, Any]:
    """What one kept passage records about its compression: spans into the ORIGINAL text
    (lists, so the metadata stays JSON-serialisable in docstores), tokens before and after
    with the compressor's tokenizer, the method and its score."""
    counter = compressor.counter
    return {
        SPANS_KEY: [[int(a), int(b)] for a, b in item.spans],
        TOKENS_IN_KEY: counter.count(item.passage.text),
        TOKENS_OUT_KEY: counter.count(item.text) if item.text else 0,
        METHOD_KEY: compressor.name,
        SCORE_KEY: None if item.score is None else float(item.score),
    }
