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
None. Values are opaque bytes: nothing is ever pickled. `RedisStore` holds its parts: a `Writer`
(redis_write) and a `CarefulReader` (redis_careful), built with the client and what they share
(redis_parts: key layout, settings, counters, worker threads, error naming); this module keeps the
connection, the batch reads, listing and lifecycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ragcomp._optional import require
from ragcomp.stores.base import ByteStore
from ragcomp.stores.buffers import BufferPool
from ragcomp.stores.redis_careful import CarefulReader
from ragcomp.stores.redis_format import MAX_CHUNK_BYTES, Header
from ragcomp.stores.redis_parts import ByteCounts, KeyLayout, RedisErrors, Settings, Workers, glob_escape
from ragcomp.stores.redis_server import local_redis_server
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
from ragcomp.stores.redis_write import Writer

__all__ = ["MAX_CHUNK_BYTES", "RedisStore", "local_redis_server", "redact_url"]

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


class _Shared:
    """A RedisStore attribute kept in one of the objects it shares with its parts (`holder`), so
    that setting it on the store (e.g. `store.stale_ttl = 0`) reaches them."""

    def __init__(self, holder: str, name: str | None = None) -> None:
        self.holder, self.name = holder, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, store: Any, owner: type | None = None) -> Any:
        return self if store is None else getattr(getattr(store, self.holder), self.name)

    def __set__(self, store: Any, value: Any) -> None:
        setattr(getattr(store, self.holder), self.name, value)


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

    prefix = _Shared("_keys")
    chunk_bytes = _Shared("_settings")
    inline_bytes = _Shared("_settings")
    min_split_bytes = _Shared("_settings")
    parallel = _Shared("_settings")
    parallel_min_bytes = _Shared("_settings")
    stale_ttl = _Shared("_settings")
    bytes_read = _Shared("_counts", "read")
    bytes_written = _Shared("_counts", "written")

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
        self._keys = KeyLayout(prefix)
        self._settings = Settings(
            chunk_bytes=chunk_bytes,
            inline_bytes=min(inline_bytes, chunk_bytes),
            min_split_bytes=max(1, min_split_bytes),
            parallel=parallel,
            parallel_min_bytes=max(1, parallel_min_bytes),
            stale_ttl=stale_ttl,
        )
        self._buffers = BufferPool(buffer_pool_bytes)
        self._counts = ByteCounts()
        self._workers = Workers(self._settings)
        self._errors = RedisErrors(redis, self._shown_url)
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
        except (*self._errors.caught, ValueError) as e:
            client = getattr(self, "_client", None)
            if client is not None:
                client.close()
            raise self._errors.store_error(e, "connect") from None
        self._writer = Writer(self._client, self._keys, self._settings, self._workers, self._counts,
                              self._errors)
        self._careful = CarefulReader(self._client, self._keys, self._workers, self._counts, self._writer,
                                      self._shown_url)

    def __repr__(self) -> str:
        return f"RedisStore({self._shown_url!r}, prefix={self.prefix!r})"

    # -- writes (redis_write) ----------------------------------------------------------------

    def set(self, key: str, value: bytes) -> None:
        self._writer.set(key, value)

    def set_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        self._writer.set_many(items)

    def delete(self, key: str) -> None:
        self._writer.delete(key)

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
                        self._counts.add(read=len(value))
            if careful:
                pipe = self._client.pipeline(transaction=False)
                for i in careful:
                    pipe.get(self._keys.header(keys[i]))
                for i, record in zip(careful, pipe.execute(), strict=True):
                    out[i] = self._careful.resolve(keys[i], record)
            return out
        except self._errors.caught as e:
            what = f"read {keys[0]!r}" if len(keys) == 1 else f"read {len(keys)} keys"
            raise self._errors.store_error(e, what) from None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _fast_read(self, pool: Any, keys: list[str], alloc: Alloc) -> list[Fetched] | None:
        """Headers, then every chunk of every value, straight off the socket (None: use the
        careful path for all of them)."""
        try:
            fetched = read_headers(pool, [self._keys.header(k) for k in keys], alloc)
            plan = plan_chunks(fetched, lambda i, head: self._fast_chunk_keys(keys[i], head))
            parts = split_plan(plan, self.parallel, self.parallel_min_bytes)
            # The first part on this thread (no hand-off when there is one), the rest on workers.
            futures = [self._workers.submit(read_chunks, pool, part) for part in parts[1:]]
            if parts:
                read_chunks(pool, parts[0])
            for f in futures:
                f.result()
        except NoFastPath:
            return None
        return fetched

    def _fast_chunk_keys(self, key: str, head: Header) -> list[str] | None:
        keys = self._keys.chunks(key, head.write_id, head.count)
        if self.cluster and self._client.keyslot(keys[0]) != self._client.keyslot(self._keys.header(key)):
            return None  # an empty hash tag spreads the records over slots: let the cluster client route
        return keys

    def _by_node(self, keys: list[str]) -> list[tuple[Any | None, list[int]]]:
        """Key positions grouped by the connection pool of the node holding their headers."""
        if not self.cluster:
            return [(self._client.connection_pool, list(range(len(keys))))]
        groups: dict[int, tuple[Any | None, list[int]]] = {}
        for i, key in enumerate(keys):
            node = self._client.get_node_from_key(self._keys.header(key))
            pool = node.redis_connection.connection_pool if node and node.redis_connection else None
            groups.setdefault(id(pool), (pool, []))[1].append(i)
        return list(groups.values())

    # -- listing and lifecycle ---------------------------------------------------------------

    def keys(self, prefix: str = "") -> Iterator[str]:
        start = f"{self.prefix}h:{{"
        pattern = glob_escape(start + prefix) + "*"
        try:
            names = list(self._client.scan_iter(match=pattern, count=1000))
        except self._errors.caught as e:
            raise self._errors.store_error(e, "list keys") from None
        for name in names:
            text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
            if text.startswith(start) and text.endswith("}"):
                yield text[len(start) : -1]

    def clear(self) -> None:
        """Delete every record under this store's prefix (headers, chunks, orphans)."""
        try:
            names = list(self._client.scan_iter(match=glob_escape(self.prefix) + "*", count=1000))
            for i in range(0, len(names), 1000):
                self._writer.delete_keys(names[i : i + 1000])
        except self._errors.caught as e:
            raise self._errors.store_error(e, "clear") from None

    def close(self) -> None:
        self._workers.close()
        self._buffers.clear()
        self._client.close()
