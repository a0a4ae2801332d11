"""Byte stores on disk and `open_store` specs (Redis: test_stores_redis.py; FAISS: test_stores_faiss.py)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ragcomp.stores import MemoryStore, open_store
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
