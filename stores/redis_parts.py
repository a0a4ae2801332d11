"""What the parts of a RedisStore share: the key layout, the settings a caller may change on a live
store, byte counters, worker threads and the naming of failures. `RedisStore` (redis.py) builds one of
each and hands them to its writer (redis_write) and its careful reader (redis_careful), so no part
reads another's attributes. A leaf: it imports no other Redis module."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ragcomp.stores.base import StoreError


def glob_escape(text: str) -> str:
    """`text` matched literally in a SCAN MATCH pattern (keys may hold *, ?, [, ] or \\)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class KeyLayout:
    """Redis names of a store's records under `prefix`: `{K}` is a Redis Cluster hash tag, so every
    record of one value lives in one slot."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def header(self, key: str) -> str:
        return f"{self.prefix}h:{{{key}}}"

    def chunks(self, key: str, write_id: bytes, count: int) -> list[str]:
        base = f"{self.prefix}c:{{{key}}}:{write_id.hex()}:"
        return [f"{base}{i}" for i in range(count)]

    def chunk_pattern(self, key: str) -> str:
        """SCAN pattern of every chunk of `key`, whatever its write id."""
        return glob_escape(f"{self.prefix}c:{{{key}}}:") + "*"


@dataclass
class Settings:
    """Sizes and limits of one store, shared by its parts: a change on the store (tests set
    `stale_ttl` or `parallel_min_bytes` on a live one) takes effect at their next call."""

    chunk_bytes: int
    inline_bytes: int
    min_split_bytes: int
    parallel: int
    parallel_min_bytes: int
    stale_ttl: float


class ByteCounts:
    """Bytes read and written, counted from several threads."""

    def __init__(self) -> None:
        self.read = 0
        self.written = 0
        self._lock = threading.Lock()

    def add(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.read += read
            self.written += written


class Workers:
    """The threads that read or write the chunks of large values, `settings.parallel` of them,
    started on first use."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._settings.parallel,
                                                    thread_name_prefix="ragcomp-redis")
            return self._executor

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._pool().submit(fn, *args)

    def map_ranges(self, fn: Callable[[int, int], Any], count: int) -> list[Any]:
        """fn(start, stop) over `parallel` contiguous ranges of [0, count), in worker threads."""
        n = min(self._settings.parallel, count)
        bounds = [(i * count // n, (i + 1) * count // n) for i in range(n)]
        if n == 1:
            return [fn(*bounds[0])]
        futures = [self._pool().submit(fn, a, b) for a, b in bounds]
        return [f.result() for f in futures]

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def _reason(e: BaseException) -> str:
    # redis-py wraps the socket error; its strerror ("Connection refused") is the useful part.
    seen: list[BaseException] = [e]
    while seen and len(seen) < 10:
        err = seen.pop(0)
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        seen += [x for x in (err.__cause__, err.__context__) if x is not None]
    return str(e) or type(e).__name__


class RedisErrors:
    """Which exceptions mean that Redis failed (`caught`), and the StoreError, naming the store's
    URL without its password, that each becomes."""

    def __init__(self, redis: Any, shown_url: str) -> None:
        self.shown_url = shown_url
        # RedisClusterException (no reachable node, slots not covered) is not a RedisError.
        self.caught: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self._unreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

    def store_error(self, e: BaseException, what: str) -> StoreError:
        if isinstance(e, self._unreachable) or "cannot be connected" in str(e):
            return StoreError(f"cannot reach Redis at {self.shown_url}: {_reason(e)}")
        return StoreError(f"Redis at {self.shown_url} failed to {what}: {e}")
