"""`ragcomp bench pages`: KV page retrieval over long documents, printed as tables.

--part quality  CPU, SmolLM2: long documents built from the wiki corpus (the gold article(s) of
                a qa_dev question among random other articles, at a random place, up to
                --doc-tokens), each encoded once; the question answered from the best KV pages
                at each --budgets and --scorings, from every page (full context), and by
                text-chunk RAG (sentence chunks retrieved by MiniLM within the same budget,
                then prefilled). Accuracy = answer alias in the generated answer; EM = SQuAD
                exact match; evidence kept = every gold evidence sentence inside the kept text.
--part gpu      random weights of real shapes (Llama-3-8B by default) at --gpu-docs tokens:
                TTFT and time per generated token with a --gpu-budget page budget against the
                full KV (both from the GPU tier and from pinned host memory), and the page
                scoring time. No tokenizer or store needed: `python -m ragcomp.bench.pages --part gpu`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from ragcomp.bench import print_table, standalone_main
from ragcomp.bench.common import QA_DEFAULT, gpu_bench_device, median, random_model, synced_median
from ragcomp.bench.pages_docs import build_document, load_items, text_chunks


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pages", help="KV page retrieval on long documents: accuracy vs full context "
                       "and text-chunk RAG; GPU timing")
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", default="quality", help="comma list of quality, gpu (default: quality)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None, help="cpu, cuda (quality: default cuda if present; gpu: cuda)")
    p.add_argument("--dtype", default=None, help="quality: fp32, bf16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--qa", default=str(QA_DEFAULT), help="qa_dev.jsonl")
    p.add_argument("--corpus", default="wiki", help="'wiki' (packaged) or the wiki_summaries_en.json file")
    p.add_argument("--questions", type=int, default=30)
    p.add_argument("--doc-tokens", default="4096", help="comma list of document sizes in tokens")
    p.add_argument("--budgets", default="512,1024,2048", help="page budgets in tokens")
    p.add_argument("--scorings", default="attention,embedding,hybrid")
    p.add_argument("--page-tokens", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=128, help="text-chunk RAG: tokens per chunk (at most)")
    p.add_argument("--no-rag", action="store_true", help="skip the text-chunk RAG baseline")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shapes", default="llama3-8b")
    p.add_argument("--gpu-docs", default="16384,32768")
    p.add_argument("--gpu-budget", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")


def run(args: argparse.Namespace) -> int:
    parts = [x.strip() for x in args.part.split(",") if x.strip()]
    bad = set(parts) - {"quality", "gpu"}
    if bad:
        raise ValueError(f"unknown --part {', '.join(sorted(bad))}: use quality, gpu")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    if "gpu" in parts:
        results["gpu"] = bench_gpu(args)
    if "quality" in parts:
        results["quality"] = bench_quality(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def bench_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ragcomp.embeddings import shared_embedder
    from ragcomp.kv.cache import KVCache
    from ragcomp.models import load_causal_lm

    lm = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
    kv = KVCache(lm, None, cpu_bytes=2**30)
    docs = kv.long_documents()
    tok = kv.tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    items, by_title, corpus = load_items(args)
    budgets, scorings = _ints(args.budgets), [s.strip() for s in args.scorings.split(",") if s.strip()]
    # Check every size before the first (slow) one runs: a later size that cannot fit would
    # otherwise fail after the earlier sizes' minutes of work.
    window = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0)
    room = _DOC_ROOM + args.max_new_tokens
    too_long = [n for n in _ints(args.doc_tokens) if window and n + room > window]
    if too_long:
        raise SystemExit(f"--doc-tokens {too_long} do not fit {lm.name}'s {window} positions with the "
                         f"prefix, question and {args.max_new_tokens} new tokens; the largest that fits "
                         f"is {window - room} (use a model with a longer window for more)")
    emb = shared_embedder("minilm")
    rows = []
    for size in _ints(args.doc_tokens):
        rng = random.Random(args.seed)
        configs = ["full context"] + [f"pages {b}, {s}" for b in budgets for s in scorings]
        if not args.no_rag:
            configs += [f"text-chunk RAG {b}" for b in budgets]
        tally = _Tally(configs)
        t_encode, doc_lens = [], []
        t0 = time.perf_counter()
        for qi, item in enumerate(items):
            gold = [by_title[t] for t in item["titles"]]
            gold_ids = {p.id for p in gold}
            others = [p for p in corpus if p.id not in gold_ids]
            text = build_document(gold, others, size - 16, count, rng)
            doc_id = f"bench-{size}-{item['id']}"
            t = time.perf_counter()
            doc = kv.add_long(doc_id, text, page_tokens=args.page_tokens)
            t_encode.append(time.perf_counter() - t)
            doc_lens.append(len(doc.ids))
            page_text = docs.page_texts(doc)
            q, new = item["question"], args.max_new_tokens
            tally.add(item, "full context", kv.ask_long(q, doc_id, None, max_new_tokens=new), text)
            for b in budgets:
                for s in scorings:
                    ans = kv.ask_long(q, doc_id, b, scoring=s, max_new_tokens=new)
                    kept = "".join(page_text[i] for i in ans.stats.kept_pages)
                    tally.add(item, f"pages {b}, {s}", ans, kept)
            if not args.no_rag:
                for b, (ans, kept) in zip(budgets, _rag_answers(kv, emb, q, text, count, budgets, args),
                                          strict=True):
                    tally.add(item, f"text-chunk RAG {b}", ans, kept)
            kv.clear_tiers()  # one document at a time in memory
            print(f"\rpages quality {size}: {qi + 1}/{len(items)} questions, "
                  f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        part = tally.rows(size)
        rows += part
        print_table(part, f"KV pages vs full context vs text-chunk RAG: {lm.name} greedy, {len(items)} "
                    f"qa_dev questions, documents of {min(doc_lens)}-{max(doc_lens)} tokens "
                    f"({args.page_tokens}-token pages), encoded once in {median(t_encode):.1f} s (median)")
    kv.close()
    return rows


# Positions a question needs beyond its document: the shared prefix and the question itself.
_DOC_ROOM = 256


def _rag_answers(kv: Any, emb: Any, question: str, text: str, count: Any, budgets: list[int],
                 args: argparse.Namespace) -> list[tuple[Any, str]]:
    """Text-chunk RAG: the best sentence chunks by MiniLM within each budget (document order),
    prefilled with the question. TTFT includes the chunk ranking."""
    from ragcomp.types import Passage

    t = time.perf_counter()
    chunks = text_chunks(text, count, args.chunk_tokens)
    sims = emb.embed(chunks) @ emb.embed_one(question)
    sizes = [sum(len(c) for c in kv.passage_chunks(Passage("c", ch))) for ch in chunks]
    t_rank = time.perf_counter() - t
    out = []
    for b in budgets:
        chosen, left = [], b
        for i in sorted(range(len(chunks)), key=lambda j: -float(sims[j])):
            if sizes[i] <= left:
                chosen.append(i)
                left -= sizes[i]
        chosen.sort()
        ans = kv.generate_full(question, [Passage(f"c{i}", chunks[i]) for i in chosen],
                               max_new_tokens=args.max_new_tokens)
        ans.stats.ttft += t_rank
        out.append((ans, " ".join(chunks[i] for i in chosen)))
    return out


class _Tally:
    """Per configuration: accuracy (alias in answer), EM, evidence kept, TTFT, scoring time, bytes."""

    def __init__(self, configs: list[str]) -> None:
        self.configs = configs
        self.data: dict[str, dict[str, list[float]]] = {
            c: {k: [] for k in ("acc", "em", "evidence", "ttft", "score", "mb")} for c in configs}

    def add(self, item: dict[str, Any], config: str, answer: Any, kept_text: str) -> None:
        from ragcomp.eval.metrics import contains_answer, evidence_present, exact_match

        d, answers, evidence = self.data[config], item["answers"], item.get("evidence", [])
        d["acc"].append(float(contains_answer(answer.text, answers)))
        d["em"].append(exact_match(answer.text, answers))
        d["evidence"].append(float(bool(evidence) and all(evidence_present(kept_text, evidence))))
        d["ttft"].append(answer.stats.ttft)
        d["score"].append(getattr(answer.stats, "seconds_score", 0.0))
        d["mb"].append(getattr(answer.stats, "bytes_touched", 0) / 1e6)

    def rows(self, size: int) -> list[dict[str, Any]]:
        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        full = mean(self.data["full context"]["acc"])
        out = []
        for c in self.configs:
            d = self.data[c]
            a = mean(d["acc"])
            out.append({"doc_tokens": size, "answer from": c, "accuracy": a,
                        "x_of_full": a / full if full else None, "EM": mean(d["em"]),
                        "evidence_kept": mean(d["evidence"]), "ttft_s": median(d["ttft"]),
                        "score_s": median(d["score"]) if c.startswith("pages") else None,
                        "MB_touched": median(d["mb"]) if not c.startswith("text") else None})
        return out


# -- GPU, random weights of real shapes ----------------------------------------------------------


def bench_gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from ragcomp.kv.engine import KVEngine

    dev = gpu_bench_device(args.device)
    on_gpu = dev.type == "cuda"

    def timed(fn: Any) -> tuple[float, Any]:
        return synced_median(fn, args.repeat, dev)

    g = torch.Generator().manual_seed(args.seed)
    q_len, p_len, rows = 32, 32, []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        model, cfg = random_model(shape, dev)
        eng = KVEngine(model, shape)
        vocab = cfg.vocab_size
        prefix = eng.encode_prefix(torch.randint(0, vocab, (p_len,), generator=g).tolist())
        q_ids = torch.randint(0, vocab, (q_len,), generator=g).tolist()
        for size in _ints(args.gpu_docs):
            n_doc = min(size, int(cfg.max_position_embeddings)) - p_len - q_len - args.decode_tokens
            doc_ids = torch.randint(0, vocab, (n_doc,), generator=g).tolist()
            rows += _gpu_document(eng, prefix, q_ids, doc_ids, args, timed, shape)
            if on_gpu:
                torch.cuda.empty_cache()
        del model, eng, prefix
        if on_gpu:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(0) if on_gpu else "CPU dry run"
    print_table(rows, f"KV pages on GPU ({name}, bf16, random weights, {args.page_tokens}-token pages, "
                f"{q_len}-token question, {args.decode_tokens} decoded tokens; pages' TTFT includes scoring)")
    return rows


def _gpu_document(eng: Any, prefix: Any, q_ids: list[int], doc_ids: list[int], args: argparse.Namespace,
                  timed: Any, shape: str) -> list[dict[str, Any]]:
    """One document: encode, page, then TTFT and per-token time from the GPU and pinned tiers,
    with every page (full KV) and with the best pages within --gpu-budget (scoring included)."""
    import torch

    from ragcomp.kv.pages_score import (
        attention_page_scores,
        attention_token_mass,
        default_score_layers,
        encode_document,
        question_queries,
        score_keys,
        select_pages,
        split_pages,
    )
    from ragcomp.kv.tiers import TensorLRU

    on_gpu = eng.device.type == "cuda"
    layers = default_score_layers(eng.num_layers)
    prefix_sk = score_keys(eng, prefix.keys, layers, 0)
    t = time.perf_counter()
    k, v = encode_document(eng, prefix, doc_ids, prefill_chunk=4096)
    if on_gpu:
        torch.cuda.synchronize()
    t_enc = time.perf_counter() - t
    pages = split_pages(eng, prefix.ids, doc_ids, k, v, args.page_tokens)
    sk = score_keys(eng, k, layers, len(prefix))
    del k, v
    lengths = [len(p) for p in pages]
    tiers = {"GPU tier": TensorLRU("gpu", 1 << 40, eng.device, packed=True),
             "pinned-CPU tier": TensorLRU("cpu", 1 << 40, "cpu", pin=on_gpu, packed=on_gpu)}
    held = {name: [tier.put(str(i), p) for i, p in enumerate(pages)] for name, tier in tiers.items()}
    del pages
    # Once per document, as LongDocuments does: what a content-free question attends to.
    prior = attention_token_mass(question_queries(eng, prefix, q_ids[: max(1, len(q_ids) // 4)], layers),
                                 prefix_sk, sk)

    def score() -> list[int]:
        mass = attention_token_mass(question_queries(eng, prefix, q_ids, layers), prefix_sk, sk)
        s = attention_page_scores(mass, prior, args.page_tokens)
        return select_pages(s.tolist(), lengths, args.gpu_budget)

    t_score, kept = timed(score)
    rows = []
    for name, src in held.items():
        cases = {"full KV": lambda src=src: src,
                 f"pages {args.gpu_budget}": lambda src=src: [src[i] for i in score()]}
        for label, pick in cases.items():
            t_first, (asm, cache, logits) = timed(
                lambda pick=pick: eng.prefill_streamed(prefix, pick(), q_ids,
                                                       reserve=len(q_ids) + args.decode_tokens))
            ctx = len(asm.ids)
            # An untimed decode first: the first decode at a new context length pays for kernel
            # selection and allocations (it made the first case's ms/token 3-4x too high).
            eng.decode(cache, logits, ctx + len(q_ids), args.decode_tokens, [])
            asm, cache, logits = eng.prefill_streamed(prefix, pick(), q_ids,
                                                      reserve=len(q_ids) + args.decode_tokens)
            if on_gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = eng.decode(cache, logits, ctx + len(q_ids), args.decode_tokens, [])
            if on_gpu:
                torch.cuda.synchronize()
            per_tok = (time.perf_counter() - t) / max(1, len(out) - 1)
            paged = label.startswith("pages")
            rows.append({"shape": shape, "doc_tokens": len(doc_ids), "source": name, "context": label,
                         "context_tokens": ctx, "ttft_ms": t_first * 1e3, "ms_per_token": per_tok * 1e3,
                         "score_ms": t_score * 1e3 if paged else None,
                         "KV_MB_read": sum(src[i].nbytes for i in (kept if paged else range(len(src)))) / 1e6,
                         "score_MB": sk.numel() * sk.element_size() / 1e6 if paged else None,
                         "encode_s": t_enc})
            del asm, cache, logits
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m ragcomp.bench.pages ...` (for machines without the ragcomp CLI installed)."""
    return standalone_main("python -m ragcomp.bench.pages", __doc__, _arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
