"""`ragcomp eval`: compression, kept evidence, answer quality and latency of methods, side by side."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

# The suite's default methods (kept here too so that --help does not import torch).
DEFAULT_METHODS = ("recomp-extractive", "provence", "rerank", "lingua", "exit")

EXAMPLE = """examples:
  ragcomp eval --data qa.jsonl --method recomp-extractive --baseline
  ragcomp eval --data qa.jsonl --method rerank,recomp-extractive --param rerank.top_n=3 \\
      --baseline --reader smollm2-135m --json out/eval.json --markdown out/eval.md --plot out/eval.png
  ragcomp eval --data qa.jsonl --method rerank,recomp-extractive --baseline \
      --sweep rerank.top_n=1,3,5 --sweep recomp-extractive.top_k=2,4,8 --plot sweep.png
  ragcomp eval --data qa.jsonl --method rerank --reader openai:gpt-4o-mini --base-url http://localhost:8000/v1
  ragcomp eval --data qa.jsonl --retrieve-k 3 --method xrag --baseline --no-retrieval --reader smollm2-135m
  ragcomp eval --suite benchmarks/domains --method recomp-extractive,provence --limit 50 \\
      --markdown out/suite.md
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="measure methods' compression, kept evidence, answer quality and latency",
        description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="questions, JSONL like qa_dev.jsonl (or give --suite)")
    p.add_argument("--suite", metavar="DIR",
                   help="a multi-domain suite (python3 -m ragcomp.eval.domains build --out DIR; committed in "
                   "benchmarks/domains): every domain with its own index, the uncompressed row and a naive "
                   "row beside each method; methods default to " + ", ".join(DEFAULT_METHODS))
    p.add_argument("--split", default="dev", choices=("dev", "test"), help="suite split (default dev)")
    p.add_argument("--domain", action="append", metavar="NAME", help="suite: only these domains (repeatable)")
    p.add_argument("--no-naive", action="store_true", help="suite: leave out the naive rows")
    p.add_argument("--corpus", default="wiki",
                   help="'wiki' (the packaged Wikipedia summaries) or a JSON/JSONL file")
    p.add_argument("--retrieve-k", type=int, default=10, metavar="K", help="passages retrieved per question")
    p.add_argument("--method", action="append", default=[], metavar="NAME",
                   help="method to run; repeat it or give a comma list; 'none' is the uncompressed context")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter; KEY goes to every method that takes it, METHOD.KEY to one")
    p.add_argument("--baseline", action="store_true", help="also run the uncompressed top-k (method 'none')")
    p.add_argument("--no-retrieval", action="store_true",
                   help="also run the closed-book row: the reader answers with no context "
                   "(method 'no-retrieval')")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="run each method that takes KEY (or METHOD.KEY) once per value; repeatable")
    p.add_argument("--reader", default="none",
                   help="none (context only), a local model (smollm2-135m) or openai:MODEL")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint for openai:MODEL (default $OPENAI_BASE_URL "
                   "or https://api.openai.com/v1); the key comes from $OPENAI_API_KEY")
    p.add_argument("--tokenizer",
                   help="token counter (default: the reader's own; cl100k for remote and none)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit for the reader")
    p.add_argument("--timeout", type=float, default=60.0, help="remote reader: seconds per request")
    p.add_argument("--retries", type=int, default=4, help="remote reader: retries on 429/5xx/timeouts")
    p.add_argument("--batch-size", type=int, default=1,
                   help="questions compressed and read per batch (default 1: true per-question latency; "
                   "larger is faster, with compress and generate latency the batch time over its size)")
    p.add_argument("--limit", type=int, help="only the first N questions (per domain with --suite)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (1 is fastest on a shared 2-core machine: two threads stall "
                   "on each other when another process holds a core)")
    p.add_argument("--embedder", default="minilm", help="retrieval embedder (alias, hub id or path)")
    p.add_argument("--index-dir", help="where the FAISS index is cached (default: under the ragcomp cache)")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write the full report here")
    p.add_argument("--markdown", metavar="OUT.md", help="write the table as markdown here")
    p.add_argument("--plot", metavar="OUT.png", help="write a chart of compression vs. kept answers here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ragcomp.cli import parse_params
    from ragcomp.eval.report import markdown, plot
    from ragcomp.eval.runner import evaluate

    if (args.data is None) == (args.suite is None):
        raise ValueError("give --data FILE or --suite DIR (one of them)")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.suite:
        return run_suite_cli(args)
    if not args.method and not args.baseline and not args.no_retrieval:
        raise ValueError("give --method NAME (repeatable or a comma list), --baseline and/or --no-retrieval")
    if args.plot:
        from ragcomp._optional import require

        require("matplotlib", "plot")  # before the run, not after it
    reader = args.reader
    if args.base_url and not reader.startswith("openai:"):
        raise ValueError(f"--base-url is for --reader openai:MODEL, not {reader!r}")
    if reader.startswith("openai:"):
        from ragcomp.llm.openai import OpenAIReader

        reader = OpenAIReader(reader[len("openai:"):], base_url=args.base_url, tokenizer=args.tokenizer,
                              max_tokens=args.max_new_tokens, timeout=args.timeout, max_retries=args.retries)
    with warnings.catch_warnings():
        # Show data warnings at once, as one plain line, not after a long run.
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = _show_warning
        report = evaluate(
            args.data, method=args.method, params=parse_params(args.param), corpus=args.corpus,
            retrieve_k=args.retrieve_k, reader=reader, baseline=args.baseline, limit=args.limit,
            sweep=args.sweep, tokenizer=args.tokenizer, device=args.device, embedder=args.embedder,
            index_dir=args.index_dir, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            progress=not args.quiet, no_retrieval=args.no_retrieval,
        )
    _write_outputs(args, report, markdown(report))
    if args.plot:
        print(f"wrote {plot(report, args.plot)}", file=sys.stderr)
    return 0


def run_suite_cli(args: argparse.Namespace) -> int:
    """`ragcomp eval --suite DIR`: the per-domain and across-domain tables."""
    from ragcomp.cli import parse_params
    from ragcomp.eval.suite import run_suite
    from ragcomp.eval.suite_report import suite_markdown

    for flag, value in (("--reader", args.reader != "none"), ("--plot", args.plot), ("--sweep", args.sweep),
                        ("--no-retrieval", args.no_retrieval)):
        if value:
            raise ValueError(f"{flag} is not supported with --suite")
    methods = args.method or list(DEFAULT_METHODS)
    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = _show_warning
        report = run_suite(args.suite, methods, split=args.split, domains=args.domain, limit=args.limit,
                           params=parse_params(args.param), retrieve_k=args.retrieve_k, baseline=True,
                           naive=not args.no_naive, tokenizer=args.tokenizer, device=args.device,
                           embedder=args.embedder, index_root=args.index_dir, batch_size=args.batch_size,
                           progress=not args.quiet)
    _write_outputs(args, report, suite_markdown(report))
    return 0


def _write_outputs(args: argparse.Namespace, report: dict, text: str) -> None:
    """Print the markdown; write --json and --markdown where asked."""
    from ragcomp.eval.report import write_json

    print(text)
    if args.json_out:
        print(f"wrote {write_json(report, args.json_out)}", file=sys.stderr)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    print(f"ragcomp eval: warning: {message}", file=sys.stderr, flush=True)
