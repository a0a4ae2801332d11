"""Training examples for the xrag projector, built on the fly from the Wikipedia corpus.

Documents: the corpus passages (wiki lead summaries), minus every gold title of the evaluation files
(`exclude_qa`, default ../shared/data/qa_dev.jsonl): the projector never sees an evaluated document,
and no evaluation question enters any prompt.

Stage 1, paraphrase pretraining (xRAG §3.3): the user turn is one of `PARAPHRASE_PROMPTS` with the
document's placeholder; the target is the document's own text (first `max_target_tokens` tokens).

Stage 2, context-aware tuning with self-distillation: the prompt is the reader's short-answer prompt
(`ragcomp.llm.user_prompt`) whose context is the gold document plus up to `max_docs - 1` retrieval
neighbours (nearest by the same embeddings, shuffled in); the student reads one placeholder per
document, the teacher the same documents as text. Questions and answers come from the record
(templates below, answered by the article's own description / title / first sentence), and, with
`questions=FILE` (`ragcomp train provence-data` output), from SmolLM2-written questions answered by
the teacher itself (greedy, short-answer prompt over the source document: `teacher_answers`).
The loss is the answer's cross-entropy plus KL(teacher || student) on the answer tokens, so the
teacher's full distribution, not only the reference answer, is distilled.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcomp.compressors.xrag.model import XRAG_TOKEN
from ragcomp.text import split_sentences
from ragcomp.types import Passage

# xRAG's paraphrase instructions, shortened to chat turns for an instruction-tuned reader.
PARAPHRASE_PROMPTS = (
    f"Background: {XRAG_TOKEN}\nRepeat the background text.",
    f"Background: {XRAG_TOKEN}\nCan you put the above background in your own words?",
    f"Background: {XRAG_TOKEN}\nPlease restate the background text.",
    f"{XRAG_TOKEN}\nWhat does the text above say?",
    f"Background: {XRAG_TOKEN}\nWrite out the background information.",
)


@dataclass
class QAExample:
    doc: int  # index into the document list
    question: str
    answer: str


def documents(corpus: str | Path = "wiki", exclude_qa: Sequence[str | Path] | None = None,
              allow_no_exclusion: bool = False) -> tuple[list[Passage], dict[str, Any]]:
    """Corpus passages minus evaluation titles; and a record of what was excluded."""
    from ragcomp.corpus import load_corpus
    from ragcomp.train.provence_data import DEFAULT_QA, load_exclusions

    paths = list(exclude_qa) if exclude_qa else ([DEFAULT_QA] if DEFAULT_QA.is_file() else [])
    if not paths and not allow_no_exclusion:
        raise FileNotFoundError(f"no evaluation file to exclude (default {DEFAULT_QA} is missing): pass "
                                "exclude_qa=[...] / --exclude-qa, or allow_no_exclusion / --no-exclude")
    titles, questions, files = load_exclusions(paths)
    docs = [p for p in load_corpus(corpus) if p.id not in titles]
    if not docs:
        raise ValueError(f"corpus {corpus!r} has no document left after excluding evaluation titles")
    return docs, {"excluded_titles": len(titles), "excluded_questions": questions, "files": files}


def template_questions(docs: Sequence[Passage]) -> list[QAExample]:
    """Questions every record answers: what it is (description), what it is about (title), and
    its opening statement (first sentence)."""
    out = []
    for i, p in enumerate(docs):
        title = str(p.metadata.get("title") or p.id)
        desc = p.metadata.get("description")
        if isinstance(desc, str) and desc.strip():
            out.append(QAExample(i, f"What is {title}?", desc.strip()))
        out.append(QAExample(i, "What is the context about?", title))
        sents = split_sentences(p.text)
        if sents:
            first = p.text[sents[0].start:sents[0].end].strip()
            if 4 <= len(first.split()) <= 40:
                out.append(QAExample(i, f"What does the context say first about {title}?", first))
    return out


def file_questions(path: str | Path, docs: Sequence[Passage], excluded: set[str]) -> list[QAExample]:
    """Positive records of a provence-data file: (question, labelled sentence) for documents kept here;
    evaluation questions (normalised) are dropped."""
    from ragcomp.train.provence_data import normalise_question, read_examples

    by_id = {p.id: i for i, p in enumerate(docs)}
    out = []
    for rec in read_examples(path):
        if rec.get("kind") != "positive" or rec.get("target") is None or rec["passage_id"] not in by_id:
            continue
        if normalise_question(rec["question"]) in excluded:
            continue
        a, b = rec["sentences"][rec["target"]]
        out.append(QAExample(by_id[rec["passage_id"]], rec["question"], rec["text"][a:b].strip()))
    return out


def with_neighbours(gold: int, neighbours: Sequence[int], max_docs: int, rng: random.Random) -> list[int]:
    """The gold document and 0..max_docs-1 of its retrieval neighbours, in random order."""
    k = rng.randint(1, max(1, max_docs))
    picked = [gold, *[n for n in neighbours if n != gold][: k - 1]]
    rng.shuffle(picked)
    return picked
