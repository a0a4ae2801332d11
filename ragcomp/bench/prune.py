"""`ragcomp bench prune`: sentence-pruning benchmarks, printed as tables.

--part exit-speed   EXIT's classifier on qa_dev questions with their top-k retrieved passages:
                    batched shared-prefix scoring against one full forward per sentence (the
                    published code's way), same model, same token ids, same run. Interleaved per
                    question (alternating which goes first) so both see the same machine state.
                    Reports p50 seconds per question, the speedup, forward passes per question,
                    and how often the two agree on keep/drop: at --threshold, and at the median
                    score of the run (SmolLM2 zero-shot scores sit below 0.5, so agreement at 0.5
                    alone would be trivially 1.0). tokens_run counts the tokens each path
                    feeds the model; on CPU time follows it, so token_ratio bounds the speedup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp.bench import print_table

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "qa_dev.jsonl"
PARTS = ("exit-speed",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="sentence pruning: EXIT batched vs per-sentence scoring")
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="questions JSONL (qa_dev format)")
    p.add_argument("--limit", type=int, default=10, help="first N questions")
    p.add_argument("--retrieve-k", type=int, default=3, help="passages per question")
    p.add_argument("--model", default="smollm2-135m", help="causal LM: alias, hub id or local path")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder (EXIT's, for instance)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=16, help="sentences per batched forward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the rows and per-question times here")
    p.set_defaults(func=run)


def _load(path: str, limit: int | None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")
    out: dict[str, Any] = {}
    if args.part in ("exit-speed", "all"):
        out["exit-speed"] = exit_speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def exit_speed(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ragcomp.compressors.exit import ExitCompressor
    from ragcomp.retrieval import CorpusRetriever

    if args.threads:
        torch.set_num_threads(args.threads)
    qs = _load(args.data, args.limit)
    questions = [q["question"] for q in qs]
    passages = CorpusRetriever.for_corpus("wiki").retrieve_batch(questions, args.retrieve_k)
    comp = ExitCompressor(args.model, adapter=args.adapter, threshold=args.threshold, device=args.device,
                          dtype=args.dtype, batch_size=args.batch_size)
    lm = comp.lm
    calls = [0]
    hook = lm.model.get_decoder().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    comp.score(questions[0], passages[0][:1])  # warm-up: template, allocator, lazy imports
    times: dict[str, list[float]] = {"batched": [], "per_sentence": []}
    forwards: dict[str, list[int]] = {"batched": [], "per_sentence": []}
    scores: dict[str, list[np.ndarray]] = {"batched": [], "per_sentence": []}
    n_sent, n_tokens, n_batched_tokens = [], [], []
    try:
        for i, (q, ps) in enumerate(zip(questions, passages, strict=True)):
            order = ("batched", "per_sentence") if i % 2 == 0 else ("per_sentence", "batched")
            for method in order:
                calls[0] = 0
                t = time.perf_counter()
                got = comp.score(q, ps, method=method)
                times[method].append(time.perf_counter() - t)
                forwards[method].append(calls[0])
                scores[method].append(np.concatenate(got) if got else np.zeros(0, np.float32))
            units, shared = comp._units(q, ps)
            n_sent.append(sum(len(u.rows) for u in units))
            n_tokens.append(sum(len(u.prefix) + len(r) for u in units for r in u.rows))
            # Distinct tokens the batched path runs: the shared part once, each context once.
            row_tokens = sum(len(r) for u in units for r in u.rows)
            n_batched_tokens.append(shared + sum(len(u.prefix) - shared for u in units) + row_tokens)
            print(f"  q{i + 1}: {n_sent[-1]} sentences, batched {times['batched'][-1]:.2f}s, "
                  f"per-sentence {times['per_sentence'][-1]:.2f}s", flush=True)
    finally:
        hook.remove()
    b, s = np.concatenate(scores["batched"]), np.concatenate(scores["per_sentence"])
    median = float(np.median(b))
    device = f"{lm.device}, {str(lm.dtype).replace('torch.', '')}, {torch.get_num_threads()} thread(s)"
    rows = [{
        "scoring": name,
        "p50_s_per_question": statistics.median(times[m]),
        "mean_s_per_question": statistics.fmean(times[m]),
        "forwards_per_question": statistics.fmean(forwards[m]),
        "tokens_run_per_question": statistics.fmean(tok),
    } for name, m, tok in (("batched shared prefix", "batched", n_batched_tokens),
                           ("one forward per sentence", "per_sentence", n_tokens))]
    print_table(rows, f"EXIT scoring time, {len(qs)} qa_dev questions x top-{args.retrieve_k} "
                      f"({lm.name}, {device})")
    summary = {
        "questions": len(qs),
        "sentences_per_question": statistics.fmean(n_sent),
        "prompt_tokens_per_sentence": sum(n_tokens) / max(sum(n_sent), 1),
        "speedup_p50": statistics.median(times["per_sentence"]) / statistics.median(times["batched"]),
        "speedup_total": sum(times["per_sentence"]) / sum(times["batched"]),
        "token_ratio": sum(n_tokens) / max(sum(n_batched_tokens), 1),
        f"same_decisions@{args.threshold:g}": float(np.mean((b >= args.threshold) == (s >= args.threshold))),
        f"same_decisions@median({median:.3f})": float(np.mean((b >= median) == (s >= median))),
        "max_abs_diff_p_yes": float(np.abs(b - s).max()) if len(b) else 0.0,
        "kept@threshold": float(np.mean(b >= args.threshold)) if len(b) else 0.0,
    }
    print_table([summary], "Batched vs per-sentence: speedup and agreement")
    return {"rows": rows, "summary": summary, "times": times, "forwards": forwards}
