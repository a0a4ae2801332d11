"""xrag: each retrieved document becomes ONE token for the reader: its retrieval embedding, passed
through a trained projector into the LLM's input-embedding space (xRAG, Cheng et al. 2024).

The document embeddings are the ones retrieval already has, so no encoder pass runs per document at
question time. Where they come from, first hit wins: the passage's own `metadata["embedding"]` (a
framework node that carries its vector), the retriever's vector index by passage id (FAISS:
`vector_index=`), the embedding cache by text hash (`store=`: memory, disk or Redis, keys as
`ragcomp.embeddings.text_key`), and only then the embedder (the vector is written back to the store).
`stats` counts each source.

The result's `context` is an `EmbeddingContext`: a string (the text fallback: the passages' text,
or what `fallback=` method keeps) carrying the projected embeddings. `LocalReader` reads the
embeddings; a reader that cannot (a remote API) reads the string and says so once.
`tokens_out` is the number of documents: one token each.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp.base import Compressor, PassageLike
from ragcomp.compressors.xrag.context import EmbeddingContext, note_text_fallback, reader_takes_embeddings
from ragcomp.embeddings import text_key
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, CompressionResult, Passage, StepStats

EMBEDDING_KEY = "embedding"  # passage metadata key holding a precomputed document vector


@dataclass
class XragCompressed(Compressed):
    """A kept passage with its projected embedding (hidden-size float32 row)."""

    embedding: np.ndarray | None = None


class XragCompressor(Compressor):
    """One projected embedding per passage (the first `top_k`), text fallback for text-only readers."""

    name = "xrag"

    def __init__(
        self,
        projector: str | Path | None = None,
        embedder: str = "minilm",
        vector_index: Any = None,
        store: Any = None,
        top_k: int | None = None,
        encode_missing: bool = True,
        fallback: str | Compressor | None = None,
        lm: str | None = None,
        tokenizer: str | TokenCounter | None = None,
        device: str | None = None,
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        from ragcomp.compressors.xrag.model import load_projector

        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        self.device = device or "cpu"
        self._projector = load_projector(projector, self.device)
        self.projector = str(projector) if projector is not None else "default"
        trained_with = self._projector.info.get("embedder")
        if trained_with and trained_with != embedder:
            raise ValueError(f"the xrag projector was trained on {trained_with!r} embeddings, "
                             f"not {embedder!r}: pass embedder={trained_with!r} or another projector")
        # The index is checked by size only: its embedder may be recorded as a local path.
        if vector_index is not None and getattr(vector_index, "dim", None) not in (
                None, self._projector.retriever_hidden_size):
            raise ValueError(f"vector_index has dim {vector_index.dim} but the xrag projector takes "
                             f"{self._projector.retriever_hidden_size}")
        self.embedder = embedder
        self.top_k = top_k
        self.encode_missing = encode_missing
        self.lm = lm or self._projector.info.get("lm")
        self._index = vector_index
        self._store = store
        self._cached: Any = None  # CachedEmbedder, built on the first miss only
        if isinstance(fallback, str):
            from ragcomp.registry import load_compressor

            fallback = load_compressor(fallback)
        self._fallback = fallback
        self.fallback = "full text" if fallback is None else fallback.name
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def hidden_size(self) -> int:
        return self._projector.hidden_size

    # -- embeddings, reused -------------------------------------------------------------------------
    def document_embeddings(self, passages: Sequence[Passage]) -> np.ndarray:
        """Retrieval embeddings (n, retriever dim) of the passages, from where retrieval left them."""
        dim = self._projector.retriever_hidden_size
        out = np.zeros((len(passages), dim), dtype=np.float32)
        todo = list(range(len(passages)))
        seen: Counter[str] = Counter()

        def put(i: int, vec: Any, source: str) -> None:
            arr = np.asarray(vec, dtype=np.float32).reshape(-1)
            if arr.shape[0] != dim:
                raise ValueError(f"document embedding of passage {passages[i].id!r} ({source}) has size "
                                 f"{arr.shape[0]} but the xrag projector takes {dim}")
            out[i] = arr
            seen[source] += 1

        left = []
        for i in todo:
            vec = passages[i].metadata.get(EMBEDDING_KEY)
            if vec is not None:
                put(i, vec, "metadata")
            else:
                left.append(i)
        if left and self._index is not None:
            hits = [i for i in left if passages[i].id in self._index]
            if hits:
                for i, vec in zip(hits, self._index.vectors([passages[i].id for i in hits]), strict=True):
                    put(i, vec, "index")
            left = [i for i in left if i not in set(hits)]
        store = self._store if self._store is not None else (self._cached.store if self._cached else None)
        if left and store is not None:
            raws = store.get_many([text_key(self.embedder, passages[i].text) for i in left])
            rest = []
            for i, raw in zip(left, raws, strict=True):
                if raw is not None and len(raw) == dim * 4:
                    put(i, np.frombuffer(raw, dtype="<f4"), "store")
                else:
                    rest.append(i)
            left = rest
        if left:
            if not self.encode_missing:
                raise ValueError(f"no stored embedding for passage {passages[left[0]].id!r} and "
                                 "encode_missing=False: give vector_index= or store= holding it")
            vecs = self._encoder().embed([passages[i].text for i in left])  # writes back to the store
            for i, vec in zip(left, vecs, strict=True):
                put(i, vec, "encoded")
        with self._lock:
            self.stats.update(seen)
        return out

    def _encoder(self) -> Any:
        if self._cached is None:
            from ragcomp.embeddings import CachedEmbedder, shared_embedder

            self._cached = (CachedEmbedder(self.embedder, store=self._store, device=self.device)
                            if self._store is not None else shared_embedder(self.embedder, self.device))
        return self._cached

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Retrieval embeddings (n, d) -> LLM input embeddings (n, hidden), float32."""
        from ragcomp.compressors.xrag.model import torch

        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=self.device)
        with self._lock, torch.inference_mode():
            return self._projector(x).float().cpu().numpy()

    # -- the compressor ----------------------------------------------------------------------------
    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        chosen = [p for p in passages if p.text.strip()][: self.top_k]
        keep = {id(p) for p in chosen}
        projected = self.project(self.document_embeddings(chosen)) if chosen else np.zeros((0, 0))
        rows = iter(projected)
        items: list[Compressed] = []
        for p in passages:
            if id(p) in keep:
                items.append(XragCompressed(p, p.text, [(0, len(p.text))], p.score, True, next(rows)))
            else:
                items.append(Compressed.dropped(p, p.score))
        return items

    def _result(self, passages: list[Passage], items: list[Compressed], seconds: float,
                tokens_in: int) -> CompressionResult:
        res = super()._result(passages, items, seconds, tokens_in)
        vecs = [c.embedding for c in items if c.kept and isinstance(c, XragCompressed)]
        matrix = np.stack(vecs) if vecs else np.zeros((0, self.hidden_size), dtype=np.float32)
        res.context = EmbeddingContext(res.context, matrix, self.lm, self.fallback)
        res.tokens_out = len(vecs)  # one token per document
        res.steps = [StepStats(self.name, res.tokens_in, len(vecs), seconds, res.tokenizer)]
        return res

    def compress_batch(self, queries: Sequence[str],
                       passages_per_query: Sequence[Sequence[PassageLike]]) -> list[CompressionResult]:
        results = super().compress_batch(queries, passages_per_query)
        if self._fallback is None:
            return results
        for q, res in zip(queries, results, strict=True):  # the string a text-only reader gets
            text = self._fallback.compress(q, res.passages()).context if res.kept else ""
            ctx = res.context
            res.context = EmbeddingContext(text, ctx.embeddings, ctx.model, ctx.fallback)
        return results


def answer_with_xrag(compressor: XragCompressor, reader: Any, question: str,
                     passages: list[Passage]) -> tuple[str, dict[str, Any]]:
    """Compress to one embedding per passage and read; the text fallback for text-only readers.
    Shared by the LlamaIndex engine and the LangChain runnable."""
    res = compressor.compress(question, passages)
    context = res.context
    embeds = reader_takes_embeddings(reader)
    if isinstance(context, EmbeddingContext) and not embeds:
        note_text_fallback(reader.name, context)
        context = str(context)
    answer = reader.answer(question, context or None) if res.kept else reader.answer(question, None)
    stats = {"documents": len(res.kept), "tokens_in": res.tokens_in,
             "tokens_out": res.tokens_out if embeds else _reader_tokens(reader, context),
             "mode": "embeddings" if embeds else f"text fallback ({compressor.fallback})",
             "seconds_compress": round(res.seconds, 4)}
    return answer or "", stats


def _reader_tokens(reader: Any, text: str) -> int:
    from ragcomp.tokens import get_counter

    return get_counter(reader.tokenizer).count(text) if text else 0
