"""The records of KV page retrieval (`ragcomp.kv.pages`): `LongDocument`, a document known to
a cache with its token ids, page layout and per-page fingerprints, and `PageStats`, the
per-call `KVStats` extended with the page side (pages kept, bytes read to score and to answer,
scoring time). Free of models, stores and tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from ragcomp.kv.fingerprint import ids_hash
from ragcomp.kv.types import KVStats


@dataclass
class PageStats(KVStats):
    """KVStats plus the page side: pages kept (indices in document order), the bytes read to
    score and to answer, and the time spent scoring (inside ttft)."""

    document_tokens: int = 0
    page_tokens: int = 0
    pages_total: int = 0
    pages_kept: int = 0
    kept_pages: list[int] = field(default_factory=list)
    kept_tokens: int = 0
    scoring: str = ""
    seconds_score: float = 0.0
    bytes_score: int = 0
    bytes_pages: int = 0
    bytes_all_pages: int = 0

    @property
    def bytes_touched(self) -> int:
        """Scoring data + kept pages (the shared prefix is resident and not counted)."""
        return self.bytes_score + self.bytes_pages


@dataclass
class LongDocument:
    """A document known to the cache: its token ids and page layout."""

    id: str
    ids: list[int]
    page_tokens: int
    bounds: list[tuple[int, int]]
    fingerprints: list[str]

    @property
    def n_pages(self) -> int:
        return len(self.bounds)

    @property
    def cache_key(self) -> str:
        """Keys in-memory scoring data: the id alone could name another text later."""
        return f"{self.id}\x00{ids_hash(self.ids)}\x00{self.page_tokens}"
