"""`ragcomp demo`: retrieve from 10,033 Wikipedia summaries, compress, answer, offline.

The first run embeds the corpus into a FAISS index under the ragcomp cache (with a progress
bar) and converts SmolLM2 to safetensors; later runs load both and answer within seconds.
"""

from __future__ import annotations

import argparse
import textwrap
import time

DEFAULT_QUESTIONS = [
    "What protective equipment is usually worn in boxing?",
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="retrieve, compress and answer over offline Wikipedia summaries")
    p.add_argument("--question", "-q", action="append", help="ask this (repeatable); default: 3 samples")
    p.add_argument("--retrieve-k", type=int, default=10, help="passages retrieved per question")
    p.add_argument("--method", default="recomp-extractive", help="compression method (ragcomp methods)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--reader", default="smollm2-135m", help="local LM that answers; 'none' to skip")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ragcomp.cli import parse_params
    from ragcomp.registry import load_compressor
    from ragcomp.retrieval import CorpusRetriever

    if args.retrieve_k < 1:
        raise ValueError(f"--retrieve-k must be >= 1, got {args.retrieve_k}")
    questions = args.question or DEFAULT_QUESTIONS
    t0 = time.perf_counter()
    print("Loading the Wikipedia index (built once, then reused) ...", flush=True)
    retriever = CorpusRetriever.for_corpus("wiki", device=args.device)
    reader = None
    tokenizer = "cl100k"
    if args.reader != "none":
        from ragcomp.llm.local import LocalReader

        reader = LocalReader(args.reader, device=args.device)
        tokenizer = reader.tokenizer
    params = {"tokenizer": tokenizer, **parse_params(args.param)}
    compressor = load_compressor(args.method, **params)
    print(f"Ready in {time.perf_counter() - t0:.1f} s: {len(retriever)} passages, method "
          f"{args.method}, tokens counted with {tokenizer}.\n", flush=True)
    for q in questions:
        _one(q, retriever, compressor, reader, args.retrieve_k)
    return 0


def _one(question: str, retriever, compressor, reader, k: int) -> None:
    t = time.perf_counter()
    passages = retriever.retrieve(question, k=k)
    t_retrieve = time.perf_counter() - t
    result = compressor.compress(question, passages)
    print("=" * 78)
    print(f"Q: {question}")
    print(f"retrieved {len(passages)} passages in {t_retrieve * 1000:.0f} ms; compressed in "
          f"{result.seconds * 1000:.0f} ms: {result.tokens_in} -> {result.tokens_out} tokens "
          f"({result.ratio:.1f}x fewer)" if result.tokens_out else
          f"retrieved {len(passages)} passages; the compressor kept nothing (selective augmentation)")
    for item in result.kept:
        print(f"  [{item.passage.id}] score {item.score:.2f}")
        print(textwrap.indent(textwrap.fill(item.text, 74), "    "))
    if reader is None:
        return
    full_context = compressor.separator.join(p.text for p in passages)
    for label, context in (("full context", full_context), ("compressed", result.context or None)):
        t = time.perf_counter()
        answer = reader.answer(question, context)
        print(f"  answer with {label:<12} ({time.perf_counter() - t:4.1f} s): {answer}")
    print(flush=True)
