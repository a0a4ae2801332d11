"""`ragcomp bench redis`: RedisStore against plain redis-py on one large value, side by side.

Both clients move the same random bytes through the same server in one run, interleaved, so
the ratio holds even on a busy machine. RedisStore splits the value into checksummed chunks,
reads them over several connections and receives them straight into the result; plain redis-py
stores one string and GETs it through its reply parser. Without --url a throwaway
redis-server is started on loopback (no persistence) and stopped afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

from ragcomp.bench import print_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("redis", help="RedisStore get/set throughput against a plain redis-py GET/SET")
    p.add_argument("--url", default=None, help="Redis to use (default: start a throwaway redis-server)")
    p.add_argument("--size-mb", type=float, default=256.0, help="value size in MiB (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds per client (default 3)")
    p.add_argument("--chunk-mb", type=float, default=32.0, help="RedisStore chunk size in MiB (default 32)")
    p.add_argument("--parallel", type=int, default=4, help="RedisStore connections per value (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.size_mb <= 0 or args.repeat < 1:
        raise ValueError("--size-mb must be > 0 and --repeat >= 1")
    if args.url:
        bench(args.url, args)
        return 0
    from ragcomp.stores.redis import local_redis_server

    with tempfile.TemporaryDirectory(prefix="ragcomp-bench-redis-") as tmp, local_redis_server(tmp) as url:
        bench(url, args, note="throwaway local redis-server")
    return 0


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(url: str, args: argparse.Namespace, note: str = "") -> list[dict[str, object]]:
    import numpy as np
    import redis

    from ragcomp.stores.redis import RedisStore, redact_url

    size = int(args.size_mb * (1 << 20))
    chunk = max(1, int(args.chunk_mb * (1 << 20)))
    data = np.random.default_rng(0).bytes(size)
    tag = uuid.uuid4().hex[:8]
    plain_key = f"ragcomp-bench:{tag}:plain"
    plain = redis.Redis.from_url(url)  # redis-py as most code uses it: defaults, one connection
    stores = {
        p: RedisStore(url, prefix=f"ragcomp-bench:{tag}:p{p}:", chunk_bytes=chunk, parallel=p, stale_ttl=0)
        for p in sorted({1, args.parallel})
    }
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    try:
        for _ in range(args.repeat):
            record("SET plain redis-py", _timed(lambda: plain.set(plain_key, data)))
            for p, store in stores.items():
                record(f"SET RedisStore parallel={p}", _timed(lambda s=store: s.set("value", data)))
        if plain.get(plain_key) != data or any(s.get("value") != data for s in stores.values()):
            raise RuntimeError("a value read back differs from what was written")
        for _ in range(args.repeat):  # interleaved, so load spikes hit every client alike
            record("GET plain redis-py", _timed(lambda: plain.get(plain_key)))
            for p, store in stores.items():
                record(f"GET RedisStore parallel={p}", _timed(lambda s=store: s.get("value")))
        for _ in range(args.repeat):
            record("blake2b of the value (checksum cost)", _timed(lambda: hashlib.blake2b(data).digest()))
    finally:
        plain.delete(plain_key)
        plain.close()
        for store in stores.values():
            store.clear()
            store.close()

    rows: list[dict[str, object]] = []
    base = {
        "SET": statistics.median(times["SET plain redis-py"]),
        "GET": statistics.median(times["GET plain redis-py"]),
    }
    for name, ts in times.items():
        op = name.split()[0]
        med = statistics.median(ts)
        rows.append(
            {
                "what": name,
                "MiB": round(size / (1 << 20), 1),
                "best s": min(ts),
                "median s": med,
                "GB/s (median)": size / med / 1e9,
                "vs plain (median)": f"{base[op] / med:.2f}x" if op in base else "",
            }
        )
    where = note or redact_url(url)
    title = (
        f"Redis throughput, one {size / (1 << 20):.0f} MiB value, chunks of {chunk / (1 << 20):g} MiB, "
        f"{args.repeat} rounds, {os.cpu_count()} CPUs ({where})"
    )
    print_table(rows, title=title)
    return rows
