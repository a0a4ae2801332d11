"""The faster sentence splitter gives exactly the spans of the old one (every caller depends on them).

The old splitter looked up the word before each period with `re.search(r"([\\w.]+)$", prefix)`, which
rescans the whole prefix (most of its time); `_word_before` replaces it. Frozen references: the
digest of the old splitter's spans over the whole wiki corpus, and the old lookup itself for fuzzed
text (everything else in the splitter is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from ragcomp import text as text_module
from ragcomp.text import _word_before, split_sentences

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_summaries_en.json"
# sha256 of json.dumps([[start, end], ...]) per summary, in file order, from the old splitter.
OLD_DIGESTS = {
    600: "d12442d26ea8955d4737355ad45960ab2c96b4db278fe827db24198ed4b3e193",
    80: "322b61d1ac3ef1a7770df877700ce994554d28b94e8cbe48955f65b0cbb278c3",
}


def _old_word_before(text: str, end: int) -> str:
    m = re.search(r"([\w.]+)$", text[:end])
    return m.group(1) if m else ""


def _digest(texts: list[str], max_chars: int) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(json.dumps([(s.start, s.end) for s in split_sentences(t, max_chars)]).encode())
    return h.hexdigest()


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/wiki_summaries_en.json")
@pytest.mark.parametrize("max_chars", sorted(OLD_DIGESTS))
def test_spans_equal_the_old_splitter_on_the_whole_corpus(max_chars: int) -> None:
    texts = [v["extract"] for v in json.loads(CORPUS.read_text()).values()]
    assert len(texts) > 10_000
    assert _digest(texts, max_chars) == OLD_DIGESTS[max_chars]


# Pieces that exercise every rule: abbreviations, initials, numbers, joined letters, closers, CJK,
# lists, paragraphs, a newline right before a period, underscores and non-ASCII letters and digits.
_PIECES = ["Dr.", "U.S.", "e.g.", "No.", "no.", "5", "3.14", "J.", "R.", "word", "Word", "ÉTÉ", "١٢",
           "x_y", ".", "...", "!", "?", "…", '"', "”", ")", "]", "。", "！", "」", " ", " ", " ", "\n",
           "\n\n", "\n- ", "\n1. ", "\na) ", "\t", "approx.", "etc.", "D.C.", "Ph.D.", "_."]


def test_word_lookup_equals_the_old_regex_on_fuzzed_text() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        s = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 25)))
        for end in range(len(s) + 1):
            assert _word_before(s, end) == _old_word_before(s, end), (s, end)


def test_word_lookup_class_matches_regex_on_every_code_point() -> None:
    # `\w` for str patterns is str.isalnum() or "_": checked over all of Unicode, period included.
    word = re.compile(r"[\w.]")
    mismatched = [c for c in map(chr, range(0x110000))
                  if bool(word.fullmatch(c)) != (_word_before("a" + c, 2) == "a" + c)
                  and c != "\n"]  # a final newline is skipped, as `$` does
    assert mismatched == []


def test_splits_equal_with_the_old_lookup_on_fuzzed_text(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1)
    samples = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 60))) for _ in range(2000)]
    new = [[(x.start, x.end) for x in split_sentences(s, 40)] for s in samples]
    monkeypatch.setattr(text_module, "_word_before", _old_word_before)
    old = [[(x.start, x.end) for x in split_sentences(s, 40)] for s in samples]
    assert new == old
    assert sum(len(x) for x in new) > 2000  # the fuzz does produce sentences
