"""The one sentence selector shared by recomp-extractive, exit and provence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ragcomp import Passage
from ragcomp.compressors.selection import SentenceSelection, kept_items
from ragcomp.text import split_sentences
from ragcomp.tokens import get_counter

SCORES = [np.array([0.9, 0.2, 0.6]), np.array([0.6, 0.05]), np.array([0.3])]


def kept(masks: list[np.ndarray]) -> list[tuple[int, int]]:
    return [(pi, int(si)) for pi, m in enumerate(masks) for si in np.flatnonzero(m)]


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("top_k", True, "top_k must be an integer >= 0"),
        ("top_k", -1, "top_k must be an integer >= 0"),
        ("top_k", "3", "top_k must be an integer >= 0"),
        ("top_share", 0.0, r"top_share must be a number in \(0, 1\]"),
        ("top_share", float("nan"), r"top_share must be a number in \(0, 1\]"),
        ("threshold", "0.5", r"threshold must be a number in \[0, 1\]"),
        ("threshold", float("nan"), r"threshold must be a number in \[0, 1\]"),
        ("threshold", True, r"threshold must be a number in \[0, 1\]"),
        ("threshold", 1.5, r"threshold must be a number in \[0, 1\]"),
        ("relative", "0.3", "relative must be a finite number >= 0.0"),
        ("relative", -0.1, "relative must be a finite number >= 0.0"),
        ("relative", float("inf"), "relative must be a finite number >= 0.0"),
        ("min_sentences", None, "min_sentences must be an integer >= 0, got None"),
        ("max_sentences", 0, "max_sentences must be an integer >= 1"),
        ("budget_tokens", False, "budget_tokens must be an integer >= 0"),
    ],
)
def test_every_parameter_is_checked_with_its_name(name: str, bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SentenceSelection(**{name: bad})


def test_similarity_threshold_is_any_finite_number() -> None:
    assert SentenceSelection(threshold=-0.2, scores="similarity").threshold == -0.2
    with pytest.raises(ValueError, match="threshold must be a finite number, got nan"):
        SentenceSelection(threshold=float("nan"), scores="similarity")
    with pytest.raises(ValueError, match=r"min_sentences \(3\) is above max_sentences \(2\)"):
        SentenceSelection(min_sentences=3, max_sentences=2)


def test_threshold_inclusive_or_strict_and_the_probability_ends() -> None:
    s = [np.array([0.0, 0.5, 1.0])]
    assert kept(SentenceSelection(threshold=0.5).select(s)) == [(0, 1), (0, 2)]
    assert kept(SentenceSelection(threshold=0.5, inclusive=False).select(s)) == [(0, 2)]
    # 0 keeps everything (even an underflowed 0 with a strict rule), 1 keeps nothing.
    assert kept(SentenceSelection(threshold=0.0, inclusive=False).select(s)) == [(0, 0), (0, 1), (0, 2)]
    assert kept(SentenceSelection(threshold=1.0).select(s)) == []


def test_caps_floor_and_relative_keep_the_best_in_document_order() -> None:
    assert kept(SentenceSelection(top_k=2).select(SCORES)) == [(0, 0), (0, 2)]  # 0.9, then the first 0.6
    assert kept(SentenceSelection(max_sentences=3).select(SCORES)) == [(0, 0), (0, 2), (1, 0)]
    # top_share of 6 sentences: ceil(0.3 * 6) = 2
    assert kept(SentenceSelection(top_share=0.3).select(SCORES)) == [(0, 0), (0, 2)]
    # threshold 0.95 passes nothing; the floor adds the best two
    assert kept(SentenceSelection(threshold=0.95, min_sentences=2).select(SCORES)) == [(0, 0), (0, 2)]
    assert kept(SentenceSelection(relative=0.35, scores="similarity").select(SCORES)) == [
        (0, 0), (0, 2), (1, 0)]
    # the tie between (0, 2) and (1, 0) goes to the passage with the higher tie-break score
    assert kept(SentenceSelection(top_k=2).select(SCORES, tie_break=[0.1, 0.8, 0.0])) == [(0, 0), (1, 0)]


def test_ineligible_passages_take_no_part_even_in_the_floor() -> None:
    masks = SentenceSelection(threshold=0.95, min_sentences=2).select(
        SCORES, eligible_passages=[False, True, True])
    assert kept(masks) == [(1, 0), (2, 0)]


def test_budget_skips_a_long_sentence_for_a_shorter_lower_ranked_one() -> None:
    texts = [["one two three four five six", "a", "b c"], ["d e f g", "h"], ["i j"]]
    counter = get_counter("whitespace")
    masks = SentenceSelection(budget_tokens=5).select(SCORES, sentence_texts=texts, counter=counter)
    # best first: 6 words (skipped), "b c" (2), "d e f g" (4: over), "i j" (2), "a" (1), "h" (over)
    assert kept(masks) == [(0, 1), (0, 2), (2, 0)]
    with pytest.raises(ValueError, match="budget_tokens needs the sentence texts"):
        SentenceSelection(budget_tokens=5).select(SCORES)


def test_kept_items_keep_spans_into_the_original_text() -> None:
    passages = [Passage("a", "First one. Second one! Third?"), Passage("b", "Only sentence here.")]
    sents = [split_sentences(p.text) for p in passages]
    masks = [np.array([True, False, True]), np.array([False])]
    items = kept_items(passages, sents, masks, [0.7, None], " ", order=[1, 0])
    assert [i.passage.id for i in items] == ["b", "a"]
    assert not items[0].kept and items[0].score is None
    a = items[1]
    assert a.kept and a.text == "First one. Third?"
    assert " ".join(passages[0].text[s:e] for s, e in a.spans) == a.text
    assert math.isclose(a.score, 0.7)
