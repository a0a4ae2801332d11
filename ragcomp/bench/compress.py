"""`ragcomp bench compress`: the foundation's figures, side by side in one run.

1. recomp-extractive at its defaults against fixed top-k sentence selection: tokens in and
   out (reader tokenizer), compression ratio, answers still present among those retrieval found.
2. Compressor overhead per question on this machine: cold embedding cache, then warm.
3. LlamaIndex's SentenceEmbeddingOptimizer against RagcompPostprocessor, same embedder
   (MiniLM), same questions and retrieved nodes: answers kept, tokens out, time per question.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from ragcomp.bench import print_table
from ragcomp.bench.common import QA_DEFAULT


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="recomp-extractive vs top-k, overhead, vs LlamaIndex optimizer")
    p.add_argument("--data", default=str(QA_DEFAULT), help="questions JSONL (qa_dev format)")
    p.add_argument("--retrieve-k", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer that counts tokens")
    p.add_argument("--skip-llama-index", action="store_true", help="skip the LlamaIndex comparison")
    p.add_argument("--json", default=None, help="write all rows to this JSON file")
    p.set_defaults(func=run)


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.replace("\xa0", " ")).strip().lower()


def _has_answer(answers: list[str], text: str) -> bool:
    t = _norm(text)
    return any(_norm(a) in t for a in answers)


def _load(path: str, limit: int | None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def run(args: argparse.Namespace) -> int:
    from ragcomp.compressors.recomp_extractive import RecompExtractive
    from ragcomp.embeddings import CachedEmbedder
    from ragcomp.retrieval import CorpusRetriever
    from ragcomp.stores import MemoryStore
    from ragcomp.tokens import get_counter

    qs = _load(args.data, args.limit)
    retriever = CorpusRetriever.for_corpus("wiki")
    questions = [q["question"] for q in qs]
    passages = retriever.retrieve_batch(questions, args.retrieve_k)
    counter = get_counter(args.tokenizer)
    found = [_has_answer(q["answers"], "\n\n".join(p.text for p in ps))
             for q, ps in zip(qs, passages, strict=True)]
    n_found = sum(found)
    print(f"{len(qs)} questions, top-{args.retrieve_k}; retrieval found the answer for {n_found}", flush=True)

    shared = retriever.embedder  # the same MiniLM model for every row

    def row(name: str, comp: Any) -> dict[str, Any]:
        results = comp.compress_batch(questions, passages)
        tin = sum(r.tokens_in for r in results)
        tout = sum(r.tokens_out for r in results)
        kept = sum(1 for q, r, f in zip(qs, results, found, strict=True)
                   if f and _has_answer(q["answers"], r.context))
        return {"method": name, "tokens_in": tin, "tokens_out": tout,
                "ratio": tin / max(tout, 1), "answer_kept": kept / max(n_found, 1),
                "empty": sum(r.empty for r in results)}

    quality = [
        row("recomp-extractive (defaults)", RecompExtractive(shared, tokenizer=counter)),
        *[row(f"top-{k} sentences, sentence score only",
              RecompExtractive(shared, top_k=k, threshold=None, passage_weight=0.0, tokenizer=counter))
          for k in (4, 5, 6)],
        row("margin 0.25 to best, top_k=6", RecompExtractive(
            shared, top_k=6, threshold=None, relative=0.25, tokenizer=counter)),
        row("margin 0.25 to best, top_k=6, sentence only", RecompExtractive(
            shared, top_k=6, threshold=None, relative=0.25, passage_weight=0.0, tokenizer=counter)),
    ]
    print_table(quality, "Compression and kept answers (reader tokenizer: " + counter.name + ")")

    # Overhead: a fresh cache (every sentence embedded), then the same questions again.
    cold_emb = CachedEmbedder(shared.embedder, store=MemoryStore())
    comp = RecompExtractive(cold_emb, tokenizer=counter)
    cold = _per_question(comp, questions, passages)
    warm = _per_question(comp, questions, passages)
    print_table([
        {"cache": "cold", "p50_ms": statistics.median(cold) * 1e3, "mean_ms": statistics.fmean(cold) * 1e3},
        {"cache": "warm", "p50_ms": statistics.median(warm) * 1e3, "mean_ms": statistics.fmean(warm) * 1e3},
    ], "recomp-extractive overhead per question (this machine, CPU)")

    rows_li: list[dict[str, Any]] = []
    if not args.skip_llama_index:
        rows_li = _vs_llama_index(qs, questions, passages, found, shared, counter)
    if args.json:
        Path(args.json).write_text(json.dumps({"quality": quality, "cold_s": cold, "warm_s": warm,
                                               "llama_index": rows_li}, indent=2))
    return 0


def _per_question(comp: Any, questions: list[str], passages: list[list[Any]]) -> list[float]:
    times = []
    for q, ps in zip(questions, passages, strict=True):
        t = time.perf_counter()
        comp.compress(q, ps)
        times.append(time.perf_counter() - t)
    return times


def _vs_llama_index(qs, questions, passages, found, shared, counter) -> list[dict[str, Any]]:
    from llama_index.core.postprocessor import SentenceEmbeddingOptimizer
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from ragcomp.embeddings import CachedEmbedder
    from ragcomp.integrations.llama_index import RagcompEmbedding, RagcompPostprocessor
    from ragcomp.stores import MemoryStore

    n_found = max(sum(found), 1)
    nodes_per_q = [[NodeWithScore(node=TextNode(text=p.text, id_=p.id), score=p.score) for p in ps]
                   for ps in passages]
    # The optimizer gets the same MiniLM model with no cache: it has none of its own.
    no_cache = RagcompEmbedding(embedder=CachedEmbedder(shared.embedder, store=MemoryStore(max_bytes=0)))

    def measure(name: str, post: Any, warmup: bool) -> dict[str, Any]:
        if warmup:  # fill our embedding cache with these questions' sentences first
            for q, nodes in zip(questions, nodes_per_q, strict=True):
                post.postprocess_nodes(copy.deepcopy(nodes), QueryBundle(q))
        times, tout, kept, errors = [], 0, 0, 0
        for q, nodes, f, item in zip(questions, nodes_per_q, found, qs, strict=True):
            work = copy.deepcopy(nodes)  # the optimizer rewrites nodes in place
            t = time.perf_counter()
            try:
                out = post.postprocess_nodes(work, QueryBundle(q))
            except ValueError:  # "Optimizer returned zero sentences."
                out, errors = [], errors + 1
            times.append(time.perf_counter() - t)
            context = "\n\n".join(n.node.get_content() for n in out)
            tout += counter.count(context) if context else 0
            kept += bool(f and _has_answer(item["answers"], context))
        return {"postprocessor": name, "answer_kept": kept / n_found, "tokens_out": tout,
                "ms_per_question": statistics.fmean(times) * 1e3, "errors": errors}

    rows = [
        measure("SentenceEmbeddingOptimizer(percentile_cutoff=0.5)",
                SentenceEmbeddingOptimizer(embed_model=no_cache, percentile_cutoff=0.5), False),
        measure("SentenceEmbeddingOptimizer(threshold_cutoff=0.4)",
                SentenceEmbeddingOptimizer(embed_model=no_cache, threshold_cutoff=0.4), False),
        measure("RagcompPostprocessor recomp-extractive (cold cache)",
                RagcompPostprocessor(compressor=_fresh(shared, counter)), False),
        measure("RagcompPostprocessor recomp-extractive (warm cache)",
                RagcompPostprocessor(compressor=_fresh(shared, counter)), True),
        measure("RagcompPostprocessor recomp-extractive top_k=10 (warm cache)",
                RagcompPostprocessor(compressor=_fresh(shared, counter, top_k=10)), True),
    ]
    base = rows[0]["ms_per_question"]
    for r in rows:
        r["speedup_vs_optimizer_p0.5"] = base / r["ms_per_question"]
    print_table(rows, "LlamaIndex SentenceEmbeddingOptimizer vs RagcompPostprocessor (same MiniLM)")
    return rows


def _fresh(shared: Any, counter: Any, **params: Any) -> Any:
    from ragcomp.compressors.recomp_extractive import RecompExtractive
    from ragcomp.embeddings import CachedEmbedder
    from ragcomp.stores import MemoryStore

    return RecompExtractive(CachedEmbedder(shared.embedder, store=MemoryStore()), tokenizer=counter, **params)
