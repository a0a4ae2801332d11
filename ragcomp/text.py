"""Sentence splitting that keeps character offsets into the original text.

Offsets matter: extractive steps report kept spans for citations, and the integrations
record them in node metadata. The splitter is rule-based (no model, no download) and
handles abbreviations, initials, decimal numbers, list items, CJK full stops and text
without any punctuation (long runs are cut at word boundaries).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

# Lower-cased tokens that end with a period but do not end a sentence.
ABBREVIATIONS = frozenset(
    (
        "mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx appr ca c dept est "
        "inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec eds rev gen col lt sgt "
        "capt cmdr gov pres sen rep u.s u.k u.n a.d b.c b.c.e c.e a.m p.m ph.d m.d b.a m.a d.c "
        "n.b viz resp"
    ).split()
)
# Abbreviations that are common words too ("no", "art"): only before a number ("No. 5").
NUMBER_ABBREVIATIONS = frozenset("no nos vol vols pp p op art sec ch fig figs ed".split())

_TERMINATOR = re.compile(r"[.!?…]+[\"'”’)\]]*|[。！？]+[」』）]*")
_LIST_ITEM = re.compile(r"\n[ \t]*(?:[-*•·]|\d{1,3}[.)]|[a-zA-Z][.)])[ \t]+")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_JOINED_LETTERS = re.compile(r"(?:[a-zA-Z]\.)+[a-zA-Z]")


@dataclass(frozen=True)
class Sentence:
    text: str
    start: int
    end: int


def _word_before(text: str, end: int) -> str:
    """The letters, digits, underscores and periods right before `end`: what
    `re.search(r"([\\w.]+)$", text[:end])` finds, without rescanning the text before it (that search
    was most of the splitter's time) and without copying the prefix. Like `$`, it also ends before
    one final newline."""
    if end > 0 and text[end - 1] == "\n":
        end -= 1
    start = end
    while start > 0:
        ch = text[start - 1]
        if not (ch == "." or ch == "_" or ch.isalnum()):  # [\w.]: for str patterns \w is isalnum() or "_"
            break
        start -= 1
    return text[start:end]


def _is_false_stop(text: str, end_of_term: int, term: str) -> bool:
    """True when the period at text[end_of_term-1] is inside an abbreviation or number."""
    nxt = text[end_of_term : end_of_term + 3].lstrip()
    if nxt[:1].islower():
        return True  # '"Yes!" she said', 'approx. five': lower case next, the sentence goes on
    if not term.startswith("."):
        return False
    word = _word_before(text, end_of_term - len(term))  # letters, digits and inner periods
    if not word:
        return False
    lower = word.lower().rstrip(".")
    if lower in ABBREVIATIONS:
        return True
    if lower in NUMBER_ABBREVIATIONS and nxt[:1].isdigit():
        return True
    if len(word) == 1 and word.isalpha() and word.isupper():
        return True  # an initial: "J. R. R. Tolkien"
    # "U.S", "e.g": letters joined by periods.
    return _JOINED_LETTERS.fullmatch(word) is not None


def _boundaries(text: str) -> list[int]:
    """Character positions where one sentence ends and the next may start."""
    cuts: set[int] = set()
    for m in _TERMINATOR.finditer(text):
        end = m.end()
        term = m.group(0)
        if term[0] in "。！？":
            cuts.add(end)
            continue
        if end < len(text) and not text[end].isspace():
            continue  # "3.14", "example.com", "U.S.A"
        if _is_false_stop(text, end, term):
            continue
        cuts.add(end)
    for pattern in (_PARAGRAPH, _LIST_ITEM):
        for m in pattern.finditer(text):
            cuts.add(m.start())
    return sorted(cuts)


def _cut_long(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Split [start, end) at whitespace into pieces of at most max_chars."""
    pieces = []
    while end - start > max_chars:
        window = text[start : start + max_chars]
        cut = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
        cut = start + cut if cut > 0 else start + max_chars
        pieces.append((start, cut))
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if start < end:
        pieces.append((start, end))
    return pieces


def split_sentences(text: str, max_chars: int = 600) -> list[Sentence]:
    """Split `text` into sentences; `text[s.start:s.end] == s.text` for every sentence.

    Leading and trailing whitespace is excluded from each sentence. Empty or blank text
    gives an empty list. Sentences longer than `max_chars` are cut at word boundaries so
    text without punctuation still yields units an extractive step can choose between.
    """
    if not text or not text.strip():
        return []
    edges = [0, *_boundaries(text), len(text)]
    out: list[Sentence] = []
    for a, b in itertools.pairwise(edges):
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a >= b:
            continue
        for s, e in _cut_long(text, a, b, max_chars):
            while e > s and text[e - 1].isspace():
                e -= 1
            if s < e:
                out.append(Sentence(text[s:e], s, e))
    return out


def join_spans(text: str, spans: list[tuple[int, int]], sep: str = " ") -> str:
    """The text of the kept spans, in order, joined by `sep`."""
    return sep.join(text[a:b] for a, b in spans)


def merge_spans(spans: list[tuple[int, int]], text: str | None = None) -> list[tuple[int, int]]:
    """Sort and merge spans that overlap or are separated only by whitespace in `text`."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out:
            pa, pb = out[-1]
            gap = text[pb:a] if text is not None and a >= pb else ""
            if a <= pb or (text is not None and not gap.strip()):
                out[-1] = (pa, max(pb, b))
                continue
        out.append((a, b))
    return out
