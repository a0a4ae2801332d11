"""Byte store on Redis (or Redis Cluster): chunked, checksummed values, pipelined and parallel reads.

Layout of one value under key K (prefix P, default "ragcomp:")::

    P h:{K}                  header record (one Redis string)
    P c:{K}:<write id>:<i>   chunk i of a large value (only when the value is larger than inline_bytes)

`{K}` is a Redis Cluster hash tag, so all records of one value live in one slot (one node, one
connection). The header is::

    magic "RCRS" | version u8 | kind u8 | digest algorithm u16 | total length u64 | chunk count u32
    | chunk size u32 | write id 8 bytes | 16-byte digest of the header | 16-byte digest of each chunk

The digest is xxh3-128 when the `xxhash` package is there (about 20 GB/s, so checking is never
the bottleneck of a load) and blake2b-16 otherwise (about 1 GB/s; algorithm 0, the original
format). Both catch corruption and truncation; neither is meant against an attacker with write
access to Redis. A value is split into about `parallel` chunks (at least `min_split_bytes` each),
so even a few-MB KV entry is read by several connections at once.

followed, for small values (kind 0, inline), by the payload itself. A write stores the chunks under
a fresh random write id first and then the header with one `SET ... GET`: a reader sees the old
value, the new value or nothing, never a mix; the old header that `SET ... GET` returns names the
chunks to retire afterwards (they expire after `stale_ttl` seconds, so a reader already fetching
them finishes; `delete` and corruption remove at once). A reader that finds a missing or corrupt
chunk re-reads the header (a concurrent overwrite is not corruption), otherwise logs a warning,
removes the entry (only if the header is still the one it read) and returns None.

Large values are read by `parallel` connections at once, each over a contiguous range of chunks.
For plain TCP connections the chunk bytes go straight from the socket into the result buffer
(`recv_into`) instead of through redis-py's reply parser, which copies every byte several times; any
surprise on that path (a redirect, an error reply) falls back to an ordinary pipeline. Values are
opaque bytes: nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ragcomp._optional import require
from ragcomp.stores.base import ByteStore, StoreError

log = logging.getLogger(__name__)

MAGIC = b"RCRS"
VERSION = 1
_INLINE, _CHUNKED = 0, 1
_FIXED = struct.Struct("<4sBBHQII8s")  # magic, version, kind, digest algo, total, count, chunk size, write id
_DIGEST = 16
_HEAD = _FIXED.size + _DIGEST  # fixed fields + header digest; chunk digests follow
MAX_CHUNK_BYTES = 256 << 20  # Redis caps one string at 512 MB; stay well under it
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Compare-and-delete: remove a header only if it is still the record the caller judged corrupt.
_DEL_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class _Corrupt(ValueError):
    pass


class _NoFastPath(Exception):
    """The direct socket read cannot be used here (or hit something unexpected): use a pipeline."""


_BLAKE2B, _XXH3 = 0, 1
try:
    import xxhash as _xxhash

    _WRITE_ALGO = _XXH3
except ImportError:  # stdlib fallback: slower, same guarantees against corruption
    _xxhash = None
    _WRITE_ALGO = _BLAKE2B


class _UnknownDigest(Exception):
    """The entry's digest algorithm cannot be checked here (xxhash missing): a miss, not corruption."""


def _digest(data: bytes | memoryview, algo: int | None = None) -> bytes:
    # Both release the GIL for large buffers, so worker threads verify chunks in parallel.
    if algo is None:
        algo = _WRITE_ALGO
    if algo == _XXH3:
        if _xxhash is None:
            raise _UnknownDigest("entry checksummed with xxh3-128 but the xxhash package is missing")
        return _xxhash.xxh3_128_digest(data)
    if algo == _BLAKE2B:
        return hashlib.blake2b(data, digest_size=_DIGEST).digest()
    raise _Corrupt(f"unknown digest algorithm {algo}")


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


