"""Per-article facts for the two-passage Provence examples of `provence_multi` (step 1 of its
docstring): the patterns that find a population, an area, a founding year or (People, History) the
earliest year in an article's sentences, the nationality adjective and kind noun of its Wikidata
description, each as a `Fact` with the sentence that states it; plus the naming helpers the
questions and labels use (`entity_name`, `kind_noun`, `plural`, `names_entity`, `evidence_labels`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ragcomp.text import Sentence
from ragcomp.types import Passage

_HEDGE = r"(?:about |around |approximately |over |more than |nearly |roughly |some |almost |estimated )?"
_NUMBER = r"(\d[\d,]*(?:\.\d+)?)(?:\s(million|billion))?"
_FACT_PATTERNS: dict[str, re.Pattern[str]] = {
    "population": re.compile(r"\bpopulation of " + _HEDGE + _NUMBER),
    "area": re.compile(r"\barea of " + _HEDGE + _NUMBER + r"\s*(?:square kilomet|km2|km²)"),
    "founded": re.compile(r"\b(?:founded|established)\b[^.;]{0,30}?\b(\d{3,4})\b(?!\s*BCE?)"),
}
_YEAR = re.compile(r"\b(1\d{3}|20[0-2]\d)\b")
_BC = re.compile(r"\bBCE?\b")  # a sentence with BC years is skipped for years: "1750 to 1050 BC"
# People descriptions start with a nationality: "American actor", "Ancient Greek philosopher".
_NATIONALITY = re.compile(r"^[A-Z][a-z]+(?:an|ese|ish|ch|i|ic|ek|ss)$")
_SCALE = {None: 1.0, "million": 1e6, "billion": 1e9}


@dataclass
class Fact:
    """One comparable fact of an article: its value and the sentence (index) that states it."""

    value: float | str
    sentence: int


def entity_name(title: str) -> str:
    """The title as a question names it: without a trailing "(disambiguation)" part."""
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def parse_number(number: str, scale: str | None) -> float:
    return float(number.replace(",", "")) * _SCALE[scale]


def kind_noun(description: str) -> str | None:
    """Head noun of a Wikidata description: "City in Fars province, Iran" -> "city"."""
    head = re.split(r" (?:in|of|from|that|which|on|for|with|by|and)\b|[,(;]", description, maxsplit=1)[0]
    words = head.split()
    noun = words[-1].lower() if words else ""
    return noun if noun.isalpha() and len(noun) >= 3 else None


def plural(noun: str) -> str:
    if noun.endswith("s"):
        return noun  # "species", "series"; a wrong "-ses" reads worse than none
    if re.search(r"(sh|ch|x|z)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def _first_with_word(sents: Sequence[Sentence], word: str, case: bool) -> int | None:
    pat = re.compile(r"\b" + re.escape(word) + r"(?:s|es)?\b", 0 if case else re.I)
    return next((i for i, s in enumerate(sents) if pat.search(s.text)), None)


def article_facts(p: Passage, sents: Sequence[Sentence]) -> dict[str, Fact]:
    """Comparable facts of one article (see the module docstring), each with its sentence."""
    facts: dict[str, Fact] = {}
    topic = str(p.metadata.get("topic", ""))
    for i, s in enumerate(sents):
        for name, pat in _FACT_PATTERNS.items():
            m = pat.search(s.text)
            # A person "founded" something else: only a place or body's own founding is compared.
            skip = name == "founded" and (topic == "People" or _BC.search(s.text) is not None)
            if m and name not in facts and not skip:
                value = float(m.group(1)) if name == "founded" else parse_number(m.group(1), m.group(2))
                if value > 0:
                    facts[name] = Fact(value, i)
    if topic in ("People", "History"):
        years = [(int(m.group(1)), i) for i, s in enumerate(sents) if not _BC.search(s.text)
                 for m in _YEAR.finditer(s.text)]
        if years:
            year, i = min(years)
            facts[f"year_{topic}"] = Fact(float(year), i)
    description = str(p.metadata.get("description") or "")
    first = description.split()[0] if description.split() else ""
    if topic == "People" and _NATIONALITY.match(first) and len(description.split()) > 1:
        i = _first_with_word(sents, first, case=True)
        if i is not None:
            facts["nationality"] = Fact(first, i)
    noun = kind_noun(description)
    if noun is not None:
        i = _first_with_word(sents, noun, case=False)
        if i is not None:
            facts["kind"] = Fact(noun, i)
    return facts


def names_entity(sentence: str, title: str) -> bool:
    """The sentence names the article: its full name, or (people) a capitalised word of 4+ letters of it."""
    name = entity_name(title)
    if name.lower() in sentence.lower():
        return True
    return any(len(w) >= 4 and w[:1].isupper() and re.search(r"\b" + re.escape(w) + r"\b", sentence)
               for w in name.split()[1:])


def evidence_labels(sents: Sequence[Sentence], fact_sentence: int, title: str) -> list[int]:
    """The fact sentence, and the first sentence too when the fact sentence does not name the entity."""
    if fact_sentence == 0 or names_entity(sents[fact_sentence].text, title):
        return [fact_sentence]
    return [0, fact_sentence]
