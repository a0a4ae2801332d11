"""One sentence selector for every sentence-level method (recomp-extractive, exit, provence).

A method scores each sentence of each passage; `SentenceSelection` turns those scores into keep
masks with the same rules everywhere, and `kept_items` turns the masks into `Compressed` items with
spans into the original text. The rules, applied in this order:

1. eligible: the score passes `threshold` (`>=`, or `>` when `inclusive=False`; for probability
   scores 0 keeps every sentence and 1 none) and lies within `relative` of the best score;
   a caller may also mark whole passages ineligible (Provence's passage `top_k`).
2. caps: of the eligible sentences only the best `top_k`, `ceil(top_share * n)` (at least one)
   and `max_sentences` are kept, best first.
3. floor: when fewer than `min_sentences` are kept, the best of the rest (of eligible passages)
   are added until the floor is met.
4. `budget_tokens`: the kept sentences, best first, while their text fits; a sentence that does not
   fit is skipped, so a shorter one ranked lower may still fit.

"Best first" is by score, then by the passage's tie-break score (Provence's ranking logit), then in
document order. Every parameter is checked once, here, with a message naming it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ragcomp.compressors._common import check_fraction, check_int
from ragcomp.text import Sentence
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage

ScoreKind = Literal["probability", "similarity"]


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number within [low, high]; bools, strings and NaN are refused."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return float(value)
    bounds = ("" if low is None and high is None
              else f" in [{low}, {high}]" if low is not None and high is not None
              else f" >= {low}" if low is not None else f" <= {high}")
    raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")


@dataclass(frozen=True)
class SentenceSelection:
    """Which sentences to keep, given one score per sentence (see the module docstring)."""

    top_k: int | None = None
    top_share: float | None = None
    threshold: float | None = None
    inclusive: bool = True
    relative: float | None = None
    min_sentences: int = 0
    max_sentences: int | None = None
    budget_tokens: int | None = None
    scores: ScoreKind = "probability"

    def __post_init__(self) -> None:
        check_int("top_k", self.top_k, 0)
        if self.top_share is not None:
            check_fraction("top_share", self.top_share, low_open=True)
        if self.threshold is not None:
            if self.scores == "probability":
                check_fraction("threshold", self.threshold)
            else:
                check_number("threshold", self.threshold)
        if self.relative is not None:
            check_number("relative", self.relative, low=0.0)
        check_int("min_sentences", self.min_sentences, 0, allow_none=False)
        check_int("max_sentences", self.max_sentences, 1)
        check_int("budget_tokens", self.budget_tokens, 0)
        if self.max_sentences is not None and self.min_sentences > self.max_sentences:
            raise ValueError(f"min_sentences ({self.min_sentences}) is above max_sentences "
                             f"({self.max_sentences})")

    # -- masks -----------------------------------------------------------------------------------
    def passes(self, scores: np.ndarray) -> np.ndarray:
        """Rule 1 without `relative`: which scores pass the threshold."""
        t = self.threshold
        if t is None:
            return np.ones(len(scores), dtype=bool)
        if self.scores == "probability":
            if t == 0.0:  # everything, even a probability that underflowed to 0
                return np.ones(len(scores), dtype=bool)
            if t == 1.0:  # nothing, even a probability that rounded up to 1
                return np.zeros(len(scores), dtype=bool)
        return scores >= t if self.inclusive else scores > t

    def select(self, scores: Sequence[np.ndarray], tie_break: Sequence[float] | None = None,
               eligible_passages: Sequence[bool] | None = None,
               eligible: Sequence[np.ndarray] | None = None,
               sentence_texts: Sequence[Sequence[str]] | None = None,
               counter: TokenCounter | None = None) -> list[np.ndarray]:
        """Keep masks, one per passage, for per-sentence `scores` (one array per passage).

        `eligible` replaces rule 1 with the caller's own masks (a method with extra rules, such as
        Provence's title rule, builds them from `passes`), which become the result: they are
        written in place; `eligible_passages` rules passages out
        of every step; `sentence_texts` and `counter` are needed for `budget_tokens`.
        """
        n_pass = len(scores)
        if eligible_passages is None:
            eligible_passages = [True] * n_pass
        masks = []
        for pi, s in enumerate(scores):
            s = np.asarray(s)
            if not eligible_passages[pi]:
                masks.append(np.zeros(len(s), dtype=bool))
            elif eligible is not None:
                masks.append(np.asarray(eligible[pi], dtype=bool))  # the caller's own, written in place
            else:
                masks.append(self.passes(s))
        if eligible is None and self.relative is not None:
            live = [np.asarray(s) for pi, s in enumerate(scores) if eligible_passages[pi] and len(s)]
            if live:
                best = max(float(s.max()) for s in live)
                for pi, s in enumerate(scores):
                    masks[pi] &= np.asarray(s) >= best - self.relative
        if (self.top_k is None and self.top_share is None and self.max_sentences is None
                and self.min_sentences == 0 and self.budget_tokens is None):
            return masks  # the common default: no ranking needed
        ranked = _rank(scores, tie_break, eligible_passages)
        kept = [(pi, si) for pi, si in ranked if masks[pi][si]]
        n_all = sum(len(s) for s in scores)
        caps = [c for c in (self.top_k, self.max_sentences) if c is not None]
        if self.top_share is not None and n_all:
            caps.append(max(1, math.ceil(self.top_share * n_all - 1e-9)))
        if caps and len(kept) > min(caps):
            for pi, si in kept[min(caps):]:
                masks[pi][si] = False
            kept = kept[: min(caps)]
        if len(kept) < self.min_sentences:
            spare = [(pi, si) for pi, si in ranked if not masks[pi][si]]
            for pi, si in spare[: self.min_sentences - len(kept)]:
                masks[pi][si] = True
            kept = [(pi, si) for pi, si in ranked if masks[pi][si]]
        if self.budget_tokens is not None:
            if sentence_texts is None or counter is None:
                raise ValueError("budget_tokens needs the sentence texts and a token counter")
            used = 0
            for pi, si in kept:
                cost = counter.count(sentence_texts[pi][si])
                if used + cost > self.budget_tokens:
                    masks[pi][si] = False  # a shorter, lower-ranked sentence may still fit
                else:
                    used += cost
        return masks


def _rank(scores: Sequence[np.ndarray], tie_break: Sequence[float] | None,
          eligible_passages: Sequence[bool]) -> list[tuple[int, int]]:
    """Sentences of eligible passages, best first: score, then tie-break, then document order."""
    rows = [(pi, si) for pi, s in enumerate(scores) if eligible_passages[pi] for si in range(len(s))]
    if not rows:
        return []
    flat = np.array([float(scores[pi][si]) for pi, si in rows])
    tb = np.array([0.0 if tie_break is None or tie_break[pi] is None else float(tie_break[pi])
                   for pi, _ in rows])
    order = np.lexsort((np.arange(len(rows)), -tb, -flat))  # last key sorts first
    return [rows[k] for k in order]


def kept_items(passages: Sequence[Passage], sentences: Sequence[Sequence[Sentence]],
               masks: Sequence[np.ndarray], scores: Sequence[float | None], separator: str,
               order: Sequence[int] | None = None) -> list[Compressed]:
    """`Compressed` items from keep masks: kept sentences in document order, joined by
    `separator`, with their spans; a passage with nothing kept is dropped with its score.
    `order` gives the passages' output order (a reranker's); the input order by default."""
    items = []
    for pi in range(len(passages)) if order is None else order:
        picked = np.flatnonzero(masks[pi]).tolist()
        if not picked:
            items.append(Compressed.dropped(passages[pi], scores[pi]))
            continue
        kept = [sentences[pi][k] for k in picked]
        text = separator.join(s.text for s in kept)
        items.append(Compressed(passages[pi], text, [(s.start, s.end) for s in kept], scores[pi], True))
    return items
