"""`ragcomp kv precompute` and `ragcomp kv ask`: fill a KV store once, answer from it later.

    ragcomp kv precompute --store disk:/tmp/kv --limit 500
    ragcomp kv ask "Who painted the Mona Lisa?" --store disk:/tmp/kv --top-k 10 --compare
    ragcomp kv ask "Who signed the treaty?" --long report.txt --page-budget 1024 --compare
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

DEFAULT_STORE = "disk:~/.cache/ragcomp/kv"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("kv", help="precompute document KV caches and answer from them")
    kv_sub = parser.add_subparsers(dest="kv_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="smollm2-135m", help="offline alias, hub id or local path")
        p.add_argument("--store", default=DEFAULT_STORE,
                       help="memory | disk:DIR | redis://HOST:PORT/DB | redis+cluster://HOST:PORT")
        p.add_argument("--storage", default="native", choices=["native", "bf16", "fp16", "fp8", "int8"])
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
        p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on GPU, fp32 on CPU)")
        p.add_argument("--corpus", default="wiki", help="'wiki' (packaged) or a JSON / JSONL file")
        p.add_argument("--max-chunk-tokens", type=int, default=512)

    pre = kv_sub.add_parser("precompute", help="encode passages of a corpus into the store")
    common(pre)
    pre.add_argument("--limit", type=int, default=None, help="only the first N passages")
    pre.add_argument("--ids", default=None, help="comma-separated passage ids (instead of --limit)")
    pre.add_argument("--batch-size", type=int, default=8)
    pre.set_defaults(func=_precompute)

    ask = kv_sub.add_parser("ask", help="answer a question from cached KV of retrieved passages")
    common(ask)
    ask.add_argument("question")
    ask.add_argument("--ids", default=None, help="comma-separated passage ids (else retrieve --top-k)")
    ask.add_argument("--top-k", type=int, default=10)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--reuse", default="exact", choices=["exact", "chunks"],
                     help="exact: cached prompt prefix, answers equal a full prefill (default); "
                          "chunks: each chunk's KV moved into place (approximate, --repair applies)")
    ask.add_argument("--repair", default="none",
                     help="with --reuse chunks: none | first:N | deviation:SHARE | attention:SHARE")
    ask.add_argument("--compare", action="store_true", help="also answer by full prefill and compare")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--long", default=None, metavar="FILE",
                     help="answer from the best KV pages of this long text file (encoded once, by --doc-id)")
    ask.add_argument("--doc-id", default=None, help="--long: the document's id (default: file name)")
    ask.add_argument("--page-budget", type=int, default=1024, help="--long: page tokens kept (0: every page)")
    ask.add_argument("--page-tokens", type=int, default=64, help="--long: tokens per page")
    ask.add_argument("--scoring", default="hybrid", choices=["attention", "embedding", "hybrid"])
    ask.set_defaults(func=_ask)


def _open(args: argparse.Namespace) -> Any:
    from ragcomp.kv.cache import KVCache

    store = args.store
    if store.startswith("disk:~"):
        import os

        store = "disk:" + os.path.expanduser(store[len("disk:"):])
    return KVCache(args.model, store, device=args.device, dtype=args.dtype, storage=args.storage,
                   max_chunk_tokens=args.max_chunk_tokens)


def _precompute(args: argparse.Namespace) -> int:
    from ragcomp.corpus import load_corpus

    passages = load_corpus(args.corpus)
    if args.ids:
        wanted = [i.strip() for i in args.ids.split(",") if i.strip()]
        by_id = {p.id: p for p in passages}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"ids not in corpus {args.corpus!r}: {', '.join(missing[:5])}")
        passages = [by_id[i] for i in wanted]
    elif args.limit is not None:
        passages = passages[: args.limit]
    kv = _open(args)
    kv.batch_size = args.batch_size
    t0 = time.perf_counter()
    step = 64
    for i in range(0, len(passages), step):
        kv.add(passages[i : i + step], keep=False)
        done = min(i + step, len(passages))
        print(f"\r{done}/{len(passages)} passages, {time.perf_counter() - t0:.1f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    tokens = sum(len(c) for p in passages for c in kv.passage_chunks(p))
    print(json.dumps({"passages": len(passages), "tokens": tokens,
                      "kv_bytes_native": tokens * kv.engine.kv_bytes_per_token, "storage": args.storage,
                      "seconds": round(time.perf_counter() - t0, 2), "store": args.store}))
    kv.close()
    return 0


def _ask(args: argparse.Namespace) -> int:
    from ragcomp.types import Passage

    if args.long:
        return _ask_long(args)
    kv = _open(args)
    items: list[Passage | str]
    if args.ids:
        items = [i.strip() for i in args.ids.split(",") if i.strip()]
    else:
        from ragcomp.retrieval import CorpusRetriever

        retriever = CorpusRetriever.for_corpus(args.corpus, progress=True)
        items = list(retriever.retrieve(args.question, args.top_k))
    ans = kv.generate(args.question, items, max_new_tokens=args.max_new_tokens, repair=args.repair,
                      reuse=args.reuse)
    out: dict[str, Any] = {"question": args.question, "answer": ans.text,
                           "passages": [p.id if isinstance(p, Passage) else p for p in items],
                           "stats": ans.stats.to_dict()}
    if args.compare:
        full = kv.generate_full(args.question, items, max_new_tokens=args.max_new_tokens)
        out["full_prefill_answer"] = full.text
        out["same_answer"] = full.token_ids == ans.token_ids
        out["full_prefill_ttft"] = full.stats.ttft
        out["ttft_ratio"] = full.stats.ttft / ans.stats.ttft if ans.stats.ttft else None
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        s = ans.stats
        print(ans.text)
        print(f"-- {s.context_tokens} context tokens; hits gpu/cpu/store {s.hits['gpu']}/{s.hits['cpu']}/"
              f"{s.hits['store']}, misses {s.misses}; ttft {s.ttft:.3f} s (load {s.seconds_load:.3f}, "
              f"rotate {s.seconds_rotate:.3f}, repair {s.seconds_repair:.3f}, question "
              f"{s.seconds_prefill_question:.3f}); decode {s.seconds_decode:.3f} s", file=sys.stderr)
        if args.reuse == "exact":
            print(f"-- loaded {s.blocks_loaded} block(s) / {s.tokens_loaded} tokens, prefilled "
                  f"{s.blocks_prefilled} block(s) / {s.tokens_prefilled} tokens", file=sys.stderr)
        if args.compare:
            print(f"-- full prefill: ttft {out['full_prefill_ttft']:.3f} s ({out['ttft_ratio']:.1f}x); "
                  f"same answer: {out['same_answer']}", file=sys.stderr)
    kv.close()
    return 0


def _ask_long(args: argparse.Namespace) -> int:
    """`ragcomp kv ask --long FILE`: KV page retrieval over one long document."""
    from pathlib import Path

    path = Path(args.long)
    if not path.is_file():
        raise FileNotFoundError(f"--long {args.long}: no such file")
    kv = _open(args)
    doc_id = args.doc_id or path.name
    kv.add_long(doc_id, path.read_text(encoding="utf-8"), page_tokens=args.page_tokens)
    budget = args.page_budget if args.page_budget > 0 else None
    ans = kv.ask_long(args.question, doc_id, budget, scoring=args.scoring, max_new_tokens=args.max_new_tokens)
    s = ans.stats
    out: dict[str, Any] = {"question": args.question, "answer": ans.text, "document": doc_id,
                           "stats": {**s.to_dict(), "bytes_touched": s.bytes_touched}}
    if args.compare and budget is not None:
        full = kv.ask_long(args.question, doc_id, None, max_new_tokens=args.max_new_tokens)
        out["full_context_answer"] = full.text
        out["same_answer"] = full.token_ids == ans.token_ids
        out["full_context_ttft"] = full.stats.ttft
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(ans.text)
        print(f"-- {s.pages_kept}/{s.pages_total} pages ({s.kept_tokens}/{s.document_tokens} tokens, "
              f"{s.scoring}); read {s.bytes_touched / 1e6:.1f} MB of {s.bytes_all_pages / 1e6:.1f} MB; "
              f"ttft {s.ttft:.3f} s (score {s.seconds_score:.3f}, load {s.seconds_load:.3f}, rotate "
              f"{s.seconds_rotate:.3f}, question {s.seconds_prefill_question:.3f}); decode "
              f"{s.seconds_decode:.3f} s", file=sys.stderr)
        if "full_context_answer" in out:
            print(f"-- full context: {out['full_context_answer']!r} (ttft {out['full_context_ttft']:.3f} s); "
                  f"same answer: {out['same_answer']}", file=sys.stderr)
    kv.close()
    return 0
