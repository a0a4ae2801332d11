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
None. Values are opaque bytes: nothing is ever pickled. The writes live in redis_write and the
careful path in redis_careful, base classes of `RedisStore`; this module keeps the connection,
the batch reads, listing and lifecycle.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ragcomp._optional import require
from ragcomp.stores.base import ByteStore, StoreError
from ragcomp.stores.buffers import BufferPool
from ragcomp.stores.redis_careful import CarefulReads, _glob_escape
from ragcomp.stores.redis_format import MAX_CHUNK_BYTES, Header
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
from ragcomp.stores.redis_write import Writes

__all__ = ["MAX_CHUNK_BYTES", "RedisStore", "_free_port", "local_redis_server", "redact_url"]

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


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


class RedisStore(CarefulReads, Writes, ByteStore):
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
