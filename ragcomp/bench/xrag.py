"""`ragcomp bench xrag`: time to first token and prefill FLOPs per question, xrag against full-text RAG.

For each question and each k of `--retrieve-k`: the reader's prompt with the top-k documents as
text, and the same prompt with one placeholder per document (xrag). TTFT = embeddings looked up
in the retriever's index and projected (xrag only) + the prefill forward that yields the first
token's logits (CUDA synchronised). FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`
over that prefill (plus the projector for xrag), so both rows are measured the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ragcomp.bench import print_table
from ragcomp.bench.common import QA_DEFAULT


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("xrag", help="TTFT and prefill FLOPs per question: xrag vs full-text RAG")
    p.add_argument("--data", default=str(QA_DEFAULT), help="questions JSONL (qa_dev format)")
    p.add_argument("--corpus", default="wiki", help="'wiki' or a corpus JSON/JSONL file")
    p.add_argument("--retrieve-k", default="1,3", help="comma list of documents per question")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--projector", default=None, help="projector folder (default: the packaged one)")
    p.add_argument("--reader", default="smollm2-135m")
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per prompt (median taken)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.set_defaults(func=run)


def _timed(fn: Any, device: str, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run(args: argparse.Namespace) -> int:
    import torch

    from ragcomp.compressors.xrag import XragCompressor
    from ragcomp.compressors.xrag.model import placeholder_id, reader_prompt_ids, splice
    from ragcomp.eval.data import load_questions
    from ragcomp.llm.local import LocalReader
    from ragcomp.models import default_device
    from ragcomp.retrieval import CorpusRetriever

    device = args.device or default_device()
    ks = [int(k) for k in str(args.retrieve_k).split(",") if k.strip()]
    questions = load_questions(args.data, args.limit)
    retriever = CorpusRetriever.for_corpus(args.corpus, args.embedder, device=device, progress=False)
    reader = LocalReader(args.reader, device=device)
    comp = XragCompressor(args.projector, embedder=args.embedder, vector_index=retriever.index,
                          device=device, encode_missing=False)
    lm, tok = reader.lm, reader.lm.tokenizer
    pid = placeholder_id(tok)
    model = lm.model
    rows = []
    for k in ks:
        stats: dict[str, dict[str, list[float]]] = {m: {"tokens": [], "ttft": [], "flops": []}
                                                    for m in ("full text", "xrag")}
        for q in questions:
            passages = retriever.retrieve(q.question, k)
            text_ids = torch.tensor([reader.prompt_ids(q.question, "\n\n".join(p.text for p in passages))],
                                    device=device)
            x_ids = torch.tensor([reader_prompt_ids(tok, q.question, len(passages), pid)], device=device)

            def full(ids: Any = text_ids) -> Any:
                with torch.inference_mode():
                    return model(input_ids=ids, logits_to_keep=1).logits

            def xrag(ids: Any = x_ids, ps: Any = passages) -> Any:
                with torch.inference_mode():
                    vecs = comp.project(comp.document_embeddings(ps))  # index lookup + projector
                    embeds = splice(model, ids, torch.from_numpy(vecs).to(device), pid)
                    return model(inputs_embeds=embeds, logits_to_keep=1).logits

            for name, fn, ids in (("full text", full, text_ids), ("xrag", xrag, x_ids)):
                fn()  # warm-up
                stats[name]["tokens"].append(ids.shape[1])
                stats[name]["ttft"].append(_timed(fn, device, args.repeats) * 1000)
                stats[name]["flops"].append(_flops(fn))
        for name, s in stats.items():
            rows.append({"k": k, "method": name, "prompt_tokens": statistics.mean(s["tokens"]),
                         "context_tokens": (k if name == "xrag" else None),
                         "ttft_ms_p50": statistics.median(s["ttft"]),
                         "gflops_per_question": statistics.mean(s["flops"]) / 1e9})
        full_row, x_row = rows[-2], rows[-1]
        x_row["speedup_ttft"] = full_row["ttft_ms_p50"] / x_row["ttft_ms_p50"]
        x_row["flops_ratio"] = full_row["gflops_per_question"] / x_row["gflops_per_question"]
        full_row["context_tokens"] = full_row["prompt_tokens"] - x_row["prompt_tokens"] + k
    for r in rows:
        r.setdefault("speedup_ttft", None)
        r.setdefault("flops_ratio", None)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print_table(rows, f"xrag vs full-text RAG: {lm.name} prefill to the first token on {name} "
                f"({len(questions)} questions, {lm.dtype}, median of {args.repeats})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
