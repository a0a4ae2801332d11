"""Run methods over eval questions: retrieve once, compress per method, read, measure.

Every method (and the uncompressed baseline, method "none") sees the same retrieved
passages for a question, and all contexts are counted with the reader's tokenizer, so the
rows of one report are directly comparable.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ragcomp.base import Compressor
from ragcomp.compressors.xrag.context import EmbeddingContext, note_text_fallback, reader_takes_embeddings
from ragcomp.embeddings import CachedEmbedder
from ragcomp.eval.data import Question, load_questions
from ragcomp.eval.metrics import (
    contains_answer,
    evidence_present,
    exact_match,
    f1_score,
    percentile,
    ratio,
)
from ragcomp.eval.plan import BASELINE, NO_RETRIEVAL, RunSpec, SweepSpec, accepts, parse_sweep, plan_runs
from ragcomp.llm import NoReader, Reader, load_reader
from ragcomp.registry import load_compressor
from ragcomp.stores.memory import MemoryStore
from ragcomp.tokens import TokenCounter, get_counter
from ragcomp.types import Compressed, Passage

SEPARATOR = "\n\n"  # how the uncompressed passages are joined (the compressors' default too)
STAGES = ("retrieve", "compress", "generate", "total")


class NoContext(Compressor):
    """The closed-book row: every passage dropped, so the reader answers without context."""

    name = NO_RETRIEVAL

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        return [Compressed.dropped(p, p.score) for p in passages]


def _build_compressor(spec: RunSpec, tokenizer: str, device: str | None,
                      retriever: Any = None) -> Compressor | None:
    if spec.method == BASELINE:
        return None
    if spec.method == NO_RETRIEVAL:
        return NoContext(tokenizer)
    params = dict(spec.params)
    # Methods that reuse the retriever's document vectors (xrag) get its index.
    index = getattr(retriever, "index", None)
    if index is not None and "vector_index" not in params and accepts(spec.method, "vector_index"):
        params["vector_index"] = index
    # Budgets inside a method must be in the reader's tokens, like the report's counts.
    if "tokenizer" not in params and accepts(spec.method, "tokenizer"):
        params["tokenizer"] = tokenizer
    if device is not None and "device" not in params and accepts(spec.method, "device"):
        params["device"] = device
    try:
        return load_compressor(spec.method, **params)
    except TypeError as e:  # unknown parameter: bad input, not a bug
        raise ValueError(str(e)) from None


def _progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="q", file=sys.stderr, leave=True)


def evaluate(
    data: str | Path | Iterable[Mapping[str, Any] | Question],
    method: str | Sequence[str] = (),
    params: Mapping[str, Any] | None = None,
    corpus: str | Path | Sequence[Passage] = "wiki",
    retrieve_k: int = 10,
    reader: str | Reader | None = "none",
    baseline: bool = False,
    limit: int | None = None,
    *,
    no_retrieval: bool = False,
    sweep: SweepSpec | Sequence[SweepSpec] | None = None,
    base_url: str | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    embedder: str = "minilm",
    index_dir: str | Path | None = None,
    retriever: Any = None,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate compression methods on questions; returns the report dict (see `ragcomp eval`).

    `method` is a name, a comma list or a list of names; "none" (or `baseline=True`) adds the
    uncompressed top-k context. `params` go to every method that accepts them, or to one
    method as "METHOD.KEY". `corpus` is "wiki", a corpus file, or a list of Passages (then
    indexed in memory). `retriever` may be a prebuilt CorpusRetriever. `batch_size` > 1 compresses
    and reads that many questions in one batch (faster, above all on a GPU); each question's
    compress and generate latency is then the batch's time divided by its size.
    """
    t_start = time.perf_counter()
    if isinstance(retrieve_k, bool) or not isinstance(retrieve_k, int) or retrieve_k < 1:
        raise ValueError(f"retrieve_k must be a positive integer, got {retrieve_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    methods = _method_list(method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        questions = load_questions(data, limit)
    notes = [str(w.message) for w in caught]
    for msg in notes:  # re-emit once for callers that watch warnings
        warnings.warn(msg, UserWarning, stacklevel=2)
    sweeps = parse_sweep(sweep)
    runs = plan_runs(methods, params, sweeps, baseline, no_retrieval)

    # The reader first: a wrong URL or missing weights must fail before minutes of indexing.
    rdr = load_reader(reader, base_url=base_url, device=device, tokenizer=tokenizer,
                      max_new_tokens=max_new_tokens)
    rdr.check()
    counter: TokenCounter = get_counter(rdr.tokenizer)
    generates = not isinstance(rdr, NoReader)
    # xrag contexts count as one token per document unless a generating reader reads their text.
    takes_embeddings = reader_takes_embeddings(rdr) or not generates

    if retriever is None:
        from ragcomp.retrieval import CorpusRetriever

        if isinstance(corpus, (str, Path)):
            retriever = CorpusRetriever.for_corpus(corpus, embedder, index_dir, device, progress)
        else:
            retriever = CorpusRetriever.build(list(corpus), embedder, index_dir, device, progress)
    corpus_name = str(corpus) if isinstance(corpus, (str, Path)) else f"{len(retriever)} passages"

    missing = [
        {"id": q.id, "titles": [t for t in q.titles if t not in retriever.by_id]}
        for q in questions
        if any(t not in retriever.by_id for t in q.titles)
    ]
    setup_s = time.perf_counter() - t_start

    # Retrieve once per question, timed one query at a time (what a live system does).
    t0 = time.perf_counter()
    retrieved: list[list[Passage]] = []
    retrieve_ms: list[float] = []
    for q in _progress(questions, len(questions), "retrieve", progress):
        t = time.perf_counter()
        retrieved.append(retriever.retrieve(q.question, retrieve_k))
        retrieve_ms.append((time.perf_counter() - t) * 1000)
    retrieve_s = time.perf_counter() - t0

    # What the uncompressed context holds, per question (the denominators of the recalls).
    base = []
    for q, ps in zip(questions, retrieved, strict=True):
        ctx = SEPARATOR.join(p.text for p in ps)
        ids = {p.id for p in ps}
        base.append({
            "context": ctx,
            "tokens_in": counter.count(ctx),
            "titles_found": [t in ids for t in q.titles],
            "evidence_in_retrieved": evidence_present(ctx, q.evidence),
            "answer_in_retrieved": contains_answer(ctx, q.answers),
        })

    rows = []
    run_seconds = {}
    for spec in runs:
        t0 = time.perf_counter()
        _cold_cache(retriever, questions)
        comp = _build_compressor(spec, rdr.tokenizer, device, retriever)
        per_q = []
        bar = _progress(range(len(questions)), len(questions), spec.label, progress)
        bar_iter = iter(bar)
        for start in range(0, len(questions), batch_size):
            idx = range(start, min(start + batch_size, len(questions)))
            recs = _compress_group([questions[qi] for qi in idx], [retrieved[qi] for qi in idx],
                                   [base[qi] for qi in idx], comp, counter, takes_embeddings)
            if generates:
                _read_batch(recs, rdr)
            for qi, rec in zip(idx, recs, strict=True):
                per_q.append(_finish(rec, questions[qi], base[qi], retrieve_ms[qi], generates))
                next(bar_iter, None)
        row = {"method": spec.method, "label": spec.label,
               "params": {k: _jsonable(v) for k, v in spec.params.items()},
               "sweep": None if spec.sweep is None else {"key": spec.sweep[0],
                                                         "value": _jsonable(spec.sweep[1])},
               **aggregate(per_q, generates), "per_question": per_q}
        if comp is not None:
            row["compressor"] = repr(comp)
        rows.append(row)
        run_seconds[spec.label] = time.perf_counter() - t0

    rdr.close()
    total_s = time.perf_counter() - t_start
    from ragcomp import __version__

    return {
        "ragcomp_version": __version__,
        "config": {
            "data": str(data) if isinstance(data, (str, Path)) else "(in memory)",
            "corpus": corpus_name,
            "corpus_passages": len(retriever),
            "retrieve_k": retrieve_k,
            "embedder": embedder,
            "reader": rdr.describe(),
            "tokenizer": counter.name,
            "device": device,
            "limit": limit,
            "batch_size": batch_size,
            "methods": [r.label for r in runs],
            "sweep": [{"key": k, "values": _jsonable(v)} for k, v in sweeps] or None,
        },
        "n_questions": len(questions),
        "missing_titles": {"count": len(missing), "questions": missing},
        "warnings": notes,
        "index": {"loaded_from_disk": bool(getattr(retriever, "loaded_from_disk", False)),
                  "build_seconds": round(float(getattr(retriever, "build_seconds", 0.0)), 3)},
        "runs": rows,
        "seconds": {"setup": round(setup_s, 3), "retrieve": round(retrieve_s, 3),
                    "runs": {k: round(v, 3) for k, v in run_seconds.items()}, "total": round(total_s, 3)},
    }


def _cold_cache(retriever: Any, questions: list[Question]) -> None:
    """Give every run the same cache state, so no row's latency rides on an earlier row's work:
    the questions' embeddings are cached (retrieval just computed them, as in a live system),
    passage and sentence embeddings are not. Compressors share this embedder by default."""
    emb = getattr(retriever, "embedder", None)
    if not isinstance(emb, CachedEmbedder) or not isinstance(emb.store, MemoryStore):
        return  # a store the caller chose (disk, Redis) is theirs to keep
    emb.store = MemoryStore(max_bytes=emb.store.max_bytes)
    emb.embed([q.question for q in questions])


def _method_list(method: str | Sequence[str]) -> list[str]:
    items = [method] if isinstance(method, str) else list(method)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"method names must be str, got {type(item).__name__}")
        out.extend(m.strip() for m in item.split(",") if m.strip())
    return out


