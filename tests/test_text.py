"""Sentence splitting: offsets, abbreviations, numbers, lists, scripts, degenerate text."""

import pytest

from ragcomp.text import merge_spans, split_sentences


def texts(s: str) -> list[str]:
    out = split_sentences(s)
    for sent in out:  # the offsets must always point at the sentence in the original
        assert s[sent.start : sent.end] == sent.text
    return [x.text for x in out]


def test_abbreviations_initials_and_numbers_do_not_split() -> None:
    s = "Dr. Smith paid 3.14 dollars, approx. 5 in total. J. R. R. Tolkien wrote it in the U.S. Army. Done."
    assert texts(s) == [
        "Dr. Smith paid 3.14 dollars, approx. 5 in total.",
        "J. R. R. Tolkien wrote it in the U.S. Army.",
        "Done.",
    ]


def test_year_at_sentence_end_splits_and_lowercase_continuation_does_not() -> None:
    assert texts("He moved to Washington D.C. in 1915. He stayed.") == [
        "He moved to Washington D.C. in 1915.",
        "He stayed.",
    ]


def test_number_abbreviation_only_before_digit() -> None:
    assert texts("It was No. 5 on the chart. He said no. Then left.") == [
        "It was No. 5 on the chart.",
        "He said no.",
        "Then left.",
    ]


def test_question_exclamation_and_quotes() -> None:
    assert texts('Is it? "Yes!" she said. Fine.') == ['Is it?', '"Yes!" she said.', "Fine."]


def test_lists_and_paragraphs() -> None:
    s = "Items:\n- one\n- two\n1. three\n\nNext paragraph without stop"
    assert texts(s) == ["Items:", "- one", "- two", "1. three", "Next paragraph without stop"]


def test_no_punctuation_is_cut_at_word_boundaries() -> None:
    s = " ".join(["word"] * 500)
    out = split_sentences(s, max_chars=100)
    assert len(out) > 1
    assert all(len(x.text) <= 100 for x in out)
    assert all(not x.text.startswith(" ") and not x.text.endswith(" ") for x in out)
    assert " ".join(x.text for x in out) == s


def test_cjk_and_mixed_scripts() -> None:
    assert texts("北京是中国的首都。上海很大！Moscow is big. Москва большая.") == [
        "北京是中国的首都。",
        "上海很大！",
        "Moscow is big.",
        "Москва большая.",
    ]


@pytest.mark.parametrize("s", ["", "   ", "\n\n\t"])
def test_empty_text_gives_no_sentences(s: str) -> None:
    assert split_sentences(s) == []


def test_merge_spans_merges_overlaps_and_whitespace_gaps() -> None:
    text = "aaa bbb. ccc"
    assert merge_spans([(4, 8), (0, 3)], text) == [(0, 8)]
    assert merge_spans([(0, 3), (9, 12)], text) == [(0, 3), (9, 12)]
