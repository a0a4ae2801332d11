"""`ragcomp bench kv --part redis`: loading retrieved chunks' KV from Redis.

The baseline is what a user would do without ragcomp: one plain redis-py GET per entry of the
same bytes (redis-py's default client, the same server, timed in the same interleaved rounds).
Per storage kind (bf16, the model's native dtype, fp8 and int8 with per-token scales), rows time:

- plain redis-py GET per entry (the baseline) and a plain redis-py pipeline of all GETs;
- RedisStore.get per entry and RedisStore.get_many of all entries (bytes, checksums checked);
- the KV layer's load as generate() does it with no CPU tier in front: one TieredKV.lookup per
  entry (a store read per entry on the I/O threads) and one TieredKV.lookup_many (one store
  read of all entries); both check every byte once and map the tensors.

GBps counts the bytes read; bf16_equiv_GBps counts the bf16 bytes the loaded KV stands for (the
KV a user gets), so x_vs_plain_GET_bf16 compares every row with the plain GET of the bf16
entries. page_faults shows what fresh memory costs: plain redis-py grows a buffer per reply,
which pays a kernel page fault per 4 KiB whenever glibc has given freed memory back (its
default once freed blocks are large); RedisStore receives into reused buffers. A second table
gives what fp8/int8 cost in answer quality (first answer token's logits against native KV on
the same prompt); the last rows load one 256 MiB value.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ragcomp.bench import print_table
from ragcomp.bench.common import median, read_questions, retrieve_passages
from ragcomp.bench.kv_quality import first_token_logits, kl_divergence

# bf16 first (the baseline); native is the model's own dtype (fp32 on CPU).
STORAGE_ROWS = ("bf16", "native", "fp8", "int8")
PLAIN = "plain redis-py GET per entry (baseline)"
METHODS = (
    PLAIN,
    "plain redis-py pipeline, all entries",
    "RedisStore.get per entry",
    "RedisStore.get_many, all entries",
    "KV load: TieredKV.lookup per entry",
    "KV load: TieredKV.lookup_many, all entries",
)


def _loaders(plain: Any, storage: str, store: Any, keys: list[str], kv: Any, entries: list[Any]
             ) -> dict[str, Callable[[], object]]:
    """What each row times, for one storage kind."""
    plain_keys = [f"ragcomp-bench-plain:{storage}:{k}" for k in keys]
    items = [(k, e.fingerprint, e.ids) for k, e in zip(keys, entries, strict=True)]

    def plain_pipeline() -> list[bytes]:
        pipe = plain.pipeline(transaction=False)
        for k in plain_keys:
            pipe.get(k)
        return pipe.execute()

    def kv_loaded(found: list[Any]) -> list[Any]:
        chunks = [f.result() if isinstance(f, Future) else f for f in found]
        if any(c is None for c in chunks):
            raise RuntimeError(f"{storage}: an entry failed to load")
        return chunks

    return {
        PLAIN: lambda: [plain.get(k) for k in plain_keys],
        METHODS[1]: plain_pipeline,
        METHODS[2]: lambda: [store.get(k) for k in keys],
        METHODS[3]: lambda: store.get_many(keys),
        METHODS[4]: lambda: kv_loaded([kv.tiers.lookup(*item) for item in items]),
        METHODS[5]: lambda: kv_loaded(kv.tiers.lookup_many(items)),
    }


def bench_redis(args: argparse.Namespace, redis_url: str | None) -> list[dict[str, Any]]:
    if not redis_url:
        return []
    redis = __import__("redis")
    from ragcomp.kv.cache import KVCache
    from ragcomp.kv.codec import decode_entry, encode_entry
    from ragcomp.models import load_causal_lm
    from ragcomp.stores.redis import RedisStore

    lm = load_causal_lm(args.model)
    qs = read_questions(args.qa, 1)
    ps = retrieve_passages(qs, args.top_k)[0]
    plain = redis.Redis.from_url(redis_url)
    values: dict[str, list[bytes]] = {}
    # Quality cost of the storage kind: first answer token after the question on the stored
    # KV against the native KV of the very same prompt (repair off: storage error only).
    logits: dict[str, Any] = {}
    for storage in STORAGE_ROWS:
        kv = KVCache(lm, None, storage=storage)
        kv.add(ps)
        values[storage] = [encode_entry(kv.tiers.cpu.get(kv.layout.key(kv.layout.fingerprint(c))))
                           for p in ps for c in kv.passage_chunks(p)]
        logits[storage] = first_token_logits(kv, qs[0]["question"], ps, None)
        kv.close()
    setup: dict[str, tuple[Any, Any, dict[str, Callable[[], object]]]] = {}
    for storage, blobs in values.items():
        store = RedisStore(redis_url, prefix=f"ragcomp-bench-kvr-{storage}:")
        keys = [f"k{i}" for i in range(len(blobs))]
        for k, b in zip(keys, blobs, strict=True):
            store.set(k, b)
            plain.set(f"ragcomp-bench-plain:{storage}:{k}", b)
        # No CPU tier in front: every lookup goes to the store, as a cold generate() does.
        kv = KVCache(lm, store, storage=storage, cpu_bytes=0)
        loaders = _loaders(plain, storage, store, keys, kv, [decode_entry(b) for b in blobs])
        for load in loaders.values():
            load()  # warm: connections open, code paths imported
        setup[storage] = (store, kv, loaders)
    times: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METHODS} for s in values}
    faults: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METHODS} for s in values}
    # Rounds interleave storage kinds and methods, so a busy shared machine slows all alike.
    for _ in range(args.redis_rounds):
        for storage, (_, _, loaders) in setup.items():
            for method, load in loaders.items():
                f0 = _minor_faults()
                t0 = time.perf_counter()
                load()
                times[storage][method].append(time.perf_counter() - t0)
                faults[storage][method].append(_minor_faults() - f0)
    bf16_gb = sum(len(b) for b in values["bf16"]) / 1e9
    plain_bf16 = median(times["bf16"][PLAIN])
    rows = []
    for storage, (store, kv, _) in setup.items():
        gb = sum(len(b) for b in values[storage]) / 1e9
        plain_same = median(times[storage][PLAIN])
        for method in METHODS:
            med = median(times[storage][method])
            rows.append({"what": f"{len(values[storage])} entries, {storage}: {method}", "MB": gb * 1e3,
                         "GBps": gb / med, "x_vs_plain_GET_same_bytes": plain_same / med,
                         "bf16_equiv_GBps": bf16_gb / med, "x_vs_plain_GET_bf16": plain_bf16 / med,
                         "page_faults": median(faults[storage][method])})
        kv.tiers.close()
        store.clear()
        store.close()
        plain.delete(*[f"ragcomp-bench-plain:{storage}:k{i}" for i in range(len(values[storage]))])
    rows += _big_value(redis_url, plain)
    plain.close()
    bf16, fp8 = (sum(len(b) for b in values[s]) for s in ("bf16", "fp8"))
    print_table(rows, f"Redis load (loopback, {os.cpu_count()} cores, median of {args.redis_rounds} "
                "interleaved rounds): every row against a plain redis-py GET per entry of the same bytes "
                "(x_vs_plain_GET_same_bytes) and of the bf16 entries (x_vs_plain_GET_bf16); bf16_equiv_GBps: "
                f"bf16 bytes the loaded KV stands for per second; fp8/int8 entries (scales included) are "
                f"{fp8 / bf16:.3f} of bf16; page_faults: minor page faults per call (fresh memory the kernel "
                "maps and zeroes; glibc settings such as MALLOC_TRIM_THRESHOLD_ change them)")
    ref = logits["native"]
    quality = [{"storage": s, "MB": sum(len(b) for b in values[s]) / 1e6,
                "next_token_KL": kl_divergence(ref, x), "logits_max_abs": float((x - ref).abs().max())}
               for s, x in logits.items()]
    print_table(quality, f"Quality cost of the storage kind: first answer token's logits against native "
                f"({lm.model.dtype}) KV, same prompt, no repair")
    return rows + quality


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _big_value(redis_url: str, plain: Any) -> list[dict[str, Any]]:
    """One large value: the 16k-token KV of an 8B model is 2 GiB; 256 MiB keeps this quick."""
    from ragcomp.stores.redis import RedisStore

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
    store.clear()
    store.close()
    plain.delete("ragcomp-bench-plain:big")
    gb = len(big) / 1e9
    return [{"what": f"one 256 MiB value: {what}", "MB": len(big) / 1e6, "GBps": gb / median(t),
             "x_vs_plain_GET_same_bytes": median(t_plain) / median(t), "bf16_equiv_GBps": None,
             "x_vs_plain_GET_bf16": None, "page_faults": None}
            for what, t in (("plain redis-py GET (baseline)", t_plain), ("RedisStore.get", t_store))]
