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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ragcomp.bench import print_table, standalone_main
from ragcomp.bench.common import QA_DEFAULT, median, read_questions, retrieve_passages
from ragcomp.bench.kv_gpu import bench_gpu
from ragcomp.bench.kv_quality import bench_quality
from ragcomp.bench.kv_redis import bench_redis


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
    p.add_argument("--repairs", default="exact,none,first:16,deviation:0.15,attention:0.15,deviation:1.0",
                   help="rows of --part quality: exact (reuse='exact'), or a chunk repair "
                        "(deviation:1.0: full recompute, a sanity row)")
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
    qs = read_questions(args.qa, args.questions)
    retrieved = retrieve_passages(qs, args.top_k)
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
                key = kv.layout.key(kv.layout.fingerprint(c))
                kv.tiers.put(key, encoded.tiers.cpu.get(key), keep=False)
        kv.add(list(passages.values()))  # records the ids; nothing left to encode
    print(f"precomputed {len(passages)} passages in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    tiers = [*caches, "disk (cold)"]
    per: dict[str, list[float]] = {t: [] for t in ["full prefill", *tiers]}
    parts: dict[str, dict[str, list[float]]] = {t: {"load": [], "rotate": [], "question": [], "bytes": []}
                                                for t in tiers}
    agree: dict[str, int] = dict.fromkeys(tiers, 0)
    ctx_tokens = []
    encoded.generate(qs[0]["question"], retrieved[0], max_new_tokens=1, reuse="chunks")  # warm-up
    for q, ps in zip(qs, retrieved, strict=True):
        full = encoded.generate_full(q["question"], ps, max_new_tokens=1)
        per["full prefill"].append(full.stats.ttft)
        ctx_tokens.append(full.stats.context_tokens)
        for tier in tiers:
            kv = caches["disk" if tier == "disk (cold)" else tier]
            if tier.startswith("disk"):
                keys = [kv.layout.key(kv.layout.fingerprint(c)) for p in ps for c in kv.passage_chunks(p)]
                if tier == "disk (cold)":
                    _drop_page_cache(disk, keys)
            ans = kv.generate(q["question"], ps, max_new_tokens=1, reuse="chunks", repair=None)
            s = ans.stats
            assert s.misses == 0, f"{tier}: {s.misses} misses"
            per[tier].append(s.ttft)
            parts[tier]["load"].append(s.seconds_load)
            parts[tier]["rotate"].append(s.seconds_rotate)
            parts[tier]["question"].append(s.seconds_prefill_question)
            parts[tier]["bytes"].append(sum(s.bytes_loaded.values()))
            agree[tier] += int(ans.token_ids == full.token_ids)
    full_med = median(per["full prefill"])
    rows = [{"source": "full prefill", "ttft_s": full_med, "x_faster": 1.0, "median_of_ratios": 1.0,
             "load_s": None, "rotate_s": None, "question_s": None, "MB_loaded": None, "same_first_token": ""}]
    for tier in tiers:
        ratios = [f / t for f, t in zip(per["full prefill"], per[tier], strict=True)]
        rows.append({
            "source": tier, "ttft_s": median(per[tier]), "x_faster": full_med / median(per[tier]),
            "median_of_ratios": median(ratios), "load_s": median(parts[tier]["load"]),
            "rotate_s": median(parts[tier]["rotate"]), "question_s": median(parts[tier]["question"]),
            "MB_loaded": median(parts[tier]["bytes"]) / 1e6, "same_first_token": f"{agree[tier]}/{len(qs)}",
        })
    print_table(rows, f"TTFT, {lm.name} fp32 on CPU ({os.cpu_count()} cores), {len(qs)} questions, "
                f"top-{args.top_k} passages = {min(ctx_tokens)}-{max(ctx_tokens)} context tokens "
                f"(median {median(ctx_tokens):.0f})")
    for kv in caches.values():
        kv.close()
    tmp.cleanup()
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m ragcomp.bench.kv ...` (no ragcomp CLI, for machines without ragcomp.stores)."""
    return standalone_main("python -m ragcomp.bench.kv", __doc__, _arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
