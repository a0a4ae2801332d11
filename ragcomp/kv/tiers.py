"""Where chunk KV lives: a GPU LRU and a (pinned) CPU LRU, bounded in bytes, in front of a
byte store (memory, disk, Redis). Loads from the store run on worker threads, so fetching
later chunks overlaps rotating earlier ones, and `prefetch` can start them early;
`lookup_many` (and `prefetch`) read all missing entries with one batched store read.

Store failures never fail an answer: an unreachable store is skipped for `retry_after`
seconds and the chunks are recomputed; a corrupt entry is deleted and recomputed; an
entry whose fingerprint or token ids differ from what was asked is never returned.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ragcomp.kv.codec import ChunkKV, CorruptEntryError, decode_entry, encode_entry, pack
from ragcomp.kv.types import KVStats

log = logging.getLogger("ragcomp.kv")
# What a store raises when it is down or failing (StoreError is a RuntimeError): every store access of
# the KV layer catches these, so a store fault never fails an answer.
STORE_FAULTS = (RuntimeError, OSError, ConnectionError, TimeoutError)


def _read_many(store: Any, keys: Sequence[str]) -> list[Any]:
    """Values of `keys` as bytes-like objects, by the store's best batched read: RedisStore's
    `get_many_buffers` receives into reused memory; duck-typed stores may lack even get_many."""
    for name in ("get_many_buffers", "get_many"):
        read = getattr(store, name, None)
        if read is not None:
            return read(keys)
    return [store.get(k) for k in keys]


class ReconnectingStore:
    """A store that could not be opened yet (Redis down at start-up): every access tries to
    open it again and raises StoreError while it cannot; TieredKV's back-off spaces the tries."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._store: Any = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        with self._lock:
            if self._store is None:
                from ragcomp.stores import open_store

                self._store = open_store(self.spec)
            return self._store

    @property
    def verifies_reads(self) -> bool:
        return bool(getattr(self._store, "verifies_reads", False))

    def get(self, key: str) -> bytes | None:
        return self._open().get(key)

    def get_many_buffers(self, keys: Sequence[str]) -> list[Any]:
        return _read_many(self._open(), keys)

    def set(self, key: str, value: bytes) -> None:
        self._open().set(key, value)

    def set_many(self, items: Any) -> None:
        self._open().set_many(items)

    def delete(self, key: str) -> None:
        self._open().delete(key)

    def keys(self, prefix: str = "") -> Any:
        return self._open().keys(prefix)

    def __contains__(self, key: str) -> bool:
        return key in self._open()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class TensorLRU:
    """ChunkKV by key, least recently used evicted first, at most `max_bytes` of tensors."""

    def __init__(self, name: str, max_bytes: int, device: Any = "cpu", pin: bool = False,
                 packed: bool = False) -> None:
        if max_bytes < 0:
            raise ValueError(f"{name} tier max_bytes must be >= 0, got {max_bytes}")
        self.name = name
        self.max_bytes = int(max_bytes)
        self.device = device
        self.pin = pin
        self.packed = packed  # keys+values in one buffer per chunk (fewer copies on the GPU path)
        self._data: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            chunk = self._data.get(key)
            if chunk is not None:
                self._data.move_to_end(key)
            return chunk

    def put(self, key: str, chunk: ChunkKV) -> ChunkKV:
        """Keep `chunk` (moved to this tier's device); returns the tier's copy, or the
        given chunk when it is larger than the whole tier."""
        if chunk.nbytes > self.max_bytes:
            return chunk
        if self.packed and (chunk.packed is None or str(chunk.device) != str(self.device)
                            or (self.pin and not chunk.packed.is_pinned())):
            chunk = pack(chunk, self.device, pin=self.pin)
        elif self.pin:
            chunk = chunk.to("cpu") if chunk.device.type != "cpu" else chunk
            chunk = chunk.to("cpu", pin=True)
        elif str(chunk.device) != str(self.device):
            chunk = chunk.to(self.device)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._data[key] = chunk
            self._bytes += chunk.nbytes
            while self._bytes > self.max_bytes and self._data:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= evicted.nbytes
        return chunk

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


