"""`ragcomp bench prune`: sentence-pruning benchmarks, printed as tables.

--part exit-speed   EXIT's classifier on qa_dev questions with their top-k retrieved passages:
                    every scoring path against one full forward per sentence (the published
                    code's way): batched shared-prefix KV cache, single pass (one block-masked
                    forward), and single pass over all questions in one score_batch call. Same
                    model, same token ids, same run; interleaved per question (each path goes
                    first in turn) so all see the same machine state. Reports forward passes
                    and p50 seconds per question, the speedup, and how often each path agrees
                    with per-sentence scoring on keep/drop: at --threshold, and at the median
                    score of the run (SmolLM2 zero-shot scores sit below 0.5, so agreement at 0.5
                    alone would be trivially 1.0). tokens_run counts the distinct tokens each path
                    feeds the model; on CPU time follows it (token_ratio bounds the speedup), on
                    a GPU the number of forwards does.
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
from ragcomp.bench.common import QA_DEFAULT

PARTS = ("exit-speed",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="sentence pruning: EXIT scoring paths vs per-sentence scoring")
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--data", default=str(QA_DEFAULT), help="questions JSONL (qa_dev format)")
    p.add_argument("--limit", type=int, default=10, help="first N questions")
    p.add_argument("--retrieve-k", type=int, default=3, help="passages per question")
    p.add_argument("--model", default="smollm2-135m", help="causal LM: alias, hub id or local path")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder (EXIT's, for instance)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep/drop cut for the agreement columns")
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


# (row label, ExitCompressor method); the first is the reference the others are compared with.
PATHS = (("one forward per sentence", "per_sentence"),
         ("batched shared prefix (KV cache)", "batched"),
         ("single pass (block mask)", "single_pass"))


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
    methods = [m for _, m in PATHS]
    for m in methods:  # warm-up: template, allocator, lazy imports, kernels of each path
        comp.score(questions[0], passages[0][:1], method=m)
    times: dict[str, list[float]] = {m: [] for m in methods}
    forwards: dict[str, list[int]] = {m: [] for m in methods}
    scores: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    n_sent, n_tokens, n_batched_tokens = [], [], []
    try:
        for i, (q, ps) in enumerate(zip(questions, passages, strict=True)):
            order = methods[i % len(methods):] + methods[: i % len(methods)]  # each path goes first in turn
            for method in order:
                calls[0] = 0
                t = time.perf_counter()
                got = comp.score(q, ps, method=method)
                times[method].append(time.perf_counter() - t)
                forwards[method].append(calls[0])
                scores[method].append(np.concatenate(got) if got else np.zeros(0, np.float32))
            units, shared = comp.units(q, ps)
            n_sent.append(sum(len(u.rows) for u in units))
            n_tokens.append(sum(len(u.prefix) + len(r) for u in units for r in u.rows))
            # Distinct tokens the batched and single-pass paths run: the shared part once, each context once.
            row_tokens = sum(len(r) for u in units for r in u.rows)
            n_batched_tokens.append(shared + sum(len(u.prefix) - shared for u in units) + row_tokens)
            print(f"  q{i + 1}: {n_sent[-1]} sentences, "
                  + ", ".join(f"{m} {times[m][-1]:.3f}s/{forwards[m][-1]} fwd" for m in methods), flush=True)
        # All questions in one score_batch call (compress_batch's path): time per question.
        calls[0] = 0
        t = time.perf_counter()
        together = comp.score_batch(questions, passages, method="single_pass")
        all_s = time.perf_counter() - t
        all_forwards = calls[0]
    finally:
        hook.remove()
    ref = np.concatenate(scores["per_sentence"])
    median = float(np.median(ref)) if len(ref) else 0.0
    thr = args.threshold

    def agreement(got: np.ndarray) -> dict[str, float]:
        return {f"same_decisions@{thr:g}": float(np.mean((got >= thr) == (ref >= thr))) if len(ref) else 1.0,
                f"same_decisions@median({median:.3f})":
                    float(np.mean((got >= median) == (ref >= median))) if len(ref) else 1.0,
                "max_abs_diff_p_yes": float(np.abs(got - ref).max()) if len(ref) else 0.0}

    ref_p50 = statistics.median(times["per_sentence"])
    tokens = {"per_sentence": n_tokens, "batched": n_batched_tokens, "single_pass": n_batched_tokens}
    rows = [{
        "scoring": name,
        "forwards_per_question": statistics.fmean(forwards[m]),
        "p50_s_per_question": statistics.median(times[m]),
        "mean_s_per_question": statistics.fmean(times[m]),
        "speedup_p50": ref_p50 / statistics.median(times[m]),
        "tokens_run_per_question": statistics.fmean(tokens[m]),
        **agreement(np.concatenate(scores[m])),
    } for name, m in PATHS]
    flat_together = np.concatenate([x for per_q in together for x in per_q]) if together else ref
    rows.append({
        "scoring": f"single pass, {len(qs)} questions per score_batch",
        "forwards_per_question": all_forwards / len(qs),
        "p50_s_per_question": all_s / len(qs),  # one call: its time shared out, no per-question p50
        "mean_s_per_question": all_s / len(qs),
        "speedup_p50": ref_p50 / (all_s / len(qs)),
        "tokens_run_per_question": statistics.fmean(n_batched_tokens),
        **agreement(flat_together),
    })
    device = f"{lm.device}, {str(lm.dtype).replace('torch.', '')}, {torch.get_num_threads()} thread(s)"
    print_table(rows, f"EXIT scoring time, {len(qs)} qa_dev questions x top-{args.retrieve_k} "
                      f"({lm.name}, {device}); speedup and agreement against one forward per sentence")
    summary = {
        "questions": len(qs),
        "sentences_per_question": statistics.fmean(n_sent),
        "prompt_tokens_per_sentence": sum(n_tokens) / max(sum(n_sent), 1),
        "token_ratio": sum(n_tokens) / max(sum(n_batched_tokens), 1),
        f"p_yes>={thr:g}": float(np.mean(ref >= thr)) if len(ref) else 0.0,
        "p_yes_median": median,
    }
    print_table([summary], "Inputs")
    return {"rows": rows, "summary": summary, "times": times, "forwards": forwards}
