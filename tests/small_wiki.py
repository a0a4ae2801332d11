"""A small real corpus shared by the retrieval and eval tests (one saved MiniLM index for both)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ragcomp.corpus import load_corpus
from ragcomp.types import Passage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "wiki_summaries_en.json"
QA = DATA / "qa_dev.jsonl"


def small_corpus(n: int = 300, questions: int = 40) -> list[Passage]:
    """The gold articles of the first `questions` dev questions and of 10 two-hop ones, plus
    random others, n in all."""
    corpus = {p.id: p for p in load_corpus(WIKI)}
    lines = QA.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:questions] + lines[160:170]]  # singles and multis
    gold = list(dict.fromkeys(t for r in rows for t in r["titles"]))
    rest = sorted(set(corpus) - set(gold))
    random.Random(0).shuffle(rest)
    return [corpus[t] for t in gold + rest[: n - len(gold)]]