class _Header:
    __slots__ = ("algo", "chunk_bytes", "count", "digests", "kind", "record", "total", "write_id")

    def __init__(self, record: bytes) -> None:
        if len(record) < _HEAD:
            raise _Corrupt(f"header record is {len(record)} bytes, shorter than {_HEAD}")
        magic, version, kind, algo, total, count, chunk_bytes, write_id = _FIXED.unpack_from(record)
        if magic != MAGIC:
            raise _Corrupt(f"bad magic {magic!r}")
        if version != VERSION:
            raise _Corrupt(f"unsupported version {version}")
        end = _HEAD + _DIGEST * count
        if len(record) < end:
            raise _Corrupt(f"header lists {count} chunks but holds {(len(record) - _HEAD) // _DIGEST}")
        if _digest(record[: _FIXED.size] + record[_HEAD:end], algo) != record[_FIXED.size : _HEAD]:
            raise _Corrupt("header checksum mismatch")
        if kind == _INLINE:
            ok = count == 1 and len(record) == end + total
        elif kind == _CHUNKED:
            ok = chunk_bytes > 0 and count == -(-total // chunk_bytes) and len(record) == end
        else:
            ok = False
        if not ok:
            raise _Corrupt(f"inconsistent header (kind {kind}, {total} bytes, {count} chunks)")
        self.record, self.algo = record, algo
        self.kind, self.total, self.count, self.chunk_bytes, self.write_id = (
            kind,
            total,
            count,
            chunk_bytes,
            write_id,
        )
        self.digests = [record[_HEAD + _DIGEST * i : _HEAD + _DIGEST * (i + 1)] for i in range(count)]

    @staticmethod
    def build(kind: int, total: int, chunk_bytes: int, write_id: bytes, digests: list[bytes]) -> bytes:
        fixed = _FIXED.pack(MAGIC, VERSION, kind, _WRITE_ALGO, total, len(digests), chunk_bytes, write_id)
        body = b"".join(digests)
        return fixed + _digest(fixed + body) + body

    def spans(self) -> list[tuple[int, int]]:
        cb = self.chunk_bytes
        return [(i * cb, min(cb, self.total - i * cb)) for i in range(self.count)]


def _stale_chunks(record: bytes | None) -> tuple[bytes, int] | None:
    """(write id, chunk count) named by a replaced or corrupt header, read leniently for cleanup."""
    if not record or len(record) < _FIXED.size:
        return None
    magic, _, kind, _, _, count, _, write_id = _FIXED.unpack_from(record)
    if magic != MAGIC or kind != _CHUNKED or count > 1 << 24:
        return None
    return write_id, count


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url


def _reason(e: BaseException) -> str:
    # redis-py wraps the socket error; its strerror ("Connection refused") is the useful part.
    seen: list[BaseException] = [e]
    while seen and len(seen) < 10:
        err = seen.pop(0)
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        seen += [x for x in (err.__cause__, err.__context__) if x is not None]
    return str(e) or type(e).__name__


class RedisStore(ByteStore):
    """Bytes by key in Redis through redis-py's connection pool.

    url: redis://HOST:PORT/DB, rediss://..., unix://PATH, or redis+cluster://HOST:PORT (any node
    of a Redis Cluster; the same as cluster=True). Construction pings the server and raises
    StoreError naming the URL if it cannot be reached.
    chunk_bytes: size of the chunks a large value is split into (at most 256 MiB).
    inline_bytes: values up to this size live inside the header record (one round trip).
    min_split_bytes: the smallest chunk a larger value is split into for parallel reads.
    parallel: connections (threads) that read or write the chunks of one large value at once.
    stale_ttl: seconds the chunks of an overwritten value live on (with a Redis expiry) so
    readers already fetching them finish; 0 deletes them at once. `delete` removes at once.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "ragcomp:",
        chunk_bytes: int = 32 << 20,
        inline_bytes: int = 1 << 20,
        min_split_bytes: int = 1 << 20,
        max_connections: int = 32,
        parallel: int = 4,
        socket_timeout: float = 30.0,
        connect_timeout: float = 2.0,
        cluster: bool = False,
        stale_ttl: float = 5.0,
    ) -> None:
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be between 1 and {MAX_CHUNK_BYTES}, got {chunk_bytes}")
        if inline_bytes < 0:
            raise ValueError(f"inline_bytes must be >= 0, got {inline_bytes}")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if max_connections < parallel + 1:
            raise ValueError(f"max_connections must be > parallel ({parallel}), got {max_connections}")
        redis = require("redis", "redis")
        self.url = url
        self._shown_url = redact_url(url)
        scheme, sep, rest = url.partition("://")
        if scheme in _CLUSTER_SCHEMES:
            cluster = True
            url = f"{_CLUSTER_SCHEMES[scheme]}{sep}{rest}"
        self.cluster = cluster
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        self.inline_bytes = min(inline_bytes, chunk_bytes)
        self.min_split_bytes = max(1, min_split_bytes)
        self.parallel = parallel
        self.stale_ttl = stale_ttl
        self.bytes_read = 0
        self.bytes_written = 0
        self._count_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        # RedisClusterException (no reachable node, slots not covered) is not a RedisError.
        self._errors = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self._conn_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        kwargs: dict[str, Any] = dict(
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            socket_read_size=1 << 20,  # fewer, larger reads for the header/pipeline path
        )
        try:
            if cluster:
                from redis.cluster import RedisCluster

                self._client = RedisCluster.from_url(
                    url,
                    max_connections=max_connections,
                    connection_pool_class=redis.BlockingConnectionPool,
                    **kwargs,
                )
            else:
                # A blocking pool makes extra threads wait for a connection instead of failing.
                pool = redis.BlockingConnectionPool.from_url(
                    url, max_connections=max_connections, timeout=socket_timeout, **kwargs
                )
                self._client = redis.Redis(connection_pool=pool)
            self._client.ping()
        except (*self._errors, ValueError) as e:
            client = getattr(self, "_client", None)
            if client is not None:
                client.close()
            raise self._store_error(e, "connect") from None

    def __repr__(self) -> str:
        return f"RedisStore({self._shown_url!r}, prefix={self.prefix!r})"

    # -- keys --------------------------------------------------------------------------------

    def _hkey(self, key: str) -> str:
        return f"{self.prefix}h:{{{key}}}"

    def _ckeys(self, key: str, write_id: bytes, count: int) -> list[str]:
        base = f"{self.prefix}c:{{{key}}}:{write_id.hex()}:"
        return [f"{base}{i}" for i in range(count)]

    # -- errors and counters -------------------------------------------------------------------

    def _store_error(self, e: BaseException, what: str) -> StoreError:
        if isinstance(e, self._conn_errors) or "cannot be connected" in str(e):
            return StoreError(f"cannot reach Redis at {self._shown_url}: {_reason(e)}")
        return StoreError(f"Redis at {self._shown_url} failed to {what}: {e}")

    def _count(self, read: int = 0, written: int = 0) -> None:
        with self._count_lock:
            self.bytes_read += read
            self.bytes_written += written

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.parallel, thread_name_prefix="ragcomp-redis")
            return self._executor

    def _map_ranges(self, fn, count: int) -> list[Any]:
        """fn(start, stop) over `parallel` contiguous ranges of [0, count), in worker threads."""
        n = min(self.parallel, count)
        bounds = [(i * count // n, (i + 1) * count // n) for i in range(n)]
        if n == 1:
            return [fn(*bounds[0])]
        futures = [self._pool().submit(fn, a, b) for a, b in bounds]
        return [f.result() for f in futures]

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        try:
            record = self._client.get(self._hkey(key))
            return self._resolve(key, record)
        except self._errors as e:
            raise self._store_error(e, f"read {key!r}") from None

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = list(keys)
        if not keys:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.get(self._hkey(k))
            records = pipe.execute()
            return [self._resolve(k, r) for k, r in zip(keys, records, strict=True)]
        except self._errors as e:
            raise self._store_error(e, f"read {len(keys)} keys") from None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _resolve(self, key: str, record: bytes | None) -> bytes | None:
        """The value a header record stands for; None (after cleanup) if it is corrupt."""
        for _ in range(5):
            if record is None:
                return None
            try:
                head = _Header(record)
            except _Corrupt as e:
                self._drop_corrupt(key, record, str(e))
                return None
            except _UnknownDigest as e:
                _warn_once(f"redis store {self._shown_url}: {e}; such entries count as misses "
                           "(pip install xxhash to read them)")
                return None
            if head.kind == _INLINE:
                payload = record[len(record) - head.total :]
                if _digest(payload, head.algo) != head.digests[0]:
                    self._drop_corrupt(key, record, "checksum mismatch")
                    return None
                self._count(read=head.total)
                return payload
            value, problem = self._read_chunks(key, head)
            if value is not None:
                self._count(read=head.total)
                return value
            # A writer may have replaced the value (and deleted these chunks) since the header
            # was read: that is not corruption, read the new header instead.
            now = self._client.get(self._hkey(key))
            if now == record:
                self._drop_corrupt(key, record, problem)
                return None
            record = now
        log.warning("redis store %s: key %r kept changing while being read", self._shown_url, key)
        return None

    def _read_chunks(self, key: str, head: _Header) -> tuple[bytes | None, str]:
        keys = self._ckeys(key, head.write_id, head.count)
        spans = head.spans()
        value, view = _new_buffer(head.total)
        pool = self._node_pool(keys)

        def read_range(a: int, b: int) -> str | None:
            if pool is not None:
                try:
                    return _raw_read(pool, keys[a:b], view, spans[a:b], head.digests[a:b], head.algo)
                except _NoFastPath:
                    pass
            pipe = self._client.pipeline(transaction=False)
            for k in keys[a:b]:
                pipe.get(k)
            # raise_on_error=False: a chunk key holding another type is corruption, not an outage
            for i, part in enumerate(pipe.execute(raise_on_error=False), start=a):
                off, size = spans[i]
                if isinstance(part, Exception):
                    return f"chunk {i} of {head.count}: {part}"
                if part is None or len(part) != size:
                    return f"chunk {i} of {head.count} is missing or has the wrong size"
                view[off : off + size] = part
                if _digest(view[off : off + size], head.algo) != head.digests[i]:
                    return f"chunk {i} of {head.count}: checksum mismatch"
            return None

        problems = [p for p in self._map_ranges(read_range, head.count) if p]
        if problems:
            return None, problems[0]
        return (value if isinstance(value, bytes) else bytes(value)), ""

    def _node_pool(self, keys: list[str]) -> Any | None:
        """The connection pool of the one node that holds `keys`, if the fast path applies."""
        if not self.cluster:
            pool = self._client.connection_pool
        else:
            slots = {self._client.keyslot(k) for k in keys}
            if len(slots) != 1:
                return None  # an empty hash tag spreads the chunks: let the cluster client route
            node = self._client.get_node_from_key(keys[0])
            pool = node.redis_connection.connection_pool if node and node.redis_connection else None
        return pool

    def _drop_corrupt(self, key: str, record: bytes, why: str) -> None:
        log.warning("redis store %s: dropping corrupt entry %r: %s", self._shown_url, key, why)
        if not self._client.eval(_DEL_IF_EQUAL, 1, self._hkey(key), record):
            return  # replaced meanwhile: the new value is not ours to judge
        if _stale_chunks(record) is not None:
            self._delete_chunks(key, record)
            return
        # The header is too damaged to name its chunks: find them by pattern (rare, scans),
        # sparing those of a header a writer may have stored since.
        current = _stale_chunks(self._client.get(self._hkey(key)))
        keep = f":{current[0].hex()}:" if current else None
        pattern = _glob_escape(f"{self.prefix}c:{{{key}}}:") + "*"
        names = [
            n for n in self._client.scan_iter(match=pattern, count=1000) if not keep or keep.encode() not in n
        ]
        if names:
            self._delete_keys(names)

    # -- writes ------------------------------------------------------------------------------

    def set(self, key: str, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"RedisStore values must be bytes, got {type(value).__name__}")
        data = memoryview(value).cast("B")
        written: list[str] = []
        try:
            if data.nbytes <= self.inline_bytes:
                record = self._inline_record(data)
            else:
                record, written = self._write_chunks(key, data)
            old = self._client.set(self._hkey(key), record, get=True)
            written = []
            self._count(written=data.nbytes)
            self._retire_chunks(key, old)
        except self._errors as e:
            if written:  # chunks of a header that was never stored: try not to leave them behind
                with contextlib.suppress(self._errors):
                    self._delete_keys(written)
            raise self._store_error(e, f"write {key!r}") from None

    def set_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        small: list[tuple[str, bytes]] = []
        for key, value in items:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"RedisStore values must be bytes, got {type(value).__name__}")
            data = memoryview(value).cast("B")
            if data.nbytes <= self.inline_bytes:
                small.append((key, self._inline_record(data)))
            else:
                self.set(key, value)
        if not small:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, record in small:
                pipe.set(self._hkey(key), record, get=True)
            olds = pipe.execute()
            self._count(written=sum(_Header(r).total for _, r in small))
            for (key, _), old in zip(small, olds, strict=True):
                self._retire_chunks(key, old)
        except self._errors as e:
            raise self._store_error(e, f"write {len(small)} keys") from None

    @staticmethod
    def _inline_record(data: memoryview) -> bytes:
        head = _Header.build(_INLINE, data.nbytes, max(data.nbytes, 1), os.urandom(8), [_digest(data)])
        return head + data

    def _write_chunks(self, key: str, data: memoryview) -> tuple[bytes, list[str]]:
        # About one chunk per connection, so reads of mid-size values run in parallel too.
        cb = min(self.chunk_bytes, max(self.min_split_bytes, -(-data.nbytes // self.parallel)))
        count = -(-data.nbytes // cb)
        write_id = os.urandom(8)
        keys = self._ckeys(key, write_id, count)
        digests: list[bytes] = [b""] * count

        def write_range(a: int, b: int) -> None:
            pipe = self._client.pipeline(transaction=False)
            for i in range(a, b):
                part = data[i * cb : (i + 1) * cb]  # a view: redis-py sends it without copying
                digests[i] = _digest(part)
                pipe.set(keys[i], part)
            pipe.execute()

        try:
            self._map_ranges(write_range, count)
        except BaseException:
            self._delete_keys(keys)
            raise
        return _Header.build(_CHUNKED, data.nbytes, cb, write_id, digests), keys

    def delete(self, key: str) -> None:
        try:
            old = self._client.getdel(self._hkey(key))
            self._delete_chunks(key, old)
        except self._errors as e:
            raise self._store_error(e, f"delete {key!r}") from None

    def _retire_chunks(self, key: str, record: bytes | None) -> None:
        # Chunks of a replaced value: a reader may hold the old header and still be fetching
        # them, so they expire after stale_ttl instead of vanishing under that reader.
        stale = _stale_chunks(record)
        if stale is None:
            return
        if self.stale_ttl <= 0:
            self._delete_keys(self._ckeys(key, *stale))
            return
        pipe = self._client.pipeline(transaction=False)
        for k in self._ckeys(key, *stale):
            pipe.pexpire(k, max(1, int(self.stale_ttl * 1000)))
        pipe.execute()

    def _delete_chunks(self, key: str, record: bytes | None) -> None:
        stale = _stale_chunks(record)
        if stale is not None:
            self._delete_keys(self._ckeys(key, *stale))

    def _delete_keys(self, keys: list[str]) -> None:
        # One DEL per key: a multi-key DEL would fail across cluster slots.
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.delete(k)
        pipe.execute()

    # -- listing and lifecycle ---------------------------------------------------------------

    def keys(self, prefix: str = "") -> Iterator[str]:
        start = f"{self.prefix}h:{{"
        pattern = _glob_escape(start + prefix) + "*"
        try:
            names = list(self._client.scan_iter(match=pattern, count=1000))
        except self._errors as e:
            raise self._store_error(e, "list keys") from None
        for name in names:
            text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
            if text.startswith(start) and text.endswith("}"):
                yield text[len(start) : -1]

    def clear(self) -> None:
        """Delete every record under this store's prefix (headers, chunks, orphans)."""
        try:
            names = list(self._client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000))
            for i in range(0, len(names), 1000):
                self._delete_keys(names[i : i + 1000])
        except self._errors as e:
            raise self._store_error(e, "clear") from None

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        self._client.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# -- direct socket reads ------------------------------------------------------------------------


