"""Small interfaces every store implements: bytes by key, and vectors by id."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class StoreError(RuntimeError):
    """A store could not be reached or refused an operation; the message names the store."""


class ByteStore(ABC):
    """Bytes by string key. Values are opaque bytes: never pickled objects.

    `get` returns None for a missing key. `set` is atomic: a reader sees the old value,
    the new value, or nothing, never half a value. Implementations batch `get_many` /
    `set_many` where the backend allows it.
    """

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def set(self, key: str, value: bytes) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def set_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        for k, v in items:
            self.set(k, v)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def keys(self, prefix: str = "") -> Iterator[str]:
        raise NotImplementedError(f"{type(self).__name__} cannot list keys")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles; the default has none."""


class VectorIndex(ABC):
    """Dense vectors with string ids; inner-product search over L2-normalised vectors."""

    dim: int

    @abstractmethod
    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None: ...

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]: ...

    @abstractmethod
    def __len__(self) -> int: ...
