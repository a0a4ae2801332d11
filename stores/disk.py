"""Byte store on a local disk: one checksummed file per key, written atomically.

Layout: ``ROOT/ab/cd/abcd...`` where the name is a blake2b hash of the key (two levels of fan-out
keep directories small). Each file is a fixed header, the key (so `keys()` can list without an
index) and the payload::

    magic "RCDS" | version u16 | key length u32 | payload length u64 | blake2b-32(key + payload)

Writes go to a temporary file in the same directory, are fsynced and then renamed over the target,
so a reader (thread or process) sees the old file, the new one, or none. A file that fails any
check (magic, version, lengths, checksum) is logged, removed and reported as missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ragcomp.stores.base import ByteStore, StoreError

log = logging.getLogger(__name__)

MAGIC = b"RCDS"
VERSION = 1
_HEADER = struct.Struct("<4sHIQ32s")
_SUFFIX = ".rcs"
_TMP_PREFIX = ".tmp-"


class CorruptEntry(ValueError):
    """A stored file failed its checks (internal: get() turns it into a warning and None)."""


def _checksum(key: bytes, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(key)
    h.update(payload)
    return h.digest()


class DiskStore(ByteStore):
    """Bytes by key under `root`; safe across threads and processes (every write is a rename).

    `fsync=False` skips the fsync before the rename: faster, but a power loss may leave an empty
    or short file, which the checksum then catches.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create disk store at {self.root}: {e.strerror or e}") from e
        if not self.root.is_dir():
            raise StoreError(f"disk store root {self.root} is not a directory")
        # Serialises the rename of a key's file against removal of a corrupt file for the same
        # path, so a reader never deletes a good file that a writer has just put in place.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds `key` (whether or not it exists)."""
        h = hashlib.blake2b(key.encode("utf-8"), digest_size=20).hexdigest()
        return self.root / h[:2] / h[2:4] / (h + _SUFFIX)

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        path = self.path_for(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the stat below needs the open handle
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read {path} in disk store {self.root}: {e.strerror or e}") from e
        with f:
            try:
                stored_key, payload = _read_entry(f, os.fstat(f.fileno()).st_size, with_payload=True)
            except CorruptEntry as e:
                log.warning("disk store %s: dropping corrupt %s (key %r): %s", self.root, path, key, e)
                self._remove_if_same(path, os.fstat(f.fileno()))
                return None
            except OSError as e:
                raise StoreError(f"cannot read {path} in disk store {self.root}: {e.strerror or e}") from e
        if stored_key != key:
            # A different key with the same 160-bit hash: never expected; not ours to delete.
            log.warning("disk store %s: %s holds key %r, not %r", self.root, path, stored_key, key)
            return None
        assert payload is not None
        return payload

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with `prefix`, read from file headers (payloads are not verified)."""
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.endswith(_SUFFIX) or name.startswith(_TMP_PREFIX):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as f:
                        key, _ = _read_entry(f, os.fstat(f.fileno()).st_size, with_payload=False)
                except (OSError, CorruptEntry):
                    continue  # removed meanwhile, or corrupt: get() will deal with it
                if key.startswith(prefix):
                    yield key

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    # -- writes ------------------------------------------------------------------------------

    def set(self, key: str, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"DiskStore values must be bytes, got {type(value).__name__}")
        path = self.path_for(key)
        kb = key.encode("utf-8")
        payload = memoryview(value).cast("B")
        header = _HEADER.pack(MAGIC, VERSION, len(kb), payload.nbytes, _checksum(kb, payload))
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_SUFFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(kb)
                f.write(payload)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            with self._lock:
                os.replace(tmp, path)
            tmp = None
        except OSError as e:
            raise StoreError(f"cannot write {path} in disk store {self.root}: {e.strerror or e}") from e
        finally:
            if tmp is not None:
                _unlink(tmp)

    def delete(self, key: str) -> None:
        with self._lock:
            _unlink(self.path_for(key))

    def clear(self) -> None:
        """Remove every entry (and stray temporary files) under the root."""
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith(_SUFFIX):
                    _unlink(os.path.join(dirpath, name))

    def _remove_if_same(self, path: Path, seen: os.stat_result) -> None:
        # Only remove the file we found corrupt, not one a writer has renamed over it since.
        with self._lock:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return
            if (now.st_ino, now.st_dev, now.st_mtime_ns) == (seen.st_ino, seen.st_dev, seen.st_mtime_ns):
                _unlink(path)


def _read_entry(f: BinaryIO, size: int, *, with_payload: bool) -> tuple[str, bytes | None]:
    """Parse one entry from an open file; raise CorruptEntry on any inconsistency."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise CorruptEntry(f"truncated header ({len(head)} of {_HEADER.size} bytes)")
    magic, version, klen, plen, digest = _HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {magic!r}")
    if version != VERSION:
        raise CorruptEntry(f"unsupported version {version}")
    if size != _HEADER.size + klen + plen:
        raise CorruptEntry(f"file is {size} bytes, header says {_HEADER.size + klen + plen}")
    kb = f.read(klen)
    try:
        key = kb.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptEntry("key is not valid UTF-8") from e
    if not with_payload:
        return key, None
    payload = f.read(plen)
    if len(payload) != plen:
        raise CorruptEntry(f"truncated payload ({len(payload)} of {plen} bytes)")
    if _checksum(kb, payload) != digest:
        raise CorruptEntry("checksum mismatch")
    return key, payload


def _unlink(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