def _compress_group(
    qs: list[Question], passages: list[list[Passage]], bases: list[dict[str, Any]],
    comp: Compressor | None, counter: TokenCounter, takes_embeddings: bool = False,
) -> list[dict[str, Any]]:
    """Compress a group of questions in one `compress_batch` call (generators and encoders batch
    across questions there); each record gets the group's time over its size."""
    if comp is None or len(qs) == 1:
        return [_compress_one(q, ps, b, comp, counter, takes_embeddings)
                for q, ps, b in zip(qs, passages, bases, strict=True)]
    t = time.perf_counter()
    results = comp.compress_batch([q.question for q in qs], passages)
    ms = (time.perf_counter() - t) * 1000 / len(qs)
    return [_compress_one(q, ps, b, comp, counter, takes_embeddings, (res, ms))
            for q, ps, b, res in zip(qs, passages, bases, results, strict=True)]


def _compress_one(
    q: Question, passages: list[Passage], base: dict[str, Any], comp: Compressor | None,
    counter: TokenCounter, takes_embeddings: bool = False, done: tuple[Any, float] | None = None,
) -> dict[str, Any]:
    """Compress one question's passages (or take `done`: its batched result and share of the
    batch time in ms); the first half of its record."""
    t = time.perf_counter()
    if comp is None:
        context, empty, kept = base["context"], False, [p.id for p in passages]
    else:
        res = comp.compress(q.question, passages) if done is None else done[0]
        context, empty, kept = res.context, res.empty, [c.passage.id for c in res.kept]
    tokens_out = counter.count(context) if context else 0
    text_seen = context
    if isinstance(context, EmbeddingContext) and takes_embeddings:
        tokens_out = context.n_docs  # the reader sees one token per document
        text_seen = ""  # and no text: evidence and answers in context count as not kept
    return {"question": q.question, "context": context, "text_seen": text_seen, "empty": bool(empty),
            "kept": kept, "retrieved": [p.id for p in passages],
            "compress_ms": (time.perf_counter() - t) * 1000 if done is None else done[1],
            "tokens_out": tokens_out, "prediction": None,
            "generate_ms": None}


