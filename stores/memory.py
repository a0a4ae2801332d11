"""In-process byte store, optionally bounded in bytes with least-recently-used eviction."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from ragcomp.stores.base import ByteStore


class MemoryStore(ByteStore):
    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def set(self, key: str, value: bytes) -> None:
        value = bytes(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            if self.max_bytes is not None and len(value) > self.max_bytes:
                return  # larger than the whole store: not cached
            self._data[key] = value
            self._bytes += len(value)
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= len(evicted)

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def keys(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            snapshot = list(self._data)
        return (k for k in snapshot if k.startswith(prefix))

    def __len__(self) -> int:
        return len(self._data)
