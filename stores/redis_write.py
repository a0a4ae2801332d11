"""RedisStore's writes and removals. A small value goes inline in its header record; a larger
one is split into chunks (about one per connection), written under a fresh random write id, and
only then published by one `SET ... GET` of the header, so a reader sees the old value, the new
one or nothing. The old header that the `SET` returns names the chunks to retire: they expire
after `stale_ttl` seconds (a reader may still be fetching them), while `delete` removes at once.
`RedisStore` holds one `Writer`, built with the store's client and the parts in redis_parts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

from ragcomp.stores.redis_format import CHUNKED, INLINE, Header, digest, stale_chunks
from ragcomp.stores.redis_parts import ByteCounts, KeyLayout, RedisErrors, Settings, Workers


class Writer:
    """Writes and deletes of one `RedisStore` (see the module doc); failures come out as StoreError."""

    def __init__(self, client: Any, keys: KeyLayout, settings: Settings, workers: Workers, counts: ByteCounts,
                 errors: RedisErrors) -> None:
        self._client = client
        self._keys = keys
        self._settings = settings
        self._workers = workers
        self._counts = counts
        self._errors = errors

    def set(self, key: str, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"RedisStore values must be bytes, got {type(value).__name__}")
        data = memoryview(value).cast("B")
        written: list[str] = []
        try:
            if data.nbytes <= self._settings.inline_bytes:
                record = self._inline_record(data)
            else:
                record, written = self._write_chunks(key, data)
            old = self._client.set(self._keys.header(key), record, get=True)
            written = []
            self._counts.add(written=data.nbytes)
            self._retire_chunks(key, old)
        except self._errors.caught as e:
            if written:  # chunks of a header that was never stored: try not to leave them behind
                with contextlib.suppress(*self._errors.caught):
                    self.delete_keys(written)
            raise self._errors.store_error(e, f"write {key!r}") from None

    def set_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        small: list[tuple[str, bytes]] = []
        for key, value in items:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"RedisStore values must be bytes, got {type(value).__name__}")
            data = memoryview(value).cast("B")
            if data.nbytes <= self._settings.inline_bytes:
                small.append((key, self._inline_record(data)))
            else:
                self.set(key, value)
        if not small:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, record in small:
                pipe.set(self._keys.header(key), record, get=True)
            olds = pipe.execute()
            self._counts.add(written=sum(Header(r).total for _, r in small))
            for (key, _), old in zip(small, olds, strict=True):
                self._retire_chunks(key, old)
        except self._errors.caught as e:
            raise self._errors.store_error(e, f"write {len(small)} keys") from None

    @staticmethod
    def _inline_record(data: memoryview) -> bytes:
        head = Header.build(INLINE, data.nbytes, max(data.nbytes, 1), os.urandom(8), [digest(data)])
        return head + data

    def _write_chunks(self, key: str, data: memoryview) -> tuple[bytes, list[str]]:
        # About one chunk per connection, so reads of mid-size values run in parallel too.
        limits = self._settings
        cb = min(limits.chunk_bytes, max(limits.min_split_bytes, -(-data.nbytes // limits.parallel)))
        count = -(-data.nbytes // cb)
        write_id = os.urandom(8)
        keys = self._keys.chunks(key, write_id, count)
        digests: list[bytes] = [b""] * count

        def write_range(a: int, b: int) -> None:
            pipe = self._client.pipeline(transaction=False)
            for i in range(a, b):
                part = data[i * cb : (i + 1) * cb]  # a view: redis-py sends it without copying
                digests[i] = digest(part)
                pipe.set(keys[i], part)
            pipe.execute()

        try:
            self._workers.map_ranges(write_range, count)
        except BaseException:
            self.delete_keys(keys)
            raise
        return Header.build(CHUNKED, data.nbytes, cb, write_id, digests), keys

    def delete(self, key: str) -> None:
        try:
            old = self._client.getdel(self._keys.header(key))
            self.delete_chunks(key, old)
        except self._errors.caught as e:
            raise self._errors.store_error(e, f"delete {key!r}") from None

    def _retire_chunks(self, key: str, record: bytes | None) -> None:
        # Chunks of a replaced value: a reader may hold the old header and still be fetching
        # them, so they expire after stale_ttl instead of vanishing under that reader.
        stale = stale_chunks(record)
        if stale is None:
            return
        if self._settings.stale_ttl <= 0:
            self.delete_keys(self._keys.chunks(key, *stale))
            return
        pipe = self._client.pipeline(transaction=False)
        for k in self._keys.chunks(key, *stale):
            pipe.pexpire(k, max(1, int(self._settings.stale_ttl * 1000)))
        pipe.execute()

    def delete_chunks(self, key: str, record: bytes | None) -> None:
        """Remove at once the chunks that header `record` names (none for an inline value)."""
        stale = stale_chunks(record)
        if stale is not None:
            self.delete_keys(self._keys.chunks(key, *stale))

    def delete_keys(self, keys: list[str]) -> None:
        """Remove these records (full Redis names)."""
        # One DEL per key: a multi-key DEL would fail across cluster slots.
        pipe = self._client.pipeline(transaction=False)
        for k in keys:
            pipe.delete(k)
        pipe.execute()
