"""`ragcomp bench kv --part gpu`: TTFT on a GPU from random weights of real shapes (Qwen2.5-0.5B/1.5B,
Llama-3-8B; `GPU_SHAPES` and `random_model` in bench/common.py, shared with `ragcomp bench pages --part
gpu`): the pinned-CPU and GPU tiers (streamed, chunk by chunk, stock attention, fp8) against a full
prefill of the same ids, the floor of the question alone on ready KV, and an optional kernel
profile. Needs no tokenizer or ragcomp.stores."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

from ragcomp.bench import print_table
from ragcomp.bench.common import gpu_bench_device, random_model, synced_median


def bench_gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from ragcomp.kv.codec import ChunkKV, quantize
    from ragcomp.kv.engine import KVEngine
    from ragcomp.kv.tiers import TensorLRU

    dev = gpu_bench_device(args.device)
    on_gpu = dev.type == "cuda"
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = []
    chunk_len, q_len, p_len = 512, 32, 32
    g = torch.Generator().manual_seed(0)

    def timed(fn: Any, repeat: int) -> tuple[float, Any]:
        return synced_median(fn, repeat, dev)

    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        model, cfg = random_model(shape, dev)
        eng = KVEngine(model, shape)
        vocab = cfg.vocab_size
        prefix_ids = torch.randint(0, vocab, (p_len,), generator=g).tolist()
        q_ids = torch.randint(0, vocab, (q_len,), generator=g).tolist()
        prefix = eng.encode_prefix(prefix_ids)
        for ctx in contexts:
            n_chunks = max(1, (ctx - p_len - q_len) // chunk_len)
            ids = [torch.randint(0, vocab, (chunk_len,), generator=g).tolist() for _ in range(n_chunks)]
            chunks = eng.encode_chunks(prefix, ids, batch_size=4)
            total = p_len + n_chunks * chunk_len
            # The tiers as KVCache builds them on a GPU machine: packed (keys and values of a
            # chunk in one buffer), in pinned host memory or on the GPU.
            pinned = TensorLRU("cpu", 1 << 40, "cpu", pin=on_gpu, packed=on_gpu)
            host = [pinned.put(str(i), c) for i, c in enumerate(chunks)]
            gpu_tier = TensorLRU("gpu", 1 << 40, dev, packed=True)
            on_dev = [gpu_tier.put(str(i), c) for i, c in enumerate(chunks)]
            plain = TensorLRU("cpu", 1 << 40, "cpu", pin=on_gpu)  # unpacked, for chunk-by-chunk
            host_plain = [plain.put(str(i), c) for i, c in enumerate(chunks)]
            fp8_tier = TensorLRU("cpu", 1 << 40, "cpu", pin=on_gpu, packed=on_gpu)
            host8 = []
            for i, c in enumerate(chunks):
                k, v, ks, vs = quantize(c.keys, c.values, "fp8")
                host8.append(fp8_tier.put(str(i), ChunkKV(c.ids, k, v, c.base, c.fingerprint, "fp8", ks, vs)))
            full_ids = prefix.ids + [t for c in ids for t in c] + q_ids
            sources = {"GPU tier": on_dev, "pinned-CPU tier": host, "pinned-CPU tier, fp8": host8,
                       "_plain": host_plain}
            times, info = _gpu_case(eng, prefix, full_ids, q_ids, total, sources, timed, args.repeat,
                                    args.groups)
            t_full = times["full prefill"]
            for name, tt in times.items():
                src = sources.get(name, host_plain if "chunk by chunk" in name else None)
                mb = sum(c.nbytes for c in src) / 1e6 if src else None
                rows.append({"shape": shape, "context": total + q_len, "source": name, "ttft_ms": tt * 1e3,
                             "x_faster": t_full / tt, "KV_MB": mb})
            if args.profile and on_gpu:
                _profile(partial(eng.prefill_streamed, prefix, host, q_ids, groups=args.groups),
                         f"{shape} {total + q_len} tokens, pinned-CPU tier")
                _profile(partial(eng.full_prefill, full_ids), f"{shape} {total + q_len} tokens, full prefill")
            host = {k: round(v * 1e3, 1) for k, v in info["host_ms"].items()}
            print_table(rows[-len(times):], f"{shape}, {total + q_len} tokens; streamed vs chunk-by-chunk "
                        f"KV and logits max diff {info['streamed_vs_chunkwise_maxdiff']:.2e}; host ms {host}")
            del chunks, host, host8, pinned, fp8_tier, on_dev, gpu_tier, plain, host_plain, sources
            if on_gpu:
                torch.cuda.empty_cache()
        del model, eng, prefix
        if on_gpu:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(0) if on_gpu else "CPU dry run"
    print_table(rows, f"GPU TTFT ({name}, bf16, random weights of real shapes, SDPA, {q_len}-token question, "
                f"{chunk_len}-token chunks, {args.groups} layer groups, median of {args.repeat})")
    return rows


def _profile(fn: Any, title: str) -> None:
    """Top CUDA kernels by time over three calls (where a path spends its milliseconds)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"### profile: {title} (3 calls)", file=sys.stderr)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60),
          file=sys.stderr, flush=True)


