"""Order and cut passages by embedding similarity, or by a cross-encoder when one is given."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.base import Compressor
from ragcomp.embeddings import CachedEmbedder, shared_embedder
from ragcomp.models import default_device, resolve_model_path
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage


class Reranker(Compressor):
    """Rerank passages; keep the best `top_n` (all when None) scoring at least `threshold`.

    `cross_encoder` takes any sentence-transformers CrossEncoder (hub id or local path);
    without it, passages are scored by cosine similarity with the cached embedder, so a
    passage seen before is never embedded again.
    """

    name = "rerank"

    def __init__(
        self,
        model: str | CachedEmbedder = "minilm",
        cross_encoder: str | None = None,
        top_n: int | None = None,
        threshold: float | None = None,
        tokenizer: str | TokenCounter | None = None,
        device: str | None = None,
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        if top_n is not None and (not isinstance(top_n, int) or top_n < 0):
            raise ValueError(f"top_n must be an integer >= 0 or None, got {top_n!r}")
        self.model = model if isinstance(model, str) else model.name
        self.cross_encoder = cross_encoder
        self.top_n = top_n
        self.threshold = threshold
        self.device = device
        self._embedder = model if isinstance(model, CachedEmbedder) else None
        self._ce: Any = None
        self._ce_lock = threading.Lock()

    @property
    def embedder(self) -> CachedEmbedder:
        if self._embedder is None:
            self._embedder = shared_embedder(self.model, self.device)
        return self._embedder

    def _cross_encoder(self) -> Any:
        with self._ce_lock:
            if self._ce is None:
                st = require("sentence_transformers", "models")
                self._ce = st.CrossEncoder(
                    resolve_model_path(self.cross_encoder), device=self.device or default_device()
                )
            return self._ce

    def score_batch(self, queries: list[str], passages_per_query: list[list[Passage]]) -> list[np.ndarray]:
        if self.cross_encoder:
            pairs = [(q, p.text) for q, ps in zip(queries, passages_per_query, strict=True) for p in ps]
            ce = self._cross_encoder()
            with self._ce_lock:
                flat = np.asarray(ce.predict(pairs, show_progress_bar=False), dtype=np.float32)
        else:
            qv = self.embedder.embed(queries)
            pv = self.embedder.embed([p.text for ps in passages_per_query for p in ps])
            owner = np.repeat(np.arange(len(queries)), [len(ps) for ps in passages_per_query])
            flat = np.einsum("ij,ij->i", pv, qv[owner]) if len(owner) else np.zeros(0, np.float32)
        out, pos = [], 0
        for ps in passages_per_query:
            out.append(flat[pos : pos + len(ps)])
            pos += len(ps)
        return out

    def _compress_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[Compressed]]:
        results = []
        for ps, scores in zip(passages_per_query, self.score_batch(queries, passages_per_query), strict=True):
            order = np.argsort(-scores, kind="stable")
            items, kept = [], 0
            for i in order:
                s = float(scores[i])
                ok = (self.top_n is None or kept < self.top_n) and (
                    self.threshold is None or s >= self.threshold
                ) and bool(ps[i].text.strip())
                items.append(Compressed.whole(ps[i], s) if ok else Compressed.dropped(ps[i], s))
                kept += ok
            results.append(items)
        return results

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        return self._compress_batch([query], [passages])[0]
