"""RedisStore's careful read path: a value read key by key through redis-py pipelines, for
whatever the fast path (redis_wire) did not take or marked for a retry. It re-reads the header
when the chunks look wrong, so a concurrent overwrite is not taken for corruption; an entry that
is corrupt (bad header, missing or wrong-sized chunk, checksum mismatch) is logged, removed
(only while its header is still the record that was judged) and read as a miss; a header
whose digest this process cannot compute is a miss too, with one warning. `RedisStore` holds one
`CarefulReader`, built with the store's client, the parts in redis_parts and its `Writer` (removals).
"""

from __future__ import annotations

import logging
from typing import Any

from ragcomp.stores.redis_format import INLINE, Corrupt, Header, UnknownDigest, digest, stale_chunks
from ragcomp.stores.redis_parts import ByteCounts, KeyLayout, Workers
from ragcomp.stores.redis_wire import new_buffer
from ragcomp.stores.redis_write import Writer

log = logging.getLogger("ragcomp.stores.redis")  # the store's logger, as before the split

# Compare-and-delete: remove a header only if it is still the record the caller judged corrupt.
_DEL_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


class CarefulReader:
    """The careful path of one `RedisStore`'s reads (see the module doc)."""

    def __init__(self, client: Any, keys: KeyLayout, workers: Workers, counts: ByteCounts, writer: Writer,
                 shown_url: str) -> None:
        self._client = client
        self._keys = keys
        self._workers = workers
        self._counts = counts
        self._writer = writer
        self._shown_url = shown_url  # the URL without its password, for the log

    def resolve(self, key: str, record: bytes | None) -> bytes | None:
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
                self._counts.add(read=head.total)
                return payload
            value, problem = self._read_chunks(key, head)
            if value is not None:
                self._counts.add(read=head.total)
                return value
            # A writer may have replaced the value (and deleted these chunks) since the header
            # was read: that is not corruption, read the new header instead.
            now = self._client.get(self._keys.header(key))
            if now == record:
                self._drop_corrupt(key, record, problem)
                return None
            record = now
        log.warning("redis store %s: key %r kept changing while being read", self._shown_url, key)
        return None

    def _read_chunks(self, key: str, head: Header) -> tuple[bytes | None, str]:
        """A chunked value through redis-py pipelines, naming the first problem if any."""
        keys = self._keys.chunks(key, head.write_id, head.count)
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

        problems = [p for p in self._workers.map_ranges(read_range, head.count) if p]
        if problems:
            return None, problems[0]
        return (value if isinstance(value, bytes) else bytes(value)), ""

    def _drop_corrupt(self, key: str, record: bytes, why: str) -> None:
        log.warning("redis store %s: dropping corrupt entry %r: %s", self._shown_url, key, why)
        if not self._client.eval(_DEL_IF_EQUAL, 1, self._keys.header(key), record):
            return  # replaced meanwhile: the new value is not ours to judge
        if stale_chunks(record) is not None:
            self._writer.delete_chunks(key, record)
            return
        # The header is too damaged to name its chunks: find them by pattern (rare, scans),
        # sparing those of a header a writer may have stored since.
        current = stale_chunks(self._client.get(self._keys.header(key)))
        keep = f":{current[0].hex()}:" if current else None
        pattern = self._keys.chunk_pattern(key)
        names = [
            n for n in self._client.scan_iter(match=pattern, count=1000) if not keep or keep.encode() not in n
        ]
        if names:
            self._writer.delete_keys(names)
