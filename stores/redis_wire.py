"""RedisStore's fast read path: GETs pipelined on pooled connections, replies received straight
from the socket into the values' own buffers.

redis-py's reply parser copies every byte of a bulk reply several times; here each chunk's bytes
go from the socket into the result buffer (`recv_into`) and are checked against the header's
digest while still in cache. A batch of values costs two round trips on one connection, however
many values and chunks it holds: every header, then every chunk of every value. Only batches
large enough to pay for it are spread over several connections (threads).

Anything this path does not expect (TLS, push data, a reply of another type) raises
NoFastPath, and the caller reads the ordinary way; a value whose records look wrong (missing,
wrong size, checksum mismatch, an error reply such as a cluster redirect) is marked for the
caller's careful per-key read, which tells a concurrent overwrite from corruption.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any

from ragcomp.stores.redis_format import HEAD, INLINE, Corrupt, Header, UnknownDigest, digest, head_size


class NoFastPath(Exception):
    """The direct socket read cannot be used here (or hit something unexpected): use a pipeline."""


class ErrorReply(Exception):
    """Redis answered one command with an error (WRONGTYPE, MOVED...); the connection is in step."""


@dataclass(slots=True)
class Fetched:
    """One requested value after a fast read: `value` when it arrived whole and verified;
    `retry` when the caller must read it the careful way; neither when the key is absent."""

    value: bytes | bytearray | memoryview | None = None
    retry: bool = False
    header: Header | None = None
    view: memoryview | None = field(default=None, repr=False)


# -- buffers -----------------------------------------------------------------------------------


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


def new_buffer(n: int) -> tuple[bytes | bytearray, memoryview]:
    """A buffer of n bytes to receive a value into, and a writable view of it."""
    if _FAST_BYTES and n > 0:
        return _uninit_bytes(n)
    buf = bytearray(n)
    return buf, memoryview(buf)


# -- RESP over a raw socket --------------------------------------------------------------------


class Reader:
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

    def reply(self) -> int:
        """The length of the next bulk reply (its body is left to read), or -1 for a null."""
        line = self.line()
        kind = line[:1]
        if kind == b"$":
            return int(line[1:])  # "$-1" (RESP2 null) gives -1 too
        if line == b"_":  # RESP3 null
            return -1
        if kind == b"-":
            raise ErrorReply(line[1:].decode("utf-8", "replace"))
        raise NoFastPath  # push data or a reply type GET never gives: let redis-py handle it

    def read_into(self, target: memoryview | bytearray) -> None:
        target = memoryview(target).cast("B")
        have = min(len(self.buf), len(target))
        target[:have] = self.buf[:have]
        del self.buf[:have]
        while have < len(target):
            got = self.sock.recv_into(target[have:])
            if not got:
                raise ConnectionError("Redis closed the connection")
            have += got

    def skip(self, n: int) -> None:
        """Read and drop n body bytes (a reply the caller has no use for)."""
        scratch = bytearray(min(n, 1 << 20))
        while n > 0:
            part = min(n, len(scratch))
            self.read_into(memoryview(scratch)[:part])
            n -= part

    def end_bulk(self) -> None:
        if self.line() != b"":
            raise NoFastPath  # not where a bulk reply ends: out of step

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.buf += data


@contextlib.contextmanager
def raw_gets(pool: Any, keys: list[str]) -> Iterator[Reader]:
    """GET `keys` pipelined on one pooled plain-TCP connection; yields the reader of the replies.

    The caller reads every reply. A connection left with replies unread (an exception, bytes
    past the last reply) is disconnected before it goes back to the pool.
    """
    conn = pool.get_connection()
    clean = False
    try:
        sock = getattr(conn, "_sock", None)
        if sock is None or type(sock).__module__ == "ssl":
            clean = True
            raise NoFastPath
        conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys]))
        reader = Reader(sock)
        yield reader
        clean = not reader.buffered
    finally:
        if not clean:
            conn.disconnect()  # replies left unread: this connection is out of step
        pool.release(conn)


# -- batched reads -----------------------------------------------------------------------------


# Makes the buffer a value of n bytes is received into: (the value, a writable view of it).
Alloc = Callable[[int], tuple[Any, memoryview]]


def read_headers(pool: Any, hkeys: list[str], alloc: Alloc = new_buffer) -> list[Fetched]:
    """Every header in one round trip; inline values land in their own buffers and are verified,
    chunked ones get a buffer for their chunks (`view`)."""
    out = [Fetched() for _ in hkeys]
    with raw_gets(pool, hkeys) as reader:
        for item in out:
            try:
                n = reader.reply()
            except ErrorReply:
                item.retry = True
                continue
            if n >= 0:
                _read_header(reader, n, item, alloc)
    return out


def _read_header(reader: Reader, n: int, item: Fetched, alloc: Alloc) -> None:
    got = 0
    try:
        if n < HEAD:
            raise Corrupt("short header")
        fixed = bytearray(HEAD)
        reader.read_into(fixed)
        got = HEAD
        size = head_size(fixed)
        if size is None or size > n:
            raise Corrupt("not a header")
        rest = bytearray(size - HEAD)
        reader.read_into(rest)
        got = size
        head = Header(bytes(fixed + rest), n)
        value, view = alloc(head.total)
        if head.kind == INLINE:
            reader.read_into(view)
            got = n
            if digest(view, head.algo) != head.digests[0]:
                raise Corrupt("checksum mismatch")
            item.value = value
        else:
            item.header, item.value, item.view = head, value, view
    except (Corrupt, UnknownDigest):
        item.retry, item.value, item.view = True, None, None
    reader.skip(n - got)
    reader.end_bulk()


# One planned chunk GET: (key, where its bytes go, expected digest, digest algorithm, owner).
Chunk = tuple[str, memoryview, bytes, int, Fetched]


def read_chunks(pool: Any, chunks: list[Chunk]) -> None:
    """GET `chunks` pipelined on one connection, each straight into its target; an owner whose
    chunk is missing, of the wrong size or fails its digest is marked `retry`."""
    with raw_gets(pool, [c[0] for c in chunks]) as reader:
        for _, target, expected, algo, owner in chunks:
            try:
                n = reader.reply()
            except ErrorReply:
                owner.retry = True
                continue
            if n < 0:
                owner.retry = True
            elif owner.retry or n != len(target):
                owner.retry = True
                reader.skip(n)
                reader.end_bulk()
            else:
                reader.read_into(target)
                reader.end_bulk()
                if digest(target, algo) != expected:
                    owner.retry = True


def plan_chunks(items: list[Fetched], chunk_keys: Callable[[int, Header], list[str] | None]) -> list[Chunk]:
    """The chunk GETs of every chunked value, in order; chunk_keys returning None marks a value
    for the careful path (its chunks cannot be read on this connection)."""
    plan: list[Chunk] = []
    for i, item in enumerate(items):
        head, view = item.header, item.view
        if head is None or view is None or item.retry:
            continue
        keys = chunk_keys(i, head)
        if keys is None:
            item.retry, item.value = True, None
            continue
        for key, (off, size), expected in zip(keys, head.spans(), head.digests, strict=True):
            plan.append((key, view[off : off + size], expected, head.algo, item))
    return plan


def split_plan(plan: list[Chunk], parallel: int, min_bytes: int) -> list[list[Chunk]]:
    """Contiguous runs of the plan of about equal bytes, one per connection: as many connections
    (up to `parallel`) as give each at least `min_bytes`, since on a loaded or small machine an
    extra connection and its thread cost more than they bring for a few MB."""
    ends = list(accumulate(len(c[1]) for c in plan))  # bytes up to and including chunk i
    total = ends[-1] if ends else 0
    n = max(1, min(parallel, len(plan), total // max(1, min_bytes)))
    cuts = [0]
    for k in range(1, n):
        target = total * k / n
        j = bisect_left(ends, target)  # the first chunk that reaches the target
        if j > 0 and target - ends[j - 1] < ends[j] - target:
            j -= 1  # cutting before it lands closer
        if j + 1 > cuts[-1]:
            cuts.append(j + 1)
    cuts.append(len(plan))
    return [plan[a:b] for a, b in pairwise(cuts) if b > a]
