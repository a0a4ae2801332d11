"""Redis and Redis Cluster byte stores, against a real redis-server on loopback."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ragcomp.stores import ByteStore, StoreError, open_store

RNG = np.random.default_rng(1234)


def random_bytes(n: int) -> bytes:
    return RNG.bytes(n)


redis_mark = pytest.mark.redis


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def raw(redis_url: str):
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def redis_store(url: str, prefix: str, **kw):
    from ragcomp.stores.redis import RedisStore

    return RedisStore(url, prefix=prefix, **kw)


def names(raw, prefix: str) -> list[bytes]:
    return sorted(raw.scan_iter(match=prefix + "*", count=1000))


@redis_mark
@pytest.mark.parametrize(
    "size",
    [0, 1, 256, 257, 1024, 4096, 10_000],
    ids=["empty", "one", "inline-limit", "one-chunk", "chunk-size", "exact-chunks", "partial-last-chunk"],
)
def test_redis_roundtrip(redis_url: str, prefix: str, raw, size: int) -> None:
    store = redis_store(redis_url, prefix, chunk_bytes=1024, inline_bytes=256, parallel=3)
    value = random_bytes(size)
    store.set("k", value)
    got = store.get("k")
    assert type(got) is bytes and got == value
    chunks = -(-size // 1024) if size > 256 else 0
    assert len(names(raw, prefix)) == 1 + chunks
    assert store.bytes_written == size and store.bytes_read == size
    store.close()


@redis_mark
def test_redis_overwrite_deletes_old_chunks(redis_url: str, prefix: str, raw) -> None:
    store = redis_store(redis_url, prefix, chunk_bytes=1000, inline_bytes=100, stale_ttl=0)
    store.set("k", random_bytes(5500))  # 6 chunks
    assert len(names(raw, prefix)) == 7
    second = random_bytes(2500)  # 3 chunks under a new write id
    store.set("k", second)
    assert store.get("k") == second
    assert len(names(raw, prefix)) == 4
    store.set("k", b"small")  # inline: no chunks at all
    assert store.get("k") == b"small"
    assert names(raw, prefix) == [f"{prefix}h:{{k}}".encode()]
    store.set("k", random_bytes(3000))
    store.delete("k")
    store.delete("k")  # deleting twice is fine
    assert store.get("k") is None
    assert names(raw, prefix) == []


@redis_mark
def test_redis_overwritten_chunks_expire_after_stale_ttl(redis_url: str, prefix: str, raw) -> None:
    store = redis_store(redis_url, prefix, chunk_bytes=1000, inline_bytes=100, stale_ttl=0.3)
    store.set("k", random_bytes(2500))
    old = _chunk_names(raw, prefix)
    assert len(old) == 3 and all(raw.pttl(n) == -1 for n in old)  # live chunks never expire
    store.set("k", b"x" * 1500)
    assert all(0 < raw.pttl(n) <= 300 for n in old)  # retired, not yet gone
    new = [n for n in _chunk_names(raw, prefix) if n not in old]
    assert len(new) == 2 and all(raw.pttl(n) == -1 for n in new)
    time.sleep(0.4)
    assert sorted(_chunk_names(raw, prefix)) == sorted(new)
    assert store.get("k") == b"x" * 1500
    store.delete("k")  # delete does not wait
    assert names(raw, prefix) == []


@redis_mark
def test_redis_get_many_set_many_keys_clear(redis_url: str, prefix: str, raw) -> None:
    store = redis_store(redis_url, prefix, chunk_bytes=512, inline_bytes=64, stale_ttl=0)
    items = {f"doc:{i}": random_bytes(n) for i, n in enumerate([0, 10, 64, 65, 2000, 513])}
    store.set_many(items.items())
    order = ["doc:4", "missing", "doc:0", "doc:5", "doc:1", "nope", "doc:4"]
    assert store.get_many(order) == [items.get(k) for k in order]
    assert store.get_many([]) == []
    store.set_many([("doc:4", b"replaced"), ("doc:9", b"new")])
    assert store.get_many(["doc:4", "doc:9"]) == [b"replaced", b"new"]
    # doc:4's 4 chunks went away with its old header; doc:3 (1 chunk) and doc:5 (2) remain
    assert sum(b":c:" in n for n in names(raw, prefix)) == 3
    store.set("other:1", b"x")
    assert sorted(store.keys("doc:")) == sorted([*items, "doc:9"])
    assert sorted(store.keys()) == sorted([*items, "doc:9", "other:1"])
    assert "doc:1" in store and "zzz" not in store
    store.clear()
    assert names(raw, prefix) == [] and list(store.keys()) == []


@redis_mark
def test_redis_keys_with_glob_characters_and_braces(redis_url: str, prefix: str) -> None:
    store = redis_store(redis_url, prefix, chunk_bytes=100, inline_bytes=10)
    keys = ["a*b", "a?c", "[x]", "{tag}", "}", "", "a\\b"]
    for k in keys:
        store.set(k, k.encode() * 50)
    for k in keys:
        assert store.get(k) == k.encode() * 50
    assert sorted(store.keys()) == sorted(keys)
    assert list(store.keys("a*")) == ["a*b"]
    assert list(store.keys("[")) == ["[x]"]


def _chunk_names(raw, prefix: str) -> list[bytes]:
    return [n for n in names(raw, prefix) if b":c:" in n]


@redis_mark
@pytest.mark.parametrize("parallel", [1, 4])
@pytest.mark.parametrize(
    "damage",
    [
        "flip-chunk-byte",
        "delete-chunk",
        "truncate-chunk",
        "wrong-type-chunk",
        "flip-inline-byte",
        "junk-header",
        "cut-header",
    ],
)
def test_redis_corrupt_entry_is_detected_and_removed(
    redis_url: str, prefix: str, raw, damage: str, parallel: int, caplog: pytest.LogCaptureFixture
) -> None:
    store = redis_store(redis_url, prefix, chunk_bytes=1000, inline_bytes=300, parallel=parallel)
    inline = damage == "flip-inline-byte"
    store.set("victim", random_bytes(200 if inline else 4500))
    store.set("bystander", b"ok" * 1000)
    hkey = f"{prefix}h:{{victim}}"
    chunk = (
        next(n for n in _chunk_names(raw, prefix) if b"victim" in n and n.endswith(b":3"))
        if not inline
        else None
    )
    if damage == "flip-chunk-byte":
        raw.setrange(chunk, 500, bytes([raw.getrange(chunk, 500, 500)[0] ^ 1]))
    elif damage == "delete-chunk":
        raw.delete(chunk)
    elif damage == "truncate-chunk":
        raw.set(chunk, raw.get(chunk)[:-1])
    elif damage == "wrong-type-chunk":  # an error reply: the direct read hands over to a pipeline
        raw.delete(chunk)
        raw.rpush(chunk, b"x")
    elif damage == "flip-inline-byte":
        raw.setrange(hkey, 150, bytes([raw.getrange(hkey, 150, 150)[0] ^ 1]))
    elif damage == "junk-header":
        raw.set(hkey, b"junk")
    elif damage == "cut-header":
        raw.set(hkey, raw.get(hkey)[:40])
    with caplog.at_level(logging.WARNING, logger="ragcomp.stores.redis"):
        assert store.get("victim") is None
    assert "corrupt" in caplog.text and "victim" in caplog.text
    left = names(raw, prefix)
    assert not [n for n in left if b"victim" in n], left  # header and remaining chunks removed
    assert store.get("bystander") == b"ok" * 1000
    assert store.get_many(["victim", "bystander"]) == [None, b"ok" * 1000]


@redis_mark
def test_redis_mid_size_value_is_split_across_connections(redis_url: str, prefix: str, raw) -> None:
    # Default chunk size (32 MiB) but min_split_bytes 1000: a 10 kB value becomes one chunk per
    # connection, so it is read in parallel; a value under 4 * 1000 bytes is not split finer.
    store = redis_store(redis_url, prefix, inline_bytes=256, min_split_bytes=1000, parallel=4)
    value = random_bytes(10_001)
    store.set("mid", value)
    assert len(_chunk_names(raw, prefix)) == 4
    assert store.get("mid") == value
    store.set("small", random_bytes(2500))  # 3 chunks of at least 1000 bytes
    assert len([n for n in _chunk_names(raw, prefix) if b"small" in n]) == 3
    store.close()


@redis_mark
def test_redis_digest_algorithms(redis_url: str, prefix: str, raw, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """New entries use xxh3-128 (algorithm 1 in the header); entries of the blake2b format
    (algorithm 0) still read; without xxhash an xxh3 entry is a miss, never deleted."""
    import ragcomp.stores.redis_format as mod

    pytest.importorskip("xxhash")
    store = redis_store(redis_url, prefix, chunk_bytes=1000, inline_bytes=300)
    new, old = random_bytes(4500), random_bytes(4500)
    store.set("new", new)
    assert int.from_bytes(raw.getrange(f"{prefix}h:{{new}}", 6, 7), "little") == 1
    monkeypatch.setattr(mod, "WRITE_ALGO", mod.BLAKE2B)
    store.set("old", old)
    store.set("old-inline", b"x" * 100)
    monkeypatch.undo()
    assert int.from_bytes(raw.getrange(f"{prefix}h:{{old}}", 6, 7), "little") == 0
    assert store.get_many(["new", "old", "old-inline"]) == [new, old, b"x" * 100]
    monkeypatch.setattr(mod, "_xxhash", None)
    before = names(raw, prefix)
    with caplog.at_level(logging.WARNING, logger="ragcomp.stores.redis"):
        assert store.get("new") is None
    assert "xxhash" in caplog.text
    assert names(raw, prefix) == before  # a miss here, not corruption: nothing removed
    assert store.get("old") == old
    store.close()


@redis_mark
def test_redis_corrupt_entry_in_get_many(redis_url: str, prefix: str, raw) -> None:
    store = redis_store(redis_url, prefix, chunk_bytes=100, inline_bytes=10)
    store.set_many([("a", b"a" * 350), ("b", b"b" * 350)])
    raw.delete(next(n for n in _chunk_names(raw, prefix) if b"{a}" in n))
    assert store.get_many(["a", "b"]) == [None, b"b" * 350]
    assert list(store.keys()) == ["b"]


@redis_mark
def test_redis_readers_during_overwrites_see_whole_values(redis_url: str, prefix: str) -> None:
    # Overwrites delete the previous chunks while readers may still be fetching them: a reader
    # must then follow the new header, never report corruption or return a mix.
    writer_store = redis_store(redis_url, prefix, chunk_bytes=2000, inline_bytes=100)
    reader_store = redis_store(redis_url, prefix, chunk_bytes=2000, inline_bytes=100, parallel=2)
    values = [bytes([i]) * 20_000 for i in range(1, 4)]
    writer_store.set("hot", values[0])
    stop = time.monotonic() + 0.8
    seen: list[bytes | None] = []

    def write() -> None:
        i = 0
        while time.monotonic() < stop:
            writer_store.set("hot", values[i % 3])
            i += 1

    def read() -> None:
        while time.monotonic() < stop:
            seen.append(reader_store.get("hot"))

    threads = [threading.Thread(target=write), threading.Thread(target=read), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and all(v in values for v in seen)
    assert reader_store.get("hot") in values


@redis_mark
def test_redis_down_is_a_store_error_naming_the_url() -> None:
    from ragcomp.stores.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port(False)}/0"
    start = time.monotonic()
    with pytest.raises(
        StoreError, match=r"cannot reach Redis at redis://127\.0\.0\.1:\d+/0: Connection refused"
    ):
        open_store(url)
    assert time.monotonic() - start < 5
    with pytest.raises(StoreError) as info:
        redis_store(url.replace("redis://", "redis://:s3cret@"), "p:")
    assert "s3cret" not in str(info.value) and ":***@" in str(info.value)
    cluster_url = url.replace("redis://", "redis+cluster://").removesuffix("/0")
    expected = re.escape(f"cannot reach Redis at {cluster_url}: Connection refused")
    with pytest.raises(StoreError, match=expected):
        open_store(cluster_url)


@redis_mark
@pytest.mark.usefixtures("redis_url")  # skips (or fails on CI) without a redis-server binary
def test_redis_going_down_later_is_a_store_error(tmp_path: Path) -> None:
    from ragcomp.stores.redis import local_redis_server

    with local_redis_server(tmp_path) as url:
        store = redis_store(url, "p:", chunk_bytes=1000, inline_bytes=10)
        store.set("k", b"v" * 5000)
        assert store.get("k") == b"v" * 5000
    for op in (lambda: store.get("k"), lambda: store.set("k", b"v"), lambda: store.get_many(["k"])):
        with pytest.raises(StoreError, match=re.escape(f"cannot reach Redis at {url}")):
            op()
    store.close()


@redis_mark
def test_redis_rejects_bad_arguments(redis_url: str) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        redis_store(redis_url, "p:", chunk_bytes=600 << 20)
    with pytest.raises(ValueError, match="parallel"):
        redis_store(redis_url, "p:", parallel=0)
    store = redis_store(redis_url, "p:")
    with pytest.raises(TypeError, match="bytes"):
        store.set("k", "not bytes")  # type: ignore[arg-type]
    assert isinstance(store, ByteStore)
    store.close()


# -- Redis Cluster -------------------------------------------------------------------------------


@redis_mark
def test_redis_cluster_multichunk_roundtrip(redis_cluster_urls: list[str], prefix: str) -> None:
    pytest.importorskip("redis")
    from redis.cluster import RedisCluster

    url = redis_cluster_urls[0].replace("redis://", "redis+cluster://")
    store = open_store(url)
    assert store.cluster  # type: ignore[attr-defined]
    store.close()
    store = redis_store(url, prefix, chunk_bytes=4096, inline_bytes=100, parallel=3)
    big = random_bytes(50_000)  # 13 chunks
    store.set("big", big)
    assert store.get("big") == big
    many = {f"k{i}": random_bytes(i * 700) for i in range(12)}  # spread over slots and nodes
    store.set_many(many.items())
    assert store.get_many([*many, "missing"]) == [*many.values(), None]
    assert sorted(store.keys("k")) == sorted(many)

    rc = RedisCluster.from_url(redis_cluster_urls[0])
    try:
        big_keys = [n for n in rc.scan_iter(match=f"{prefix}*{{big}}*", count=1000)]
        assert len(big_keys) == 14
        assert len({rc.keyslot(k) for k in big_keys}) == 1  # one hash tag: one slot, one node
        chunk = next(k for k in big_keys if k.endswith(b":5"))
        rc.setrange(chunk, 10, b"\x00\x01\x02")
        assert store.get("big") is None
        assert not [n for n in rc.scan_iter(match=f"{prefix}*{{big}}*")]
        store.set("big", big)
        store.stale_ttl = 0
        store.set("big", big[:9000])  # overwrite: the old chunks go
        assert store.get("big") == big[:9000]
        assert len(list(rc.scan_iter(match=f"{prefix}*{{big}}*"))) == 1 + 3
        # an empty hash tag spreads a value's records over slots: still correct (slow path)
        store.set("", big)
        assert store.get("") == big
        store.clear()
        assert not list(rc.scan_iter(match=f"{prefix}*"))
    finally:
        rc.close()
        store.close()
