"""Byte stores (memory, disk, Redis) and vector indexes (FAISS) behind small interfaces.

DiskStore, RedisStore and FaissIndex are imported on first use, so `import ragcomp.stores`
needs neither redis-py nor FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ragcomp.stores.base import ByteStore, StoreError, VectorIndex
from ragcomp.stores.memory import MemoryStore

if TYPE_CHECKING:
    from ragcomp.stores.disk import DiskStore
    from ragcomp.stores.faiss import FaissIndex, open_index
    from ragcomp.stores.redis import RedisStore

__all__ = [
    "ByteStore",
    "DiskStore",
    "FaissIndex",
    "MemoryStore",
    "RedisStore",
    "StoreError",
    "VectorIndex",
    "open_index",
    "open_store",
]

_LAZY = {
    "DiskStore": "ragcomp.stores.disk",
    "RedisStore": "ragcomp.stores.redis",
    "FaissIndex": "ragcomp.stores.faiss",
    "open_index": "ragcomp.stores.faiss",
}

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(spec: str | ByteStore | None) -> ByteStore:
    """A store from a spec: None or "memory", "disk:DIR", "redis://HOST:PORT/DB",
    "redis+cluster://HOST:PORT" (any node of a Redis Cluster), or a ByteStore (returned as is)."""
    if spec is None or spec == "memory":
        return MemoryStore()
    if isinstance(spec, ByteStore):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"store must be a spec string or a ByteStore, got {type(spec).__name__}")
    if spec.startswith("disk:"):
        from ragcomp.stores.disk import DiskStore

        return DiskStore(spec[len("disk:") :])
    if spec.startswith(_REDIS_SCHEMES):
        from ragcomp.stores.redis import RedisStore

        return RedisStore(spec)
    raise ValueError(
        f"unknown store {spec!r}: use 'memory', 'disk:DIR', 'redis://HOST:PORT/DB', "
        "'redis+cluster://HOST:PORT' or a ByteStore"
    )
