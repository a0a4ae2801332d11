"""`ragcomp eval --suite DIR`: methods over every domain of a multi-domain benchmark, beside a naive baseline.

A suite folder (built by `python3 -m ragcomp.eval.domains build --out DIR`, committed under
benchmarks/domains) holds per domain `passages.jsonl.gz`, `dev.jsonl` and `test.jsonl`. Per domain
this retrieves the top-k from a FAISS/MiniLM index of that domain's passages (cached on disk under
`<cache>/indexes/suite-<domain>-<embedder>`, reused while the passages are the same), runs the methods
through `ragcomp.eval.evaluate` (same retrieval for every row), and adds beside each method the naive
row `naive@<method>`: the question's retrieved sentences ranked by MiniLM similarity to the question,
the best kept (in document order) while they fit in that question's tokens out of the method, so the
method is judged against the obvious thing at the same size.

Questions without a short answer (FAQ entries) count their evidence sentence as the answer. Every row
is also cut by the length of the question's gold passage in words (< 100, 100-300, > 300).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcomp.corpus import iter_jsonl
from ragcomp.embeddings import CachedEmbedder
from ragcomp.eval.data import Question
from ragcomp.eval.metrics import contains_answer, evidence_present
from ragcomp.eval.runner import SEPARATOR, aggregate, evaluate
from ragcomp.stores.memory import MemoryStore
from ragcomp.text import split_sentences
from ragcomp.tokens import TokenCounter, get_counter
from ragcomp.types import Passage

DEFAULT_METHODS = ("recomp-extractive", "provence", "rerank", "lingua", "exit")
BUCKETS = ("<100", "100-300", ">300")
NAIVE = "naive"


def bucket(words: int) -> str:
    """The passage-length bucket of a word count: < 100, 100-300, > 300."""
    return "<100" if words < 100 else ("100-300" if words <= 300 else ">300")


@dataclass
class Domain:
    name: str
    passages: list[Passage]
    questions: list[Question]


def suite_domains(suite: str | Path) -> list[str]:
    """Domain names of a suite folder: its manifest's, else every subfolder with passages."""
    root = Path(suite)
    manifest = root / "manifest.json"
    if manifest.is_file():
        return sorted(json.loads(manifest.read_text(encoding="utf-8")).get("domains", {}))
    return sorted(p.parent.name for p in root.glob("*/passages.jsonl.gz"))


def load_domain(suite: str | Path, name: str, split: str = "dev", limit: int | None = None) -> Domain:
    """Passages and questions of one domain; a question without short answers gets its evidence as
    the answer (meta "short_answer" False), and its gold passage's words in meta "passage_words"."""
    folder = Path(suite) / name
    ppath, qpath = folder / "passages.jsonl.gz", folder / f"{split}.jsonl"
    for path in (ppath, qpath):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: build the suite with python3 -m ragcomp.eval.domains build --out {suite}"
            )
    passages = [
        Passage(str(r["id"]), r["text"], None, {"doc": r.get("doc"), "title": r.get("title")})
        for _, r in iter_jsonl(ppath)
    ]
    words = {p.id: len(p.text.split()) for p in passages}
    questions = []
    for lineno, r in iter_jsonl(qpath):
        if limit is not None and len(questions) >= limit:
            break
        evidence = [e for e in r.get("evidence", []) if e.strip()]
        if not r.get("question") or not evidence or not r.get("titles"):
            raise ValueError(f"{qpath}:{lineno}: needs question, evidence and titles")
        answers = list(r.get("answers") or [])
        gold = r["titles"][0]
        meta = {
            "domain": name,
            "doc": r.get("doc"),
            "short_answer": bool(answers),
            "passage_words": words.get(gold, r.get("passage_words", 0)),
        }
        questions.append(
            Question(
                str(r["id"]),
                r["question"],
                answers or evidence,
                list(r["titles"]),
                evidence,
                r.get("type"),
                meta,
            )
        )
    if not questions:
        raise ValueError(f"{qpath}: no questions")
    return Domain(name, passages, questions)


def naive_context(
    question: str, passages: Sequence[Passage], budget: int, counter: TokenCounter, embedder: CachedEmbedder
) -> str:
    """The retrieved sentences most similar to the question (MiniLM cosine), kept best first while
    they fit in `budget` tokens, put back in document order; "" for a budget of 0."""
    if budget <= 0:
        return ""
    sents = [(pi, s) for pi, p in enumerate(passages) for s in split_sentences(p.text)]
    if not sents:
        return ""
    vecs = embedder.embed([question, *(s.text for _, s in sents)])
    scores = vecs[1:] @ vecs[0]
    chosen, used = [], 0
    for i in sorted(range(len(sents)), key=lambda j: -float(scores[j])):
        n = counter.count(sents[i][1].text)
        if used + n <= budget or not chosen:
            chosen.append(i)
            used += n
        if used >= budget:
            break
    by_passage: dict[int, list[str]] = {}
    for i in sorted(chosen, key=lambda j: (sents[j][0], sents[j][1].start)):
        by_passage.setdefault(sents[i][0], []).append(sents[i][1].text)
    return SEPARATOR.join(" ".join(v) for _, v in sorted(by_passage.items()))