def _raw_read(
    pool: Any, keys: list[str], out: memoryview, spans: list[tuple[int, int]], digests: list[bytes],
    algo: int,
) -> str | None:
    """GET `keys` on one pooled connection, receiving each reply straight into out[span].

    Returns None when every chunk arrived with its checksum, else what went wrong. Raises
    _NoFastPath when this connection cannot be used raw (TLS, push data, an error reply such as
    a cluster redirect); the caller then uses an ordinary pipeline. Bulk strings look the same in
    RESP2 and RESP3, so both protocols work.
    """
    conn = pool.get_connection()
    done = False
    try:
        sock = getattr(conn, "_sock", None)
        if sock is None or type(sock).__module__ == "ssl":
            done = True
            raise _NoFastPath
        conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys]))
        reader = _Reader(sock)
        for i, (off, size) in enumerate(spans):
            line = reader.line()
            if line == b"_":  # RESP3 null: the chunk is gone
                return f"chunk {i} of {len(spans)} is missing"
            if line[:1] != b"$":
                # Error reply (MOVED, WRONGTYPE...) or push data: let redis-py handle it.
                raise _NoFastPath
            n = int(line[1:])
            if n != size:
                return f"chunk {i} of {len(spans)} is missing or has the wrong size ({n} != {size})"
            target = out[off : off + size]
            reader.read_into(target)
            if reader.line() != b"":
                raise _NoFastPath
            if _digest(target, algo) != digests[i]:
                return f"chunk {i} of {len(spans)}: checksum mismatch"
        done = not reader.buffered
        return None
    finally:
        if not done:
            conn.disconnect()  # replies left unread: this connection is out of step
        pool.release(conn)


