"""The record format of RedisStore: the header that names, sizes and checksums a value's chunks.

One value under key K is a header record (one Redis string) and, for values larger than
`inline_bytes`, chunk records under a random write id. The header is::

    magic "RCRS" | version u8 | kind u8 | digest algorithm u16 | total length u64 | chunk count u32
    | chunk size u32 | write id 8 bytes | 16-byte digest of the header | 16-byte digest of each chunk

followed, for small values (kind 0, inline), by the payload itself. The digest is xxh3-128 when
the `xxhash` package is there (tens of GB/s, so checking is never the bottleneck of a load) and
blake2b-16 otherwise (about 1 GB/s; algorithm 0, the original format). Both catch corruption and
truncation; neither is meant against an attacker with write access to Redis.
"""

from __future__ import annotations

import hashlib
import struct

MAGIC = b"RCRS"
VERSION = 1
INLINE, CHUNKED = 0, 1
FIXED = struct.Struct("<4sBBHQII8s")  # magic, version, kind, digest algo, total, count, chunk size, write id
DIGEST = 16
HEAD = FIXED.size + DIGEST  # fixed fields + header digest; chunk digests follow
MAX_CHUNK_BYTES = 256 << 20  # Redis caps one string at 512 MB; stay well under it


class Corrupt(ValueError):
    """A record fails its checks (bad magic, sizes, checksum)."""


class UnknownDigest(Exception):
    """The entry's digest algorithm cannot be checked here (xxhash missing): a miss, not corruption."""


BLAKE2B, XXH3 = 0, 1
try:
    import xxhash as _xxhash

    WRITE_ALGO = XXH3
except ImportError:  # stdlib fallback: slower, same guarantees against corruption
    _xxhash = None
    WRITE_ALGO = BLAKE2B


def digest(data: bytes | memoryview, algo: int | None = None) -> bytes:
    # Both release the GIL for large buffers, so worker threads verify chunks in parallel.
    if algo is None:
        algo = WRITE_ALGO
    if algo == XXH3:
        if _xxhash is None:
            raise UnknownDigest("entry checksummed with xxh3-128 but the xxhash package is missing")
        return _xxhash.xxh3_128_digest(data)
    if algo == BLAKE2B:
        return hashlib.blake2b(data, digest_size=DIGEST).digest()
    raise Corrupt(f"unknown digest algorithm {algo}")


class Header:
    """A parsed, verified header record.

    `record` may be the whole record or, for a reader that receives an inline payload straight
    into its own buffer, only the part before the payload; `length` is then the whole record's.
    """

    __slots__ = ("algo", "chunk_bytes", "count", "digests", "kind", "record", "total", "write_id")

    def __init__(self, record: bytes, length: int | None = None) -> None:
        length = len(record) if length is None else length
        if len(record) < HEAD:
            raise Corrupt(f"header record is {len(record)} bytes, shorter than {HEAD}")
        magic, version, kind, algo, total, count, chunk_bytes, write_id = FIXED.unpack_from(record)
        if magic != MAGIC:
            raise Corrupt(f"bad magic {magic!r}")
        if version != VERSION:
            raise Corrupt(f"unsupported version {version}")
        end = HEAD + DIGEST * count
        if len(record) < end:
            raise Corrupt(f"header lists {count} chunks but holds {(len(record) - HEAD) // DIGEST}")
        if digest(record[: FIXED.size] + record[HEAD:end], algo) != record[FIXED.size : HEAD]:
            raise Corrupt("header checksum mismatch")
        if kind == INLINE:
            ok = count == 1 and length == end + total
        elif kind == CHUNKED:
            ok = chunk_bytes > 0 and count == -(-total // chunk_bytes) and length == end
        else:
            ok = False
        if not ok:
            raise Corrupt(f"inconsistent header (kind {kind}, {total} bytes, {count} chunks)")
        self.record, self.algo = record, algo
        self.kind, self.total, self.count, self.chunk_bytes, self.write_id = (
            kind,
            total,
            count,
            chunk_bytes,
            write_id,
        )
        self.digests = [record[HEAD + DIGEST * i : HEAD + DIGEST * (i + 1)] for i in range(count)]

    @staticmethod
    def build(kind: int, total: int, chunk_bytes: int, write_id: bytes, digests: list[bytes]) -> bytes:
        fixed = FIXED.pack(MAGIC, VERSION, kind, WRITE_ALGO, total, len(digests), chunk_bytes, write_id)
        body = b"".join(digests)
        return fixed + digest(fixed + body) + body

    def spans(self) -> list[tuple[int, int]]:
        cb = self.chunk_bytes
        return [(i * cb, min(cb, self.total - i * cb)) for i in range(self.count)]


def head_size(fixed: bytes | memoryview) -> int | None:
    """Bytes before an inline payload, from a record's first HEAD bytes (None: not a header)."""
    magic, version, _, _, _, count, _, _ = FIXED.unpack_from(fixed)
    if magic != MAGIC or version != VERSION or count > 1 << 24:
        return None
    return HEAD + DIGEST * count


def stale_chunks(record: bytes | None) -> tuple[bytes, int] | None:
    """(write id, chunk count) named by a replaced or corrupt header, read leniently for cleanup."""
    if not record or len(record) < FIXED.size:
        return None
    magic, _, kind, _, _, count, _, write_id = FIXED.unpack_from(record)
    if magic != MAGIC or kind != CHUNKED or count > 1 << 24:
        return None
    return write_id, count
