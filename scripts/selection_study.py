"""Study: sentence selection rules on recomp-extractive's cached scores, per dev domain.

Scores are computed once per question exactly as RecompExtractive._compress_batch does (MiniLM
cosine mixed with passage similarity, passage_weight 0.3), then many keep rules are applied to
the cached scores. Reports answers kept (suite definition) and compression ratio per domain.

    python3 scripts/selection_study.py --suite benchmarks/domains --split dev --limit 60
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ragcomp.compressors.recomp_extractive import _sentences
from ragcomp.embeddings import shared_embedder
from ragcomp.eval.metrics import contains_answer
from ragcomp.eval.runner import SEPARATOR
from ragcomp.eval.suite import load_domain, suite_domains
from ragcomp.models import cache_dir
from ragcomp.retrieval import CorpusRetriever
from ragcomp.tokens import get_counter

NON_ENGLISH = {"wiki-fr", "wiki-es"}
THRESHOLD = 0.1  # recomp-extractive's default absolute floor, applied under every rule


def rules() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for k in (3, 5, 8, 12):
        out[f"top_k={k}"] = {"top_k": k}
    for s in (0.05, 0.08, 0.10, 0.12, 0.15):
        out[f"share={s:.0%}"] = {"share": s}
    for r in (0.05, 0.1, 0.15, 0.2):
        out[f"relative={r}, cap 12"] = {"relative": r, "top_k": 12}
    out["share=10%, min 3"] = {"share": 0.10, "min": 3}
    out["share=8%, min 3"] = {"share": 0.08, "min": 3}
    out["share=12%, min 3"] = {"share": 0.12, "min": 3}
    out["share=10%, min 3, max 12"] = {"share": 0.10, "min": 3, "top_k": 12}
    out["relative=0.1 + share 10%, min 3"] = {"relative": 0.1, "share": 0.10, "min": 3}
    out["relative=0.15 + share 12%, min 3"] = {"relative": 0.15, "share": 0.12, "min": 3}
    return out


def select(scores: np.ndarray, costs: np.ndarray, tin: int, rule: dict) -> np.ndarray:
    """Indices (flat) of kept sentences for one question."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    ok = scores >= THRESHOLD
    if "relative" in rule and len(scores):
        ok &= scores >= scores.max() - rule["relative"]
    kept = [i for i in order if ok[i]]
    if "top_k" in rule:
        kept = kept[: rule["top_k"]]
    if "share" in rule:
        budget, used, fit = rule["share"] * tin, 0, []
        for i in kept:
            if used + costs[i] <= budget:
                fit.append(i)
                used += costs[i]
        kept = fit
    if len(kept) < rule.get("min", 0):
        extra = [i for i in order if i not in set(kept)]
        kept = kept + extra[: rule["min"] - len(kept)]
    return np.array(sorted(kept), dtype=int)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="benchmarks/domains")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--domains", default=None)
    ap.add_argument("--passage-weight", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    emb = shared_embedder("minilm", None)
    counter = get_counter("cl100k")
    names = args.domains.split(",") if args.domains else suite_domains(args.suite)
    table = rules()
    res: dict[str, dict[str, tuple[float, float]]] = {r: {} for r in table}
    w = args.passage_weight
    for name in names:
        t0 = time.perf_counter()
        dom = load_domain(args.suite, name, args.split, args.limit)
        index = Path(cache_dir()) / "indexes" / f"suite-{name}-minilm"
        retr = CorpusRetriever.build(dom.passages, "minilm", index, None, False)
        cached = []
        for q in dom.questions:
            ps = retr.retrieve(q.question, 10)
            ctx = SEPARATOR.join(p.text for p in ps)
            if not contains_answer(ctx, q.answers):
                continue  # the suite's denominator: questions whose top-10 held the answer
            sents = [_sentences(p.text) for p in ps]
            flat = [s.text for per in sents for s in per]
            owner = np.repeat(np.arange(len(ps)), [len(x) for x in sents])
            qv = emb.embed([q.question])[0]
            scores = emb.embed(flat) @ qv
            if w:
                psim = emb.embed([p.text for p in ps]) @ qv
                scores = (1 - w) * scores + w * psim[owner]
            costs = np.array([counter.count(t) for t in flat])
            cached.append((q, flat, owner, scores, costs, counter.count(ctx)))
        for label, rule in table.items():
            tin = tout = kept = 0
            for q, flat, owner, scores, costs, n_in in cached:
                idx = select(scores, costs, n_in, rule)
                parts: dict[int, list[str]] = {}
                for i in idx:
                    parts.setdefault(int(owner[i]), []).append(flat[i])
                text = SEPARATOR.join(" ".join(v) for _, v in sorted(parts.items()))
                tin += n_in
                tout += counter.count(text) if text else 0
                kept += contains_answer(text, q.answers)
            res[label][name] = (kept / max(len(cached), 1), tin / max(tout, 1))
        print(f"# {name}: {len(cached)}/{len(dom.questions)} questions with the answer in top-10, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    print("\n| rule | " + " | ".join(names) + " | mean |")
    print("|---" * (len(names) + 2) + "|")
    eng = [n for n in names if n not in NON_ENGLISH]
    gaps = []
    for label in table:
        cells = [f"{res[label][n][0]:.0%} @ {res[label][n][1]:.1f}x" for n in names]
        mk = np.mean([res[label][n][0] for n in names])
        mr = np.mean([res[label][n][1] for n in names])
        print(f"| {label} | " + " | ".join(cells) + f" | {mk:.0%} @ {mr:.1f}x |")
        # distance to target on English domains: worst shortfall in kept (vs 95%) and ratio (vs 10x)
        worst_k = min(res[label][n][0] for n in eng)
        worst_r = min(res[label][n][1] for n in eng)
        gaps.append((max(0.0, 0.95 - worst_k) + max(0.0, (10 - worst_r) / 10), label, worst_k, worst_r))
    print("\nClosest to the target (>= 95% kept at >= 10x on every English domain):")
    for g, label, wk, wr in sorted(gaps)[:4]:
        print(f"- {label}: worst English kept {wk:.0%}, worst English ratio {wr:.1f}x (gap score {g:.3f})")


if __name__ == "__main__":
    main()