def _read_batch(recs: list[dict[str, Any]], reader: Reader) -> None:
    """Answer a batch of compressed questions; each gets the batch's time over its size."""
    # Selective augmentation: an empty result means answer without context.
    items = [(r["question"], r["context"] if r["context"] and not r["empty"] else None) for r in recs]
    if not reader_takes_embeddings(reader):  # xrag on a text-only reader: its text fallback, said once
        for i, (question, ctx) in enumerate(items):
            if isinstance(ctx, EmbeddingContext):
                note_text_fallback(reader.name, ctx)
                items[i] = (question, str(ctx))
    t = time.perf_counter()
    predictions = reader.answer_batch(items)
    per_ms = (time.perf_counter() - t) * 1000 / len(recs)
    if len(predictions) != len(recs):
        raise RuntimeError(f"reader returned {len(predictions)} answers for {len(recs)} questions")
    for r, pred in zip(recs, predictions, strict=True):
        r["prediction"], r["generate_ms"] = pred, per_ms


def _finish(
    rec: dict[str, Any], q: Question, base: dict[str, Any], retrieve_ms: float, generates: bool
) -> dict[str, Any]:
    """Score one question: the report's per-question record."""
    context, prediction = rec.get("text_seen", rec["context"]), rec["prediction"]
    compress_ms, generate_ms = rec["compress_ms"], rec["generate_ms"]
    in_ctx = evidence_present(context, q.evidence)
    ev_retr = base["evidence_in_retrieved"]
    total_ms = retrieve_ms + compress_ms + (generate_ms or 0.0)
    return {
        "id": q.id,
        "type": q.type,
        "question": q.question,
        "answers": q.answers,
        "titles": q.titles,
        "retrieved": rec["retrieved"],
        "kept": rec["kept"],
        "titles_found": sum(base["titles_found"]),
        "evidence": len(q.evidence),
        "evidence_in_retrieved": sum(ev_retr),
        # Only evidence that retrieval delivered can be kept; anything else is not the method's loss.
        "evidence_kept": sum(a and b for a, b in zip(ev_retr, in_ctx, strict=True)),
        "answer_in_retrieved": base["answer_in_retrieved"],
        "answer_in_context": contains_answer(context, q.answers),
        "tokens_in": base["tokens_in"],
        "tokens_out": rec["tokens_out"],
        "empty": rec["empty"],
        "prediction": prediction,
        "em": exact_match(prediction, q.answers) if generates else None,
        "f1": f1_score(prediction, q.answers) if generates else None,
        # Lenient accuracy: a gold answer appears in the prediction (small models answer in sentences).
        "acc": (int(contains_answer(prediction or "", q.answers)) if generates else None),
        "latency_ms": {"retrieve": _r(retrieve_ms), "compress": _r(compress_ms),
                       "generate": _r(generate_ms), "total": _r(total_ms)},
    }


