"""Byte stores (disk, Redis, Redis Cluster) and the FAISS index, against real backends."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ragcomp.stores import ByteStore, MemoryStore, StoreError, open_store
from ragcomp.stores.disk import DiskStore

RNG = np.random.default_rng(1234)


def random_bytes(n: int) -> bytes:
    return RNG.bytes(n)


# -- disk ----------------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> DiskStore:
    return DiskStore(tmp_path / "store")


@pytest.mark.parametrize("size", [0, 1, 4096, 3 << 20])
def test_disk_roundtrip(disk: DiskStore, size: int) -> None:
    value = random_bytes(size)
    disk.set("k", value)
    got = disk.get("k")
    assert type(got) is bytes and got == value


def test_disk_keys_any_string_overwrite_delete(disk: DiskStore) -> None:
    keys = ["", "a/b/../c", "ключ ✓", "x" * 1000, "emb:1", "emb:2", "kv:1"]
    for i, k in enumerate(keys):
        disk.set(k, bytes([i]) * (i + 1))
    for i, k in enumerate(keys):
        assert disk.get(k) == bytes([i]) * (i + 1)
    assert sorted(disk.keys()) == sorted(keys)
    assert sorted(disk.keys("emb:")) == ["emb:1", "emb:2"]
    disk.set("emb:1", b"new")
    assert disk.get("emb:1") == b"new"
    disk.delete("emb:1")
    disk.delete("never-there")  # no error
    assert disk.get("emb:1") is None and "emb:1" not in disk
    assert disk.get_many(["kv:1", "missing", "emb:2", "kv:1"]) == [
        b"\x06" * 7,
        None,
        b"\x05" * 6,
        b"\x06" * 7,
    ]
    # files fan out under two levels and no temporary file is left behind
    files = [p for p in disk.root.rglob("*") if p.is_file()]
    assert len(files) == len(keys) - 1
    assert all(p.relative_to(disk.root).parts[0] == p.name[:2] for p in files)
    assert not [p for p in files if p.name.startswith(".tmp")]


def test_disk_accepts_bytearray_and_memoryview_but_not_str(disk: DiskStore) -> None:
    disk.set("a", bytearray(b"abc"))
    disk.set("b", memoryview(b"xyz"))
    assert disk.get("a") == b"abc" and disk.get("b") == b"xyz"
    with pytest.raises(TypeError, match="bytes"):
        disk.set("c", "text")  # type: ignore[arg-type]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_flip_last_byte, id="flipped-payload-byte"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-10]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:20]), id="truncated-header"),
        pytest.param(lambda p: p.write_bytes(b"JUNK" + p.read_bytes()[4:]), id="bad-magic"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty-file"),
    ],
)
def test_disk_corrupt_file_is_dropped(disk: DiskStore, damage, caplog: pytest.LogCaptureFixture) -> None:
    disk.set("victim", random_bytes(1000))
    disk.set("other", b"fine")
    path = disk.path_for("victim")
    damage(path)
    with caplog.at_level(logging.WARNING, logger="ragcomp.stores.disk"):
        assert disk.get("victim") is None
    assert "corrupt" in caplog.text and "victim" in caplog.text
    assert not path.exists()
    assert disk.get("other") == b"fine"
    disk.set("victim", b"again")  # the key is usable again
    assert disk.get("victim") == b"again"


def test_disk_concurrent_writers_never_expose_torn_values(disk: DiskStore) -> None:
    # Each value is one byte repeated: a torn or interleaved write would mix bytes.
    values = [bytes([i]) * 200_000 for i in range(1, 5)]
    errors: list[str] = []
    stop = time.monotonic() + 0.6

    def writer(v: bytes) -> None:
        while time.monotonic() < stop:
            disk.set("shared", v)

    def reader() -> None:
        while time.monotonic() < stop:
            got = disk.get("shared")
            if got is not None and got not in values:
                errors.append(f"torn value of {len(got)} bytes")

    threads = [threading.Thread(target=writer, args=(v,)) for v in values]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert disk.get("shared") in values
    assert list(disk.keys()) == ["shared"]


def test_open_store_specs(tmp_path: Path) -> None:
    assert isinstance(open_store(None), MemoryStore)
    store = open_store(f"disk:{tmp_path}/d")
    assert isinstance(store, DiskStore) and store.root == tmp_path / "d"
    mine = MemoryStore()
    assert open_store(mine) is mine
    with pytest.raises(ValueError, match="unknown store"):
        open_store("s3://bucket")


# -- Redis ---------------------------------------------------------------------------------------

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
    from ragcomp.stores.redis import _free_port

    url = f"redis://127.0.0.1:{_free_port(False)}/0"
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


# -- FAISS ---------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def faiss_mod():
    return pytest.importorskip("faiss")


def make_index(n: int = 300, dim: int = 24, **kw):
    from ragcomp.stores.faiss import FaissIndex

    vecs = RNG.standard_normal((n, dim)).astype(np.float32) * RNG.uniform(0.1, 5, (n, 1)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(n)]
    index = FaissIndex(dim, **kw)
    index.add(ids, vecs)
    return index, ids, vecs


def brute_force(vecs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = unit(queries.astype(np.float64)) @ unit(vecs.astype(np.float64)).T
    order = np.argsort(-scores, axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_faiss_search_matches_numpy(faiss_mod) -> None:
    index, ids, vecs = make_index()
    queries = RNG.standard_normal((7, 24)).astype(np.float64) * 3  # float64 and unnormalised
    got = index.search(queries, 10)
    order, scores = brute_force(vecs, queries, 10)
    assert len(got) == 7
    for row, o, s in zip(got, order, scores, strict=True):
        assert [i for i, _ in row] == [ids[j] for j in o]
        np.testing.assert_allclose([sc for _, sc in row], s, atol=1e-5)
        assert all(isinstance(sc, float) for _, sc in row)


def test_faiss_query_shapes_and_k(faiss_mod) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index, ids, vecs = make_index(n=5, dim=8)
    one = index.search(vecs[2], 1)  # 1-D query
    assert one[0][0][0] == "doc-2" and one[0][0][1] == pytest.approx(1.0, abs=1e-5)
    everything = index.search(vecs[:2], 50)  # k > size: all of them
    assert [len(r) for r in everything] == [5, 5]
    assert sorted(i for i, _ in everything[0]) == sorted(ids)
    assert index.search(vecs[:3], 0) == [[], [], []]
    assert index.search(np.zeros((0, 8), np.float32), 3) == []
    empty = FaissIndex(8)
    assert len(empty) == 0 and empty.search(vecs[:2], 5) == [[], []]
    with pytest.raises(ValueError, match="k must be"):
        index.search(vecs[0], -1)


def test_faiss_bad_input_errors_name_the_problem(faiss_mod) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index = FaissIndex(16)
    with pytest.raises(ValueError, match=r"shape \(n, 16\) or \(16,\), got \(3, 12\)"):
        index.add(["a", "b", "c"], np.ones((3, 12), np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 16\).*got \(12,\)"):
        index.search(np.ones(12, np.float32), 1)
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        index.add(["a", "b"], np.ones((3, 16), np.float32))
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        index.add(["a", "a"], np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add(["a"], np.full((1, 16), np.nan, np.float32))
    index.add(["a"], np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="'a' is already in the index"):
        index.add(["a"], np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        FaissIndex(0)
    with pytest.raises(ValueError, match="NoSuchIndex"):
        FaissIndex(16, "NoSuchIndex")
    assert len(index) == 1  # failed adds left nothing behind


def test_faiss_vectors_by_id(faiss_mod) -> None:
    index, _, vecs = make_index(n=50, dim=12)
    got = index.vectors(["doc-7", "doc-0", "doc-7"])
    np.testing.assert_allclose(got, unit(vecs[[7, 0, 7]]), atol=1e-6)
    assert index.vectors([]).shape == (0, 12)
    with pytest.raises(KeyError, match="doc-999"):
        index.vectors(["doc-1", "doc-999"])


def test_faiss_save_load_roundtrip(faiss_mod, tmp_path: Path) -> None:
    from ragcomp.stores.faiss import FaissIndex, open_index

    index, ids, _ = make_index(n=120, dim=16, info={"model": "minilm", "normalize": True})
    folder = index.save(tmp_path / "idx")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.json", "index.faiss", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["dim"], meta["count"], meta["info"]["model"]) == (16, 120, "minilm")
    loaded = FaissIndex.load(folder)
    assert (loaded.dim, len(loaded), loaded.info, loaded.ids) == (16, 120, index.info, ids)
    q = RNG.standard_normal((4, 16)).astype(np.float32)
    assert loaded.search(q, 7) == index.search(q, 7)
    np.testing.assert_allclose(loaded.vectors(["doc-3"]), index.vectors(["doc-3"]))
    loaded.add(["extra"], q[:1])  # a loaded index keeps growing
    assert loaded.search(q[0], 1)[0][0][0] == "extra"
    again = open_index(folder, dim=16)
    assert len(again) == 120
    with pytest.raises(ValueError, match="has dim 16, expected 32"):
        open_index(folder, dim=32)
    fresh = open_index(tmp_path / "none-yet", dim=16)
    assert len(fresh) == 0
    with pytest.raises(ValueError, match="give dim"):
        open_index(tmp_path / "none-yet")


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        ("meta-not-json", ValueError, "meta.json is not valid JSON"),
        ("meta-wrong-count", ValueError, "ids.json has 30 ids, meta.json says 31"),
        ("meta-wrong-dim", ValueError, "holds 30 vectors of dim 8, meta.json says 30 of dim 9"),
        ("meta-other-format", ValueError, "not a ragcomp FAISS index"),
        ("ids-not-strings", ValueError, "ids.json must be a list of strings"),
        ("ids-duplicate", ValueError, "lists id 'doc-0' twice"),
        ("index-truncated", ValueError, "cannot read index.faiss"),
        ("index-missing", FileNotFoundError, "has no index.faiss"),
    ],
)
def test_faiss_load_rejects_corrupt_folders(
    faiss_mod, tmp_path: Path, damage: str, error: type[Exception], match: str
) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index, ids, _ = make_index(n=30, dim=8)
    folder = index.save(tmp_path / "idx")
    meta_file, ids_file, index_file = folder / "meta.json", folder / "ids.json", folder / "index.faiss"
    meta = json.loads(meta_file.read_text())
    if damage == "meta-not-json":
        meta_file.write_text(meta_file.read_text()[:-5])
    elif damage == "meta-wrong-count":
        meta_file.write_text(json.dumps({**meta, "count": 31}))
    elif damage == "meta-wrong-dim":
        meta_file.write_text(json.dumps({**meta, "dim": 9}))
    elif damage == "meta-other-format":
        meta_file.write_text(json.dumps({**meta, "format": "something-else"}))
    elif damage == "ids-not-strings":
        ids_file.write_text(json.dumps(list(range(30))))
    elif damage == "ids-duplicate":
        ids_file.write_text(json.dumps(["doc-0", *ids[:-1]]))
    elif damage == "index-truncated":
        index_file.write_bytes(index_file.read_bytes()[:100])
    elif damage == "index-missing":
        index_file.unlink()
    with pytest.raises(error, match=match) as info:
        FaissIndex.load(folder)
    assert str(folder) in str(info.value)


def test_faiss_trained_factory_and_threads(faiss_mod) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index, _, vecs = make_index(n=400, dim=16, factory="IVF4,Flat")
    np.testing.assert_allclose(index.vectors(["doc-5"]), unit(vecs[5:6]), atol=1e-6)
    assert len(index.search(vecs[:2], 3)[0]) == 3

    # Concurrent adds must keep ids and vectors aligned: vector i points along axis i % dim.
    shared = FaissIndex(32)

    def add(worker: int) -> None:
        for j in range(20):
            n = worker * 20 + j
            v = np.zeros(32, np.float32)
            v[n % 32] = 1.0 + n
            shared.add([f"w{n}"], v[None])

    threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(shared) == 80
    for n in (0, 33, 79):
        assert int(np.argmax(shared.vectors([f"w{n}"])[0])) == n % 32
