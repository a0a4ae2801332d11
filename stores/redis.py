"""Byte store on Redis (or Redis Cluster): chunked, checksummed values, pipelined reads.

Layout of one value under key K (prefix P, default "ragcomp:")::

    P h:{K}                  header record (one Redis string; format in redis_format)
    P c:{K}:<write id>:<i>   chunk i of a large value (only when the value is larger than inline_bytes)

`{K}` is a Redis Cluster hash tag, so all records of one value live in one slot (one node, one
connection). A value is split into about `parallel` chunks of at least `min_split_bytes`: small
chunks keep the server's reply buffers small, which loads faster than one big string.

A write stores the chunks under a fresh random write id first and then the header with one
`SET ... GET`: a reader sees the old value, the new value or nothing, never a mix; the old header
that `SET ... GET` returns names the chunks to retire afterwards (they expire after `stale_ttl`
seconds, so a reader already fetching them finishes; `delete` and corruption remove at once).

Reads (`get` is `get_many` of one key) take two round trips for a whole batch: every header,
then every chunk of every value, received straight into the values' buffers and checked against
their digests (redis_wire); the chunks go over one connection, or over up to `parallel` when
each gets at least `parallel_min_bytes`. `get_many_buffers` receives into reused memory
(buffers.py) for callers that map tensors onto the bytes. A value whose records look wrong takes
the careful path: it re-reads the header (a concurrent overwrite is not corruption), otherwise
logs a warning, removes the entry (only if the header is still the one it read) and returns
None. Values are opaque bytes: nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ragcomp._optional import require
from ragcomp.stores.base import ByteStore, StoreError
from ragcomp.stores.buffers import BufferPool
from ragcomp.stores.redis_format import (
    CHUNKED,
    INLINE,
    MAX_CHUNK_BYTES,
    Corrupt,
    Header,
    UnknownDigest,
    digest,
    stale_chunks,
)
from ragcomp.stores.redis_server import _free_port, local_redis_server
from ragcomp.stores.redis_wire import (
    Alloc,
    Fetched,
    NoFastPath,
    new_buffer,
    plan_chunks,
    read_chunks,
    read_headers,
    split_plan,
)

__all__ = ["MAX_CHUNK_BYTES", "RedisStore", "_free_port", "local_redis_server", "redact_url"]

log = logging.getLogger(__name__)

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Compare-and-delete: remove a header only if it is still the record the caller judged corrupt.
_DEL_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


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
    min_split_bytes: the smallest chunk a larger value is split into.
    parallel: connections (threads) that read or write the chunks of large values at once.
    parallel_min_bytes: a read is spread over several connections only when each gets at least
    this many bytes (below that, a thread and a connection cost more than they bring).
    buffer_pool_bytes: at most this much memory kept for `get_many_buffers` to receive into
    again (0: fresh memory for every load).
    stale_ttl: seconds the chunks of an overwritten value live on (with a Redis expiry) so
    readers already fetching them finish; 0 deletes them at once. `delete` removes at once.
    """

    # Every value get/get_many returns matched, byte for byte, the digests taken when it was
    # written: callers need no second checksum pass (TieredKV skips the KV entry's own).
    verifies_reads = True

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
        parallel_min_bytes: int = 2 << 20,
        buffer_pool_bytes: int = 64 << 20,
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
        self.parallel_min_bytes = max(1, parallel_min_bytes)
        self._buffers = BufferPool(buffer_pool_bytes)
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
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of `keys` (None where absent or corrupt): every header in one round trip,
        then every chunk of every value in another, on one connection or, for many MB, a few."""
        return self._get_many(keys, new_buffer)  # type: ignore[return-value]  # always bytes here

    def get_many_buffers(self, keys: Sequence[str]) -> list[bytes | memoryview | None]:
        """`get_many` for callers that map tensors onto the bytes: values come as read-only views
        into buffers this store uses again once nothing refers to them (no page faults on
        fresh memory per load); a value read the careful way comes as bytes."""
        return self._get_many(keys, self._buffers.take)

    def _get_many(self, keys: Sequence[str], alloc: Alloc) -> list[bytes | memoryview | None]:
        keys = list(keys)
        if not keys:
            return []
        try:
            out: list[bytes | memoryview | None] = [None] * len(keys)
            careful: list[int] = []
            for pool, idxs in self._by_node(keys):
                fetched = self._fast_read(pool, [keys[i] for i in idxs], alloc) if pool is not None else None
                if fetched is None:
                    careful += idxs
                    continue
                for i, item in zip(idxs, fetched, strict=True):
                    if item.retry:
                        careful.append(i)
                    elif item.value is not None:
                        value = item.value
                        out[i] = bytes(value) if isinstance(value, bytearray) else value
                        self._count(read=len(value))
            if careful:
                pipe = self._client.pipeline(transaction=False)
                for i in careful:
                    pipe.get(self._hkey(keys[i]))
                for i, record in zip(careful, pipe.execute(), strict=True):
                    out[i] = self._resolve(keys[i], record)
            return out
        except self._errors as e:
            what = f"read {keys[0]!r}" if len(keys) == 1 else f"read {len(keys)} keys"
            raise self._store_error(e, what) from None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _fast_read(self, pool: Any, keys: list[str], alloc: Alloc) -> list[Fetched] | None:
        """Headers, then every chunk of every value, straight off the socket (None: use the
        careful path for all of them)."""
        try:
            fetched = read_headers(pool, [self._hkey(k) for k in keys], alloc)
            plan = plan_chunks(fetched, lambda i, head: self._fast_chunk_keys(keys[i], head))
            parts = split_plan(plan, self.parallel, self.parallel_min_bytes)
            # The first part on this thread (no hand-off when there is one), the rest on workers.
            futures = [self._pool().submit(read_chunks, pool, part) for part in parts[1:]]
            if parts:
                read_chunks(pool, parts[0])
            for f in futures:
                f.result()
        except NoFastPath:
            return None
        return fetched

    def _fast_chunk_keys(self, key: str, head: Header) -> list[str] | None:
        keys = self._ckeys(key, head.write_id, head.count)
        if self.cluster and self._client.keyslot(keys[0]) != self._client.keyslot(self._hkey(key)):
            return None  # an empty hash tag spreads the records over slots: let the cluster client route
        return keys

    def _by_node(self, keys: list[str]) -> list[tuple[Any | None, list[int]]]:
        """Key positions grouped by the connection pool of the node holding their headers."""
        if not self.cluster:
            return [(self._client.connection_pool, list(range(len(keys))))]
        groups: dict[int, tuple[Any | None, list[int]]] = {}
        for i, key in enumerate(keys):
            node = self._client.get_node_from_key(self._hkey(key))
            pool = node.redis_connection.connection_pool if node and node.redis_connection else None
            groups.setdefault(id(pool), (pool, []))[1].append(i)
        return list(groups.values())

    def _resolve(self, key: str, record: bytes | None) -> bytes | None:
        """The value a header record stands for, read the careful way; None (after cleanup) if
        it is corrupt."""
        for _ in range(5):
            if record is None:
                return None
            try:
                head = Header(record)
            except Corrupt as e:
                self._drop_corrupt(key, record, str(e))
                return None
            except UnknownDigest as e:
                _warn_once(f"redis store {self._shown_url}: {e}; such entries count as misses "
                           "(pip install xxhash to read them)")
                return None
            if head.kind == INLINE:
                payload = record[len(record) - head.total :]
                if digest(payload, head.algo) != head.digests[0]:
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

    def _read_chunks(self, key: str, head: Header) -> tuple[bytes | None, str]:
        """A chunked value through redis-py pipelines, naming the first problem if any."""
        keys = self._ckeys(key, head.write_id, head.count)
        spans = head.spans()
        value, view = new_buffer(head.total)

        def read_range(a: int, b: int) -> str | None:
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
                if digest(view[off : off + size], head.algo) != head.digests[i]:
                    return f"chunk {i} of {head.count}: checksum mismatch"
            return None

        problems = [p for p in self._map_ranges(read_range, head.count) if p]
        if problems:
            return None, problems[0]
        return (value if isinstance(value, bytes) else bytes(value)), ""

    def _drop_corrupt(self, key: str, record: bytes, why: str) -> None:
        log.warning("redis store %s: dropping corrupt entry %r: %s", self._shown_url, key, why)
        if not self._client.eval(_DEL_IF_EQUAL, 1, self._hkey(key), record):
            return  # replaced meanwhile: the new value is not ours to judge
        if stale_chunks(record) is not None:
            self._delete_chunks(key, record)
            return
        # The header is too damaged to name its chunks: find them by pattern (rare, scans),
        # sparing those of a header a writer may have stored since.
        current = stale_chunks(self._client.get(self._hkey(key)))
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
            self._count(written=sum(Header(r).total for _, r in small))
            for (key, _), old in zip(small, olds, strict=True):
                self._retire_chunks(key, old)
        except self._errors as e:
            raise self._store_error(e, f"write {len(small)} keys") from None

    @staticmethod
    def _inline_record(data: memoryview) -> bytes:
        head = Header.build(INLINE, data.nbytes, max(data.nbytes, 1), os.urandom(8), [digest(data)])
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
                digests[i] = digest(part)
                pipe.set(keys[i], part)
            pipe.execute()

        try:
            self._map_ranges(write_range, count)
        except BaseException:
            self._delete_keys(keys)
            raise
        return Header.build(CHUNKED, data.nbytes, cb, write_id, digests), keys

    def delete(self, key: str) -> None:
        try:
            old = self._client.getdel(self._hkey(key))
            self._delete_chunks(key, old)
        except self._errors as e:
            raise self._store_error(e, f"delete {key!r}") from None

    def _retire_chunks(self, key: str, record: bytes | None) -> None:
        # Chunks of a replaced value: a reader may hold the old header and still be fetching
        # them, so they expire after stale_ttl instead of vanishing under that reader.
        stale = stale_chunks(record)
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
        stale = stale_chunks(record)
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
        self._buffers.clear()
        self._client.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

