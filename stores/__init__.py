"""Byte stores (memory, disk, Redis) and vector indexes (FAISS) behind small interfaces."""

from ragcomp.stores.base import ByteStore, StoreError, VectorIndex
from ragcomp.stores.memory import MemoryStore

__all__ = ["ByteStore", "MemoryStore", "StoreError", "VectorIndex", "open_store"]


def open_store(spec: str | ByteStore | None) -> ByteStore:
    """A store from a spec: None or "memory", "disk:DIR", "redis://HOST:PORT/DB", or a ByteStore."""
    if spec is None or spec == "memory":
        return MemoryStore()
    if isinstance(spec, ByteStore):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"store must be a spec string or a ByteStore, got {type(spec).__name__}")
    if spec.startswith("disk:"):
        from ragcomp.stores.disk import DiskStore

        return DiskStore(spec[len("disk:") :])
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from ragcomp.stores.redis import RedisStore

        return RedisStore(spec)
    raise ValueError(
        f"unknown store {spec!r}: use 'memory', 'disk:DIR', 'redis://HOST:PORT/DB' or a ByteStore"
    )