def aggregate(per_q: list[dict[str, Any]], generates: bool) -> dict[str, Any]:
    """The report's metrics over per-question records (recalls are micro-averaged)."""
    n = len(per_q)
    tin = sum(r["tokens_in"] for r in per_q)
    tout = sum(r["tokens_out"] for r in per_q)
    titles = sum(len(r["titles"]) for r in per_q)
    found = sum(r["titles_found"] for r in per_q)
    ev_retr = sum(r["evidence_in_retrieved"] for r in per_q)
    ev_kept = sum(r["evidence_kept"] for r in per_q)
    ans_retr = [r for r in per_q if r["answer_in_retrieved"]]
    ans_kept = sum(r["answer_in_context"] for r in ans_retr)
    latency = {}
    for stage in STAGES:
        vals = [r["latency_ms"][stage] for r in per_q if r["latency_ms"][stage] is not None]
        latency[stage] = {"p50": _r(percentile(vals, 50)), "p95": _r(percentile(vals, 95))}
    return {
        "n": n,
        "tokens_in": tin,
        "tokens_out": tout,
        "compression_ratio": _r(ratio(tin, tout), 4),
        "retrieval_recall": _r(ratio(found, titles), 4),
        "evidence_recall": _r(ratio(ev_kept, ev_retr), 4),
        "answer_kept": _r(ratio(ans_kept, len(ans_retr)), 4),
        "em": _r(sum(r["em"] for r in per_q) / n, 4) if generates and n else None,
        "f1": _r(sum(r["f1"] for r in per_q) / n, 4) if generates and n else None,
        "acc": _r(sum(r["acc"] for r in per_q) / n, 4) if generates and n else None,
        "empty_rate": _r(ratio(sum(r["empty"] for r in per_q), n), 4),
        "latency_ms": latency,
        "counts": {"titles": titles, "titles_found": found, "evidence": sum(r["evidence"] for r in per_q),
                   "evidence_in_retrieved": ev_retr, "evidence_kept": ev_kept,
                   "answer_in_retrieved": len(ans_retr), "answer_kept": ans_kept},
    }


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(float(x), digits)


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)
