"""Metrics: answer matching in a context, SQuAD EM/F1, evidence presence, percentiles.

Whitespace is normalised everywhere (any run of Unicode whitespace, non-breaking spaces
included, counts as one space): the data has answers with U+00A0 where extracts have it,
and compressors may re-join sentences with a different separator.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_ws(text: str) -> str:
    """Collapse every run of whitespace (str.split knows U+00A0, U+2009...) to one space."""
    return " ".join(text.split())


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower case, drop punctuation, articles, extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer alias."""
    if prediction is None or not answers:
        return 0.0
    pred = squad_normalize(prediction)
    return float(any(pred == squad_normalize(a) for a in answers))


def f1_score(prediction: str | None, answers: Sequence[str]) -> float:
    """SQuAD token F1, the best over answer aliases."""
    if prediction is None or not answers:
        return 0.0
    return max(_f1(prediction, a) for a in answers)


def _f1(prediction: str, answer: str) -> float:
    pred = squad_normalize(prediction).split()
    gold = squad_normalize(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _alias_pattern(alias: str) -> re.Pattern[str] | None:
    alias = normalize_ws(alias).casefold()
    if not alias:
        return None
    # Whole words at word edges: "17" must not match inside "1917".
    left = r"(?<!\w)" if alias[0].isalnum() or alias[0] == "_" else ""
    right = r"(?!\w)" if alias[-1].isalnum() or alias[-1] == "_" else ""
    return re.compile(left + re.escape(alias) + right)


def contains_answer(context: str | None, answers: Iterable[str]) -> bool:
    """True when any answer alias occurs in the context (case- and whitespace-insensitive,
    on word boundaries)."""
    if not context:
        return False
    hay = normalize_ws(context).casefold()
    for a in answers:
        pat = _alias_pattern(a)
        if pat is not None and pat.search(hay):
            return True
    return False


def evidence_present(context: str | None, sentences: Iterable[str]) -> list[bool]:
    """For each evidence sentence: is it in the context verbatim (modulo whitespace)?"""
    hay = normalize_ws(context or "")
    return [bool(s.strip()) and normalize_ws(s) in hay for s in sentences]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(num: float, den: float) -> float | None:
    """num / den, or None when den is 0 (JSON has no infinity)."""
    return num / den if den else None
