"""RedisStore's batched fast read (every header, then every chunk of every value, straight off
the socket) and the KV tiers' batched load on top of it, against a real redis-server."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.redis
redis = pytest.importorskip("redis")
torch = pytest.importorskip("torch")

import ragcomp.stores.redis_wire as wire  # noqa: E402
from ragcomp.kv.codec import ChunkKV, encode_entry, quantize  # noqa: E402
from ragcomp.kv.tiers import TieredKV  # noqa: E402
from ragcomp.stores.redis import RedisStore  # noqa: E402

SIZES = {"empty": 0, "inline": 200, "one-chunk": 900, "chunks": 4500, "exact": 3000, "big": 20_000}


def value_of(name: str) -> bytes:
    seed = sum(name.encode())
    return bytes((seed + 31 * i) % 251 for i in range(SIZES[name]))


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    s = RedisStore(redis_url, prefix=f"batch-{uuid.uuid4().hex[:8]}:", chunk_bytes=1000, inline_bytes=300,
                   min_split_bytes=1000)
    s.set_many((name, value_of(name)) for name in SIZES)
    yield s
    s.clear()
    s.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many pipelined GET batches (one round trip each) the fast path sends, and their sizes."""
    sizes: list[int] = []
    original = wire.raw_gets

    def counting(pool, keys):
        sizes.append(len(keys))
        return original(pool, keys)

    monkeypatch.setattr(wire, "raw_gets", counting)
    return sizes


def chunk_names(raw: redis.Redis, store: RedisStore, key: str) -> list[bytes]:
    return sorted(raw.scan_iter(match=f"{store.prefix}c:{{{key}}}:*", count=1000))


def test_get_many_is_two_round_trips_and_returns_exactly_what_was_written(
    store: RedisStore, connections: list[int]
) -> None:
    order = ["big", "missing", "empty", "chunks", "inline", "big", "exact", "one-chunk"]
    got = store.get_many(order)
    assert got == [None if k == "missing" else value_of(k) for k in order]
    assert all(type(v) is bytes for v in got if v is not None)
    # 8 headers, then every chunk of the chunked values (20 + 5 + 3 + 1, "big" twice): 2 batches
    assert connections == [8, 20 + 5 + 20 + 3 + 1]
    assert store.bytes_read == sum(SIZES[k] for k in order if k != "missing")


def test_large_batch_is_spread_over_connections(redis_url: str, connections: list[int]) -> None:
    store = RedisStore(redis_url, prefix=f"batch-{uuid.uuid4().hex[:8]}:", chunk_bytes=1000, inline_bytes=300,
                       min_split_bytes=1000, parallel=3, parallel_min_bytes=10_000)
    values = {f"v{i}": bytes([i]) * (9_000 + i) for i in range(4)}  # 39 chunks, 36 kB
    store.set_many(values.items())
    assert store.get_many(list(values)) == list(values.values())
    # headers on one connection, then 3 parts (36 kB / 10 kB, at most `parallel`), all chunks read once
    assert connections[0] == 4 and len(connections) == 4 and sum(connections[1:]) == 9 + 10 + 10 + 10
    store.parallel_min_bytes = 1 << 30
    assert store.get("v3") == values["v3"] and connections[-1] == 10  # a small read: one connection
    store.clear()
    store.close()


def test_split_plan_parts_are_contiguous_and_balanced() -> None:
    owner = wire.Fetched()
    sizes = [5, 1, 1, 1, 5, 3, 2, 2]
    plan = [(f"c{i}", memoryview(bytearray(size)), b"", 1, owner) for i, size in enumerate(sizes)]
    # parts follow bytes: 8 connections for 20 bytes get 6 runs, as a 5-byte chunk spans two shares
    for parallel, min_bytes, parts in [(4, 100, 1), (4, 10, 2), (4, 1, 4), (2, 1, 2), (99, 1, 6)]:
        split = wire.split_plan(plan, parallel, min_bytes)
        assert len(split) == parts
        assert [c for part in split for c in part] == plan  # every chunk once, in order
    assert [sum(len(c[1]) for c in p) for p in wire.split_plan(plan, 2, 1)] == [8, 12]  # 20 bytes in two
    assert wire.split_plan([], 4, 1) == []


@pytest.mark.parametrize("damage", ["flip-chunk-byte", "truncate-chunk", "delete-chunk", "wrong-type-chunk",
                                    "flip-inline-byte", "junk-header", "cut-header"])
