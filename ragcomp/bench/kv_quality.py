"""`ragcomp bench kv --part quality`: answers from assembled chunk KV against a full prefill.

On qa_dev questions with their top-k retrieved passages, per repair: how often the greedy
answer equals the full-prefill answer (and its first token), how often it contains a gold
answer, and the KL divergence of the first answer token's distribution from the full
prefill's (the same prompt ids, so any difference comes from independent chunk encoding).
"deviation:1.0" recomputes every token after the first chunk: a sanity row that must match
the full prefill. "exact" answers with `reuse="exact"` from the prompt's cached block chain (a
second call after the one that stored it): it must equal the full prefill.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ragcomp.bench import print_table
from ragcomp.bench.common import median, read_questions, retrieve_passages

EXACT = "exact"  # the exact prefix-reuse row (`reuse="exact"`), beside the chunk repairs


def bench_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ragcomp.kv.cache import KVCache
    from ragcomp.models import load_causal_lm

    lm = load_causal_lm(args.model, device=args.quality_device, dtype=args.quality_dtype)
    qs = read_questions(args.qa, args.quality_questions)
    retrieved = retrieve_passages(qs, args.top_k)
    kv = KVCache(lm, None)
    kv.add(list({p.id: p for ps in retrieved for p in ps}.values()))
    repairs = [r.strip() for r in args.repairs.split(",") if r.strip()]
    names = ["full prefill", *repairs]
    same = dict.fromkeys(repairs, 0)
    same_first = dict.fromkeys(repairs, 0)
    gold_hit = dict.fromkeys(names, 0)
    kls: dict[str, list[float]] = {r: [] for r in repairs}
    ttft: dict[str, list[float]] = {r: [] for r in names}
    repaired: dict[str, list[int]] = {r: [] for r in repairs}
    t0 = time.perf_counter()
    for i, (q, ps) in enumerate(zip(qs, retrieved, strict=True)):
        full = kv.generate_full(q["question"], ps, max_new_tokens=args.max_new_tokens)
        ttft["full prefill"].append(full.stats.ttft)
        gold_hit["full prefill"] += _has_answer(full.text, q["answers"])
        _, ref = kv.engine.full_prefill(full.prompt_ids)
        for r in repairs:
            if r == EXACT:
                # The first exact call stores the prompt's blocks; the second answers from them.
                kv.generate(q["question"], ps, max_new_tokens=1, reuse="exact")
                ans = kv.generate(q["question"], ps, max_new_tokens=args.max_new_tokens, reuse="exact")
            else:
                ans = kv.generate(q["question"], ps, max_new_tokens=args.max_new_tokens, reuse="chunks",
                                  repair=r)
            same[r] += int(ans.token_ids == full.token_ids)
            same_first[r] += int(ans.token_ids[:1] == full.token_ids[:1])
            gold_hit[r] += _has_answer(ans.text, q["answers"])
            ttft[r].append(ans.stats.ttft)
            repaired[r].append(ans.stats.repaired_tokens)
            if r != EXACT:
                kls[r].append(kl_divergence(ref, first_token_logits(kv, q["question"], ps, r)))
        print(f"\rquality: {i + 1}/{len(qs)} questions, {time.perf_counter() - t0:.0f} s", end="",
              file=sys.stderr)
    print(file=sys.stderr)
    n = len(qs)
    rows = [{"answer from": "full prefill", "same_answer_as_full": "-", "same_first_token": "-",
             "contains_gold": f"{gold_hit['full prefill']}/{n}", "first_token_KL_mean": 0.0,
             "first_token_KL_median": 0.0, "ttft_s": median(ttft["full prefill"]), "repaired_tokens": 0}]
    for r in repairs:
        label = ("KV, exact prefix reuse (cached chain)" if r == EXACT else f"KV chunks, repair={r}"
                 + (" (full recompute)" if r.strip().lower() == "deviation:1.0" else ""))
        rows.append({"answer from": label, "same_answer_as_full": f"{same[r]}/{n} ({same[r] / n:.0%})",
                     "same_first_token": f"{same_first[r]}/{n}", "contains_gold": f"{gold_hit[r]}/{n}",
                     "first_token_KL_mean": sum(kls[r]) / n if kls[r] else None,
                     "first_token_KL_median": median(kls[r]) if kls[r] else None,
                     "ttft_s": median(ttft[r]), "repaired_tokens": median(repaired[r])})
    print_table(rows, f"Answer agreement, {lm.name} {args.quality_dtype} on {lm.device}, greedy, "
                f"{args.max_new_tokens} new tokens, "
                f"first {n} qa_dev questions, top-{args.top_k} passages")
    kv.close()
    return rows


def first_token_logits(kv: Any, question: str, passages: Any, repair: str | None) -> Any:
    """Next-token logits after the question on assembled (and repaired) chunk KV: the
    CPU path of `KVCache.generate`, stopped before decoding."""
    from ragcomp.kv.repair import Repair

    eng = kv.engine
    chunk_ids = [c for cs in kv.layout.resolve(passages) for c in cs]
    layout = kv.layout
    chunks = [kv.tiers.cpu.get(layout.key(layout.fingerprint(c))) or eng.encode_chunks(kv.prefix_kv(), [c])[0]
              for c in chunk_ids]
    asm = eng.assemble(kv.prefix_kv(), chunks)
    q_ids = kv.question_ids(question)
    rep = Repair.parse(repair)
    if rep is not None:
        eng.repair(asm, eng.select_for_repair(asm, rep, q_ids))
    return eng.prefill(eng.make_cache(asm.keys, asm.values), q_ids, len(asm.ids))


def kl_divergence(p_logits: Any, q_logits: Any) -> float:
    """KL(p || q) of the softmax distributions of two logit vectors, in float64."""
    p = p_logits.double().log_softmax(-1)
    q = q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def _has_answer(text: str, answers: list[str]) -> int:
    norm = " ".join(text.lower().split())
    return int(any(" ".join(a.lower().split()) in norm for a in answers))