class TieredKV:
    """GPU LRU -> CPU LRU -> store, with per-call stats and store fault handling."""

    def __init__(self, store: Any, device: Any, gpu_bytes: int, cpu_bytes: int, io_threads: int = 4,
                 retry_after: float = 5.0, verify: bool = True) -> None:
        self.store = store
        on_gpu = getattr(device, "type", str(device)).startswith("cuda")
        self.gpu = TensorLRU("gpu", gpu_bytes if on_gpu else 0, device, packed=True)
        # Pinned host memory makes host-to-GPU copies asynchronous and several times faster.
        self.cpu = TensorLRU("cpu", cpu_bytes, "cpu", pin=on_gpu, packed=on_gpu)
        self.on_gpu = on_gpu
        self.retry_after = retry_after
        self.verify = verify
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="ragcomp-kv-io")
        self._down_until = 0.0
        self._stats_lock = threading.Lock()
        self.last_store_error: str | None = None

    # -- store access with fault handling --------------------------------------------------
    def store_available(self) -> bool:
        return self.store is not None and time.monotonic() >= self._down_until

    def _store_failed(self, err: Exception, stats: KVStats | None) -> None:
        self._down_until = time.monotonic() + self.retry_after
        self.last_store_error = f"{type(err).__name__}: {err}"
        log.warning("KV store unavailable (%s); recomputing instead", self.last_store_error)
        if stats is not None:
            with self._stats_lock:
                stats.store_errors += 1

    def _count(self, stats: KVStats | None, tier: str, nbytes: int) -> None:
        if stats is not None:
            with self._stats_lock:
                stats.hits[tier] += 1
                stats.bytes_loaded[tier] += nbytes

    def _valid(self, chunk: ChunkKV, fp: str, ids: Sequence[int]) -> bool:
        return chunk.fingerprint == fp and chunk.ids == list(ids)

    def load_from_store(self, key: str, fp: str, ids: Sequence[int], stats: KVStats | None = None,
                        keep: bool = True) -> ChunkKV | None:
        """Read, verify and decode one entry; None on a miss or any fault (already handled)."""
        return self.load_many_from_store([(key, fp, ids)], stats, keep)[0]

    def load_many_from_store(self, items: Sequence[tuple[str, str, Sequence[int]]],
                             stats: KVStats | None = None, keep: bool = True) -> list[ChunkKV | None]:
        """`load_from_store` for several entries with one store read (RedisStore: one batch of
        round trips on one connection instead of a read per entry)."""
        if not items or not self.store_available():
            return [None] * len(items)
        try:
            raws = _read_many(self.store, [key for key, _, _ in items])
        except STORE_FAULTS as e:
            self._store_failed(e, stats)
            return [None] * len(items)
        # A store that checks every value it returns against a checksum taken when it was
        # written (RedisStore) makes the entry's own checksum a second pass over memory that
        # has left the cache (a fifth to a quarter of a load here): check once.
        verify = self.verify and not getattr(self.store, "verifies_reads", False)
        return [self._decode(raw, key, fp, ids, stats, keep, verify)
                for raw, (key, fp, ids) in zip(raws, items, strict=True)]

    def _decode(self, raw: bytes | None, key: str, fp: str, ids: Sequence[int], stats: KVStats | None,
                keep: bool, verify: bool) -> ChunkKV | None:
        if raw is None:
            return None
        try:
            chunk = decode_entry(raw, verify=verify)
        except CorruptEntryError as e:
            log.warning("dropping corrupt KV entry %s (%s); it will be recomputed", key, e)
            if stats is not None:
                with self._stats_lock:
                    stats.corrupt_entries += 1
            self._delete(key)
            return None
        if not self._valid(chunk, fp, ids):
            # A foreign or colliding entry: not ours to return (the fingerprint says so).
            log.warning("KV entry %s does not match the requested model/prefix/text; ignoring it", key)
            return None
        self._count(stats, "store", len(raw))
        if keep:
            chunk = self.cpu.put(key, chunk)
        return chunk

    def _delete(self, key: str) -> None:
        try:
            self.store.delete(key)
        except STORE_FAULTS as e:
            log.warning("could not delete KV entry %s: %s", key, e)

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, key: str, fp: str, ids: Sequence[int], stats: KVStats | None = None
               ) -> ChunkKV | Future | None:
        """A tier hit now, a Future for a store read under way, or None (not in the tiers and
        no store to ask)."""
        return self.lookup_many([(key, fp, ids)], stats)[0]

    def lookup_many(self, items: Sequence[tuple[str, str, Sequence[int]]], stats: KVStats | None = None
                    ) -> list[ChunkKV | Future | None]:
        """`lookup` for several entries: tier hits now; every other entry from ONE store read
        on an I/O thread, each with its own Future (all done when the batch is)."""
        out: list[ChunkKV | Future | None] = []
        todo: list[int] = []
        for key, fp, ids in items:
            out.append(self._tier_hit(key, fp, ids, stats))
            if out[-1] is None:
                todo.append(len(out) - 1)
        if not todo:
            return out
        if self.store is None or not self.store_available():
            if self.store is not None and stats is not None:
                with self._stats_lock:
                    stats.store_errors += len(todo)
            return out
        for i, f in zip(todo, self._load_batch([items[i] for i in todo], stats), strict=True):
            out[i] = f
        return out

    def _load_batch(self, items: Sequence[tuple[str, str, Sequence[int]]], stats: KVStats | None
                    ) -> list[Future]:
        """One store read of `items` on an I/O thread; a Future per entry, all done together."""
        futures: list[Future] = [Future() for _ in items]

        def load() -> None:
            try:
                chunks = self.load_many_from_store(items, stats)
            except BaseException as e:  # handed to every waiter, never lost on the pool
                for f in futures:
                    f.set_exception(e)
                return
            for f, chunk in zip(futures, chunks, strict=True):
                f.set_result(chunk)

        self._pool.submit(load)
        return futures

    def _tier_hit(self, key: str, fp: str, ids: Sequence[int], stats: KVStats | None) -> ChunkKV | None:
        for tier in (self.gpu, self.cpu):
            chunk = tier.get(key)
            if chunk is not None:
                if self._valid(chunk, fp, ids):
                    self._count(stats, tier.name, chunk.nbytes)
                    return chunk
                tier.discard(key)
        return None

    def prefetch(self, items: Sequence[tuple[str, str, Sequence[int]]]) -> list[Future]:
        """Start one store read into the CPU tier of the entries in no tier yet."""
        if self.store is None:
            return []
        todo = [item for item in items if item[0] not in self.gpu and item[0] not in self.cpu]
        return self._load_batch(todo, None) if todo else []

    def stored_keys(self, prefix: str) -> set[str] | None:
        """Keys under `prefix` in the store, listed once (None when the store cannot list)."""
        if not self.store_available():
            return set()
        try:
            return set(self.store.keys(prefix))
        except NotImplementedError:
            return None
        except STORE_FAULTS as e:
            self._store_failed(e, None)
            return set()

    def contains(self, key: str) -> bool:
        """In a tier or in the store (a store fault counts as absent)."""
        if key in self.gpu or key in self.cpu:
            return True
        if not self.store_available():
            return False
        try:
            return key in self.store
        except STORE_FAULTS as e:
            self._store_failed(e, None)
            return False

    # -- writes ----------------------------------------------------------------------------
    def put(self, key: str, chunk: ChunkKV, write_store: bool = True, keep: bool = True,
            stats: KVStats | None = None) -> ChunkKV:
        if keep:
            chunk = self.cpu.put(key, chunk)
        if write_store and self.store_available():
            try:
                self.store.set(key, encode_entry(chunk))
            except STORE_FAULTS as e:
                self._store_failed(e, stats)
        return chunk

    def put_many(self, items: Sequence[tuple[str, ChunkKV]], keep: bool = True) -> None:
        for key, chunk in items:
            if keep:
                self.cpu.put(key, chunk)
        if items and self.store_available():
            try:
                self.store.set_many((k, encode_entry(c)) for k, c in items)
            except STORE_FAULTS as e:
                self._store_failed(e, None)

    def to_gpu(self, key: str, chunk: ChunkKV) -> ChunkKV:
        """The chunk on the GPU, kept in the GPU tier when it fits."""
        if not self.on_gpu:
            return chunk
        if chunk.device.type == "cuda":
            return chunk
        moved = chunk.to(self.gpu.device, non_blocking=True)
        return self.gpu.put(key, moved) if self.gpu.max_bytes else moved

    def warn_faults(self, stats: KVStats) -> None:
        """Warn about the store faults and corrupt entries an answer met (they cost recomputing,
        not the answer). Called from the method that answered: the warning names its caller."""
        if stats.store_errors:
            warnings.warn(
                f"KV store unavailable ({self.last_store_error or 'skipped after a recent failure'}); "
                f"recomputed {stats.misses} chunk(s) instead", RuntimeWarning, stacklevel=3)
        if stats.corrupt_entries:
            warnings.warn(f"dropped {stats.corrupt_entries} corrupt KV entr(y/ies) and recomputed them",
                          RuntimeWarning, stacklevel=3)

    def clear_tiers(self) -> None:
        self.gpu.clear()
        self.cpu.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