def _uninit_bytes(n: int) -> tuple[bytes, memoryview]:
    # CPython's PyBytes_FromStringAndSize(NULL, n) returns a bytes object whose contents the
    # caller fills in before sharing it; ob_sval sits at basicsize - 1. Receiving straight into
    # it saves zero-filling a bytearray and copying it into bytes (each ~0.3 s per 256 MB here).
    obj = _PyBytes_FromStringAndSize(None, n)
    array = (ctypes.c_char * n).from_address(id(obj) + bytes.__basicsize__ - 1)
    return obj, memoryview(array).cast("B")


def _uninit_bytes_works() -> bool:
    try:
        obj, view = _uninit_bytes(16)
        view[:] = b"0123456789abcdef"
        return obj == b"0123456789abcdef"
    except Exception:
        return False


_PyBytes_FromStringAndSize: Any = None
if sys.implementation.name == "cpython":
    _PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
    _PyBytes_FromStringAndSize.restype = ctypes.py_object
    _PyBytes_FromStringAndSize.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_FAST_BYTES = _PyBytes_FromStringAndSize is not None and _uninit_bytes_works()


def _new_buffer(n: int) -> tuple[bytes | bytearray, memoryview]:
    """A buffer of n bytes to receive a value into, and a writable view of it."""
    if _FAST_BYTES and n > 0:
        return _uninit_bytes(n)
    buf = bytearray(n)
    return buf, memoryview(buf)