def test_one_damaged_entry_in_a_batch_drops_only_that_entry(
    store: RedisStore, raw: redis.Redis, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    victim = "inline" if damage == "flip-inline-byte" else "chunks"
    hkey = f"{store.prefix}h:{{{victim}}}"
    chunk = chunk_names(raw, store, "chunks")[2]
    if damage == "flip-chunk-byte":
        raw.setrange(chunk, 7, bytes([raw.getrange(chunk, 7, 7)[0] ^ 0x10]))
    elif damage == "truncate-chunk":
        raw.set(chunk, raw.get(chunk)[:-1])
    elif damage == "delete-chunk":
        raw.delete(chunk)
    elif damage == "wrong-type-chunk":
        raw.delete(chunk)
        raw.rpush(chunk, b"x")
    elif damage == "flip-inline-byte":
        raw.setrange(hkey, 150, bytes([raw.getrange(hkey, 150, 150)[0] ^ 1]))
    elif damage == "junk-header":
        raw.set(hkey, b"RCRS" + b"\x01" * 30)
    else:
        raw.set(hkey, raw.get(hkey)[:40])
    names = list(SIZES)
    with caplog.at_level(logging.WARNING, logger="ragcomp.stores.redis"):
        got = store.get_many(names)
    assert got == [None if k == victim else value_of(k) for k in names]
    assert f"corrupt entry '{victim}'" in caplog.text
    assert raw.get(hkey) is None and chunk_names(raw, store, victim) == []  # all its records gone
    assert store.get_many(names) == got  # the connection is still in step


def test_fast_path_refused_falls_back_to_pipelines(store: RedisStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pool, keys):
        raise wire.NoFastPath  # what a TLS connection does

    monkeypatch.setattr(wire, "raw_gets", refuse)
    assert store.get_many(list(SIZES)) == [value_of(k) for k in SIZES]


# -- the KV tiers on top -------------------------------------------------------------------------


def make_chunk(seed: int, storage: str) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 3, 7 + seed, 8, generator=g) for _ in range(2))
    k, v, ks, vs = quantize(k, v, storage)
    return ChunkKV(list(range(seed, seed + 7 + seed)), k, v, 5, f"fp{seed}", storage, ks, vs)


def equal(a: ChunkKV, b: ChunkKV) -> bool:
    same = [torch.equal(x, y) for x, y in ((a.keys, b.keys), (a.values, b.values))]
    if a.k_scale is not None:
        same += [torch.equal(a.k_scale, b.k_scale), torch.equal(a.v_scale, b.v_scale)]
    meta = [(c.ids, c.base, c.fingerprint, c.storage) for c in (a, b)]
    return all(same) and meta[0] == meta[1]


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_lookup_many_loads_every_entry_with_one_read_and_drops_only_the_corrupt_one(
    store: RedisStore, raw: redis.Redis, storage: str, connections: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ragcomp.kv.tiers as tiers_mod

    chunks = {f"e{i}": make_chunk(i, storage) for i in range(5)}
    store.set_many((k, encode_entry(c)) for k, c in chunks.items())
    verified: list[bool] = []
    decode = tiers_mod.decode_entry

    def recording(data, verify=True):
        verified.append(verify)
        return decode(data, verify)

    monkeypatch.setattr(tiers_mod, "decode_entry", recording)
    tiers = TieredKV(store, "cpu", 0, 0)
    items = [(k, c.fingerprint, c.ids) for k, c in chunks.items()]
    connections.clear()
    loaded = [f.result() for f in tiers.lookup_many(items)]
    assert all(equal(a, b) for a, b in zip(loaded, chunks.values(), strict=True))
    assert len(connections) == 2  # all five entries: one batch of headers, one of chunks
    assert verified == [False] * 5  # the store checked every byte: no second checksum pass
    victim = chunk_names(raw, store, "e3")[0]
    raw.setrange(victim, 3, b"\xff\xfe")
    loaded = [f.result() for f in tiers.lookup_many(items)]
    assert loaded[3] is None
    assert all(equal(a, chunks[k]) for (k, _, _), a in zip(items, loaded, strict=True) if k != "e3")
    assert "e3" not in set(store.keys("e"))
    tiers.close()


# -- reused receive buffers ----------------------------------------------------------------------


def test_buffer_views_are_read_only_and_never_recycled_under_a_borrower(store: RedisStore) -> None:
    names = ["big", "chunks", "inline", "missing"]
    first = store.get_many_buffers(names)
    assert [None if v is None else bytes(v) for v in first] == [*map(value_of, names[:3]), None]
    assert all(isinstance(v, memoryview) and v.readonly for v in first[:3])
    mapped = torch.frombuffer(bytearray(first[0]), dtype=torch.uint8)  # a copy: holds nothing
    held = first[0][100:200]  # a slice keeps the whole buffer lent
    del first
    store.set("big", b"\x07" * 20_000)  # same size: would take the same buffer if it were free
    again = store.get_many_buffers(["big", "chunks"])
    assert bytes(again[0]) == b"\x07" * 20_000 and bytes(again[1]) == value_of("chunks")
    assert bytes(held) == value_of("big")[100:200] and bytes(mapped[:4].tolist()) == value_of("big")[:4]


def test_buffer_pool_reuses_free_buffers_within_its_cap() -> None:
    from ragcomp.stores.buffers import BufferPool

    pool = BufferPool(330 << 10)
    out, fill = pool.take(100_000)
    fill[:3] = b"abc"
    first = id(out.obj)  # not the object: holding it would keep the buffer lent
    del out, fill
    out, fill = pool.take(90_000)  # free and about the size: the same memory again
    assert id(out.obj) == first and len(out) == 90_000 and out.readonly and not fill.readonly
    held = out
    out2, _ = pool.take(90_000)  # the first is lent: a second buffer
    assert id(out2.obj) != first and pool.nbytes == 2 * (128 << 10)
    big, _ = pool.take(200_000)  # over the cap while both are lent: fresh, not kept
    assert pool.nbytes == 2 * (128 << 10)
    del out2, big
    _, _ = pool.take(150_000)  # the free one of another size makes room
    assert pool.nbytes == (128 << 10) + (192 << 10) and id(held.obj) == first
    with pytest.raises(ValueError, match="max_bytes"):
        BufferPool(-1)
    off = BufferPool(0)
    off.take(10)
    assert off.nbytes == 0