def naive_row(
    run: Mapping[str, Any], questions: Sequence[Question], retriever: Any, counter: TokenCounter
) -> dict[str, Any]:
    """The naive row matched to one method's run: per question the same tokens out as the method."""
    emb = retriever.embedder
    if isinstance(emb.store, MemoryStore):  # same cold start as the method's row: questions cached only
        emb.store = MemoryStore(max_bytes=emb.store.max_bytes)
        emb.embed([q.question for q in questions])
    per_q = []
    for q, rec in zip(questions, run["per_question"], strict=True):
        passages = [retriever.by_id[pid] for pid in rec["retrieved"]]
        t = time.perf_counter()
        ctx = naive_context(q.question, passages, rec["tokens_out"], counter, emb)
        ms = (time.perf_counter() - t) * 1000
        retrieved_text = SEPARATOR.join(p.text for p in passages)
        in_retr = evidence_present(retrieved_text, q.evidence)
        in_ctx = evidence_present(ctx, q.evidence)
        lat = dict(rec["latency_ms"])
        lat["compress"] = round(ms, 2)
        lat["total"] = round((lat.get("retrieve") or 0.0) + ms, 2)
        per_q.append(
            {
                **rec,
                "kept": [],
                "tokens_out": counter.count(ctx) if ctx else 0,
                "empty": not ctx,
                "evidence_kept": sum(a and b for a, b in zip(in_retr, in_ctx, strict=True)),
                "answer_in_context": contains_answer(ctx, q.answers),
                "latency_ms": lat,
            }
        )
    label = f"{NAIVE}@{run['label']}"
    return {
        "method": NAIVE,
        "label": label,
        "matched_to": run["label"],
        "params": {},
        "sweep": None,
        **aggregate(per_q, False),
        "per_question": per_q,
    }


def with_buckets(row: dict[str, Any], words: Mapping[str, int]) -> dict[str, Any]:
    """Add `buckets`: the row's metrics over the questions of each gold-passage length bucket."""
    groups: dict[str, list[dict[str, Any]]] = {b: [] for b in BUCKETS}
    for rec in row["per_question"]:
        groups[bucket(words[rec["id"]])].append(rec)
    row["buckets"] = {b: _short(aggregate(recs, False)) if recs else {"n": 0} for b, recs in groups.items()}
    return row


def _short(agg: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "n",
        "tokens_in",
        "tokens_out",
        "compression_ratio",
        "answer_kept",
        "evidence_recall",
        "empty_rate",
        "counts",
    )
    return {k: agg[k] for k in keep}


def run_suite(
    suite: str | Path,
    method: str | Sequence[str] = DEFAULT_METHODS,
    *,
    split: str = "dev",
    domains: Sequence[str] | None = None,
    limit: int | None = None,
    params: Mapping[str, Any] | None = None,
    retrieve_k: int = 10,
    baseline: bool = True,
    naive: bool = True,
    tokenizer: str | None = None,
    device: str | None = None,
    embedder: str = "minilm",
    index_root: str | Path | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the methods over every domain (or `domains`) of a suite; the report dict (see the module)."""
    from ragcomp.retrieval import CorpusRetriever

    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    names = list(domains) if domains else suite_domains(suite)
    if not names:
        raise ValueError(f"{suite}: no domains (build it with python3 -m ragcomp.eval.domains build)")
    known = suite_domains(suite)
    unknown = [d for d in names if d not in known]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown} in {suite}; it has {', '.join(known)}")
    if index_root is None:
        from ragcomp.models import cache_dir

        index_root = cache_dir() / "indexes"
    t_start = time.perf_counter()
    out: dict[str, Any] = {}
    pooled: dict[str, list[dict[str, Any]]] = {}
    words: dict[str, int] = {}
    order: list[str] = []
    config: dict[str, Any] = {}
    for name in names:
        dom = load_domain(suite, name, split, limit)
        retriever = CorpusRetriever.build(
            dom.passages, embedder, Path(index_root) / f"suite-{name}-{embedder}", device, progress
        )
        report = evaluate(
            dom.questions,
            method=method,
            params=params,
            retriever=retriever,
            retrieve_k=retrieve_k,
            reader="none",
            baseline=baseline,
            tokenizer=tokenizer,
            device=device,
            embedder=embedder,
            batch_size=batch_size,
            progress=progress,
        )
        counter = get_counter(report["config"]["tokenizer"])
        config = report["config"]
        words.update({q.id: q.meta["passage_words"] for q in dom.questions})
        rows = []
        for run in report["runs"]:
            rows.append(run)
            if naive and run["method"] != "none":
                rows.append(naive_row(run, dom.questions, retriever, counter))
        for row in rows:
            with_buckets(row, words)
            pooled.setdefault(row["label"], []).extend(row["per_question"])
            if row["label"] not in order:
                order.append(row["label"])
        out[name] = {
            "n_questions": len(dom.questions),
            "corpus_passages": len(retriever),
            "short_answers": sum(q.meta["short_answer"] for q in dom.questions),
            "bucket_questions": {
                b: sum(bucket(q.meta["passage_words"]) == b for q in dom.questions) for b in BUCKETS
            },
            "index_loaded_from_disk": report["index"]["loaded_from_disk"],
            "seconds": report["seconds"],
            "rows": rows,
        }
    across = []
    for label in order:
        recs = pooled[label]
        row = {"label": label, **aggregate(recs, False), "per_question": recs}
        row["macro_answer_kept"] = _macro(out, label, "answer_kept")
        with_buckets(row, words)
        del row["per_question"]
        across.append(row)
    return {
        "suite": str(suite),
        "split": split,
        "domains": out,
        "across": across,
        "config": {
            "methods": order,
            "retrieve_k": retrieve_k,
            "embedder": embedder,
            "limit": limit,
            "tokenizer": config.get("tokenizer"),
            "device": device,
            "batch_size": batch_size,
            "params": {k: str(v) for k, v in (params or {}).items()},
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _macro(domains: Mapping[str, Any], label: str, key: str) -> float | None:
    vals = [r[key] for d in domains.values() for r in d["rows"] if r["label"] == label and r[key] is not None]
    return None if not vals else round(sum(vals) / len(vals), 4)