def _gpu_case(eng: Any, prefix: Any, full_ids: list[int], q_ids: list[int], total: int,
              sources: dict[str, list[Any]], timed: Any, repeat: int, groups: int = 8
              ) -> tuple[dict[str, float], dict[str, Any]]:
    """Median TTFT of a full prefill and of answering from each source (KVCache's GPU path:
    layer-group streaming that overlaps copies with the question's forward), plus the
    chunk-by-chunk path without overlap for the pinned tier. Also the first tokens and the
    largest logit difference between the streamed and the chunk-by-chunk assembly."""

    def full() -> Any:
        _, logits = eng.full_prefill(full_ids)
        return logits

    def streamed(src: list[Any], reserve: int | None = None) -> Any:
        return lambda: eng.prefill_streamed(prefix, src, q_ids, groups=groups, reserve=reserve)[2]

    def stock(fn: Any) -> Any:
        def go() -> Any:  # transformers' own attention (repeat_kv) and cache (concatenation)
            was, eng.fold = eng.fold, False
            try:
                return fn()
            finally:
                eng.fold = was

        return go

    def chunk_by_chunk(src: list[Any]) -> Any:
        def go() -> Any:
            asm = eng.assemble(prefix, src)  # per chunk: H2D copy (non-blocking) + rotation
            return eng.prefill(eng.make_cache(asm.keys, asm.values), q_ids, total)

        return go

    times, logits = {}, {}
    times["full prefill"], logits["full prefill"] = timed(full, repeat)
    for name, src in sources.items():
        if not name.startswith("_"):
            times[name], logits[name] = timed(streamed(src), repeat)
    name = "pinned-CPU tier, stock attention and cache"
    times[name], logits[name] = timed(stock(streamed(sources["pinned-CPU tier"], reserve=0)), repeat)
    name = "pinned-CPU tier, chunk by chunk (no overlap)"
    times[name], logits[name] = timed(chunk_by_chunk(sources["_plain"]), repeat)
    a_s = eng.prefill_streamed(prefix, sources["pinned-CPU tier"], q_ids, groups=groups)[0]
    a_c = eng.assemble(prefix, sources["_plain"])
    diff = max((a_s.keys - a_c.keys).abs().max().item(), (a_s.values - a_c.values).abs().max().item(),
               (logits["pinned-CPU tier"] - logits[name]).abs().max().item())
    del a_s, a_c
    # Floor: the question alone on KV already assembled on the GPU, with room for its tokens.
    ready = eng.assemble(prefix, sources["_plain"], reserve=len(q_ids))
    name = "floor: question on ready GPU KV"
    times[name], logits[name] = timed(
        lambda: eng.prefill(eng.make_cache(ready.keys, ready.values, grow=True), q_ids, total), repeat)
    split: dict[str, float] = {}
    eng.prefill_streamed(prefix, sources["pinned-CPU tier"], q_ids, groups=groups, timings=split)
    first = {k: int(v.argmax()) for k, v in logits.items()}
    return times, {"first": first, "streamed_vs_chunkwise_maxdiff": diff, "host_ms": split}
