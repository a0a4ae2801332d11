"""`ragcomp bench kv`: what the document KV cache saves, printed as tables.

--part ttft     CPU, SmolLM2: time to first token from each tier (CPU memory, disk warm and
                cold, Redis) against a full prefill of the very same prompt ids, interleaved
                per question so every ratio comes from one run on one machine state.
--part redis    loading the KV of retrieved chunks from Redis: RedisStore (chunked, pipelined,
                parallel) against a plain redis-py GET of the same bytes; fp8 against native bytes.
--part quality  on qa_dev questions with their top-k passages: how often the KV-assembled greedy
                answer equals the full-prefill greedy answer, with and without each repair, and
                the first answer token's KL from the full prefill (ragcomp/bench/kv_quality.py).
--part gpu      random weights of real shapes (Qwen2.5-0.5B/1.5B, Llama-3-8B) at 4k/16k tokens:
                TTFT from the pinned-CPU and GPU tiers against full prefill (needs CUDA; runs
                without ragcomp.stores or a tokenizer: `python -m ragcomp.bench.kv --part gpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from ragcomp.bench import print_table, standalone_main
from ragcomp.bench.kv_quality import bench_quality
from ragcomp.bench.kv_redis import bench_redis

QA_DEFAULT = Path(__file__).resolve().parents[3] / "shared" / "data" / "qa_dev.jsonl"

# Real shapes (config.json of the published checkpoints); weights are random.
GPU_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768),
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, rope_theta=1e4,
                       tie_word_embeddings=False, max_position_embeddings=4096),  # dry runs
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=5e5, tie_word_embeddings=False, max_position_embeddings=8192 * 4),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv", help="document KV cache: TTFT per tier, Redis load, answer agreement, GPU")
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", default="ttft,redis,quality",
                   help="comma list of ttft, redis, quality, gpu (default: the three CPU parts)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=8, help="questions for --part ttft (default 8)")
    p.add_argument("--quality-questions", type=int, default=50, help="questions for --part quality")
    p.add_argument("--top-k", type=int, default=10, help="retrieved passages per question")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--quality-device", default=None, help="device for --part quality (default: cuda if any)")
    p.add_argument("--quality-dtype", default="fp32",
                   help="dtype for --part quality (fp32: differences come from chunk encoding only)")
    p.add_argument("--repairs", default="none,first:16,deviation:0.15,attention:0.15,deviation:1.0",
                   help="repairs for --part quality (deviation:1.0: full recompute, a sanity row)")
    p.add_argument("--qa", default=str(QA_DEFAULT), help="qa_dev.jsonl")
    p.add_argument("--redis-url", default=None, help="Redis to use (default: a throwaway local server)")
    p.add_argument("--redis-rounds", type=int, default=9, help="timed rounds per storage kind (--part redis)")
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,llama3-8b")
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats per GPU case")
    p.add_argument("--device", default="cuda", help="device for --part gpu (cpu: a dry run)")
    p.add_argument("--groups", type=int, default=8, help="layer groups streamed on the GPU path")
    p.add_argument("--profile", action="store_true",
                   help="--part gpu: print the top GPU kernels of the pinned-tier path per case")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); on busy shared cores 1 avoids "
                        "OpenMP barrier stalls")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")


def run(args: argparse.Namespace) -> int:
    parts = [x.strip() for x in args.part.split(",") if x.strip()]
    bad = set(parts) - {"ttft", "redis", "quality", "gpu"}
    if bad:
        raise ValueError(f"unknown --part {', '.join(sorted(bad))}: use ttft, redis, quality, gpu")
    results: dict[str, Any] = {}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if "gpu" in parts:
        results["gpu"] = bench_gpu(args)
    cpu_parts = [x for x in parts if x != "gpu"]
    if cpu_parts:
        with _redis_url(args.redis_url) as url:
            if "ttft" in cpu_parts:
                results["ttft"] = bench_ttft(args, url)
            if "redis" in cpu_parts:
                results["redis"] = bench_redis(args, url)
        if "quality" in cpu_parts:
            results["quality"] = bench_quality(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


class _redis_url:
    """The given URL, or a throwaway loopback redis-server for the duration (None if no binary)."""

    def __init__(self, url: str | None) -> None:
        self.url, self._ctx, self._tmp = url, None, None

    def __enter__(self) -> str | None:
        if self.url:
            return self.url
        import shutil

        if shutil.which("redis-server") is None:
            print("redis-server not found: Redis rows skipped", file=sys.stderr)
            return None
        from ragcomp.stores.redis import local_redis_server

        self._tmp = tempfile.TemporaryDirectory(prefix="ragcomp-bench-kv-")
        self._ctx = local_redis_server(self._tmp.name)
        return self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        if self._tmp is not None:
            self._tmp.cleanup()


# -- shared helpers --------------------------------------------------------------------------


def _questions(path: str, n: int) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"questions file {path} not found (pass --qa)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


def _retrieve(questions: list[dict[str, Any]], k: int) -> list[list[Any]]:
    from ragcomp.retrieval import CorpusRetriever

    retriever = CorpusRetriever.for_corpus("wiki", progress=False)
    return retriever.retrieve_batch([q["question"] for q in questions], k)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _drop_page_cache(store: Any, keys: list[str]) -> None:
    """Ask the kernel to forget the cached pages of these entries' files (a cold disk read)."""
    for key in keys:
        path = store.path_for(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- (a) TTFT per tier on CPU -----------------------------------------------------------------


def bench_ttft(args: argparse.Namespace, redis_url: str | None) -> list[dict[str, Any]]:
    from ragcomp.kv.cache import KVCache
    from ragcomp.models import load_causal_lm
    from ragcomp.stores.disk import DiskStore

    lm = load_causal_lm(args.model)
    qs = _questions(args.qa, args.questions)
    retrieved = _retrieve(qs, args.top_k)
    tmp = tempfile.TemporaryDirectory(prefix="ragcomp-kv-disk-")
    disk = DiskStore(tmp.name, fsync=False)
    caches: dict[str, KVCache] = {"cpu (memory)": KVCache(lm, None)}
    # No CPU tier in front of disk / Redis: every chunk is read from the store each time.
    caches["disk"] = KVCache(lm, disk, cpu_bytes=0)
    if redis_url:
        from ragcomp.stores.redis import RedisStore

        rstore = RedisStore(redis_url, prefix="ragcomp-bench-kv:")
        rstore.clear()
        caches["redis"] = KVCache(lm, rstore, cpu_bytes=0)
    t0 = time.perf_counter()
    passages = {p.id: p for ps in retrieved for p in ps}
    encoded = caches["cpu (memory)"]
    encoded.add(list(passages.values()))
    # Every store gets the same entries (encoded once).
    for kv in caches.values():
        if kv is encoded:
            continue
        for p in passages.values():
            for c in kv.passage_chunks(p):
                key = kv._key(kv._fp(c))
                kv.tiers.put(key, encoded.tiers.cpu.get(key), keep=False)
        kv.add(list(passages.values()))  # records the ids; nothing left to encode
    print(f"precomputed {len(passages)} passages in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    tiers = [*caches, "disk (cold)"]
    per: dict[str, list[float]] = {t: [] for t in ["full prefill", *tiers]}
    parts: dict[str, dict[str, list[float]]] = {t: {"load": [], "rotate": [], "question": [], "bytes": []}
                                                for t in tiers}
    agree: dict[str, int] = dict.fromkeys(tiers, 0)
    ctx_tokens = []
    encoded.generate(qs[0]["question"], retrieved[0], max_new_tokens=1)  # warm-up
    for q, ps in zip(qs, retrieved, strict=True):
        full = encoded.generate_full(q["question"], ps, max_new_tokens=1)
        per["full prefill"].append(full.stats.ttft)
        ctx_tokens.append(full.stats.context_tokens)
        for tier in tiers:
            kv = caches["disk" if tier == "disk (cold)" else tier]
            if tier.startswith("disk"):
                keys = [kv._key(kv._fp(c)) for p in ps for c in kv.passage_chunks(p)]
                if tier == "disk (cold)":
                    _drop_page_cache(disk, keys)
            ans = kv.generate(q["question"], ps, max_new_tokens=1, repair=None)
            s = ans.stats
            assert s.misses == 0, f"{tier}: {s.misses} misses"
            per[tier].append(s.ttft)
            parts[tier]["load"].append(s.seconds_load)
            parts[tier]["rotate"].append(s.seconds_rotate)
            parts[tier]["question"].append(s.seconds_prefill_question)
            parts[tier]["bytes"].append(sum(s.bytes_loaded.values()))
            agree[tier] += int(ans.token_ids == full.token_ids)
    full_med = _median(per["full prefill"])
    rows = [{"source": "full prefill", "ttft_s": full_med, "x_faster": 1.0, "median_of_ratios": 1.0,
             "load_s": None, "rotate_s": None, "question_s": None, "MB_loaded": None, "same_first_token": ""}]
    for tier in tiers:
        ratios = [f / t for f, t in zip(per["full prefill"], per[tier], strict=True)]
        rows.append({
            "source": tier, "ttft_s": _median(per[tier]), "x_faster": full_med / _median(per[tier]),
            "median_of_ratios": _median(ratios), "load_s": _median(parts[tier]["load"]),
            "rotate_s": _median(parts[tier]["rotate"]), "question_s": _median(parts[tier]["question"]),
            "MB_loaded": _median(parts[tier]["bytes"]) / 1e6, "same_first_token": f"{agree[tier]}/{len(qs)}",
        })
    print_table(rows, f"TTFT, {lm.name} fp32 on CPU ({os.cpu_count()} cores), {len(qs)} questions, "
                f"top-{args.top_k} passages = {min(ctx_tokens)}-{max(ctx_tokens)} context tokens "
                f"(median {_median(ctx_tokens):.0f})")
    for kv in caches.values():
        kv.close()
    tmp.cleanup()
    return rows


# -- (d) GPU, random weights of real shapes -------------------------------------------------------


def random_model(shape: str, device: Any) -> tuple[Any, Any]:
    """(model, config): random bf16 weights of one of GPU_SHAPES, built on `device`."""
    import torch
    import transformers

    spec = dict(GPU_SHAPES[shape])
    mtype, theta = spec.pop("model_type"), spec.pop("rope_theta")
    cfg = transformers.AutoConfig.for_model(mtype, **spec, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": theta})
    t = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    print(f"{shape}: random weights in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return model, cfg


def bench_gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from ragcomp.kv.codec import ChunkKV, quantize
    from ragcomp.kv.engine import KVEngine
    from ragcomp.kv.tiers import TensorLRU

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--part gpu needs a CUDA device (or --device cpu for a dry run)")
    on_gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = []
    chunk_len, q_len, p_len = 512, 32, 32
    g = torch.Generator().manual_seed(0)

    def timed(fn: Any, repeat: int) -> tuple[float, Any]:
        out = fn()  # warm-up (kernels, allocator)
        sync()
        times = []
        for _ in range(repeat):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t)
        return _median(times), out

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


def main(argv: list[str] | None = None) -> int:
    """`python -m ragcomp.bench.kv ...` (no ragcomp CLI, for machines without ragcomp.stores)."""
    return standalone_main("python -m ragcomp.bench.kv", __doc__, _arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