class _Reader:
    """Minimal RESP reader over a socket: lines through a small buffer, bulk bodies by recv_into."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def read_into(self, target: memoryview) -> None:
        have = min(len(self.buf), len(target))
        target[:have] = self.buf[:have]
        del self.buf[:have]
        while have < len(target):
            got = self.sock.recv_into(target[have:])
            if not got:
                raise ConnectionError("Redis closed the connection")
            have += got

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.buf += data


# -- a throwaway local server (tests, `ragcomp bench redis`) ------------------------------------


@contextlib.contextmanager
def local_redis_server(
    workdir: str | os.PathLike[str],
    *,
    port: int | None = None,
    cluster: bool = False,
    binary: str = "redis-server",
    timeout: float = 10.0,
) -> Iterator[str]:
    """Run a redis-server on 127.0.0.1 with no persistence; yield its URL, stop it on exit.

    A free port is picked when none is given (for a cluster node, one whose bus port, +10000,
    is free too). Raises StoreError with the server's log when it does not come up.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        p = port or _free_port(cluster)
        log_file = workdir / f"redis-{p}.log"
        args = [binary, "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(workdir), "--logfile", str(log_file), "--daemonize", "no"]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf"]
            args += ["--cluster-node-timeout", "5000"]
        try:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        except OSError as e:
            raise StoreError(f"cannot start {binary}: {e.strerror or e}") from e
        try:
            if _wait_for_ping(proc, p, timeout):
                yield f"redis://127.0.0.1:{p}/0" if not cluster else f"redis://127.0.0.1:{p}"
                return
            if port is not None or attempt == 4:
                tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise StoreError(f"redis-server on port {p} did not answer PING: {tail.strip()}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _free_port(with_bus: bool) -> int:
    def free(p: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
            return True

    if not with_bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(200):
        p = random.randint(20000, 40000)
        if free(p) and free(p + 10000):
            return p
    raise StoreError("no free port pair for a Redis Cluster node")


def _wait_for_ping(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # exited: port taken, bad option...
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False
