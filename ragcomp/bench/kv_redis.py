"""`ragcomp bench kv --part redis`: loading retrieved chunks' KV from Redis.

RedisStore (chunked, pipelined, parallel reads) against a plain redis-py GET of the same
bytes, per storage kind (bf16, the model's native dtype, fp8 and int8 with per-token
scales), plus one 256 MiB value. fp8/int8 rows also give the bf16 bytes they stand for per
second of loading, against a plain GET of the bf16 entries, and what the smaller bytes cost
in answer quality (first answer token's logits against native KV on the same prompt).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ragcomp.bench import print_table
from ragcomp.bench.kv_quality import first_token_logits, kl_divergence

# bf16 first (the baseline); native is the model's own dtype (fp32 on CPU).
STORAGE_ROWS = ("bf16", "native", "fp8", "int8")


def bench_redis(args: argparse.Namespace, redis_url: str | None) -> list[dict[str, Any]]:
    if not redis_url:
        return []
    redis = __import__("redis")
    from ragcomp.bench.kv import _median, _questions, _retrieve
    from ragcomp.kv.cache import KVCache
    from ragcomp.kv.codec import decode_entry, encode_entry
    from ragcomp.models import load_causal_lm
    from ragcomp.stores.redis import RedisStore

    lm = load_causal_lm(args.model)
    qs = _questions(args.qa, 1)
    ps = _retrieve(qs, args.top_k)[0]
    plain = redis.Redis.from_url(redis_url)
    rows = []
    values: dict[str, list[bytes]] = {}
    # Quality cost of the storage kind: first answer token after the question on the stored
    # KV against the native KV of the very same prompt (repair off: storage error only).
    logits: dict[str, Any] = {}
    for storage in STORAGE_ROWS:
        kv = KVCache(lm, None, storage=storage)
        kv.add(ps)
        values[storage] = [encode_entry(kv.tiers.cpu.get(kv._key(kv._fp(c))))
                           for p in ps for c in kv.passage_chunks(p)]
        logits[storage] = first_token_logits(kv, qs[0]["question"], ps, None)
        kv.close()
    ref = logits["native"]
    quality = {s: (kl_divergence(ref, x), float((x - ref).abs().max())) for s, x in logits.items()}
    setup: dict[str, Any] = {}
    for storage, blobs in values.items():
        store = RedisStore(redis_url, prefix=f"ragcomp-bench-kvr-{storage}:")
        keys = [f"k{i}" for i in range(len(blobs))]
        for k, b in zip(keys, blobs, strict=True):
            store.set(k, b)
            plain.set(f"ragcomp-bench-plain:{storage}:{k}", b)
        # For the parallel load: what generate() does with no CPU tier in front.
        kv = KVCache(lm, store, storage=storage, cpu_bytes=0)
        setup[storage] = (store, keys, kv, [decode_entry(b) for b in blobs])
    times: dict[str, dict[str, list[float]]] = {s: {"plain": [], "store": [], "kv": [], "par": []}
                                                for s in values}
    # Rounds interleave the storage kinds, so a busy shared machine slows all of them alike.
    for _ in range(args.redis_rounds):
        for storage, (store, keys, kv, entries) in setup.items():
            t = times[storage]
            t0 = time.perf_counter()
            for k in keys:
                plain.get(f"ragcomp-bench-plain:{storage}:{k}")
            t["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for k in keys:
                store.get(k)
            t["store"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for k in keys:
                decode_entry(store.get(k))  # what a KV load does: read + checksum + map tensors
            t["kv"].append(time.perf_counter() - t0)
            # Every entry requested at once on the KV layer's I/O threads (store read, both
            # checksums, mapping the tensors), as generate() does.
            t0 = time.perf_counter()
            futures = [kv.tiers._pool.submit(kv.tiers.load_from_store, k, e.fingerprint, e.ids, None, False)
                       for k, e in zip(keys, entries, strict=True)]
            assert all(f.result() is not None for f in futures)
            t["par"].append(time.perf_counter() - t0)
    # The same KV in bf16 is what a GPU serves from: bytes it stands for / seconds to load.
    bf16_gb = sum(len(b) for b in values["bf16"]) / 1e9
    for storage, (store, keys, kv, _) in setup.items():
        med = {k: _median(v) for k, v in times[storage].items()}
        gb = sum(len(b) for b in values[storage]) / 1e9
        kl, max_abs = quality[storage]
        rows.append({"what": f"{len(keys)} chunk entries, {storage}", "MB": gb * 1e3,
                     "plain_GET_GBps": gb / med["plain"], "RedisStore_GBps": gb / med["store"],
                     "x_vs_plain": med["plain"] / med["store"], "KV_load_GBps": gb / med["kv"],
                     "KV_load_parallel_GBps": gb / med["par"],
                     "parallel_x_vs_plain": med["plain"] / med["par"],
                     "bf16_equiv_GBps": bf16_gb / med["par"],
                     "x_vs_plain_GET_of_bf16": _median(times["bf16"]["plain"]) / med["par"],
                     "next_token_KL": kl, "logits_max_abs": max_abs})
        kv.tiers.close()
        store.clear()
        store.close()
        plain.delete(*[f"ragcomp-bench-plain:{storage}:{k}" for k in keys])
    # One large value: the 16k-token KV of an 8B model is 2 GiB; 256 MiB keeps this quick.
    big = os.urandom(256 << 20)
    store = RedisStore(redis_url, prefix="ragcomp-bench-kvr-big:")
    store.set("big", big)
    plain.set("ragcomp-bench-plain:big", big)
    t_store, t_plain = [], []
    for _ in range(3):
        t = time.perf_counter()
        plain.get("ragcomp-bench-plain:big")
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.get("big")
        t_store.append(time.perf_counter() - t)
    gb = len(big) / 1e9
    rows.append({"what": "one 256 MiB value", "MB": len(big) / 1e6, "plain_GET_GBps": gb / _median(t_plain),
                 "RedisStore_GBps": gb / _median(t_store), "x_vs_plain": _median(t_plain) / _median(t_store),
                 "KV_load_GBps": None, "KV_load_parallel_GBps": None, "parallel_x_vs_plain": None,
                 "bf16_equiv_GBps": None, "x_vs_plain_GET_of_bf16": None, "next_token_KL": None,
                 "logits_max_abs": None})
    store.clear()
    store.close()
    plain.delete("ragcomp-bench-plain:big")
    plain.close()
    bf16, fp8 = (sum(len(b) for b in values[s]) for s in ("bf16", "fp8"))
    print_table(rows, f"Redis load (loopback, {os.cpu_count()} cores): RedisStore vs plain redis-py GET; "
                f"fp8 entries (scales included) are {fp8 / bf16:.3f} of bf16; bf16_equiv_GBps: bf16 bytes "
                "the loaded KV stands for per second (KV_load_parallel); KL / max abs: first answer token's "
                f"logits against native ({lm.model.dtype}) KV, same prompt")
    return rows
