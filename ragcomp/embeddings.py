"""Embeddings cached by text hash in any byte store, so no text is embedded twice."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np

from ragcomp.models import Embedder, load_embedder
from ragcomp.stores.base import ByteStore
from ragcomp.stores.memory import MemoryStore


def text_key(model: str, text: str) -> str:
    """Store key of one text's embedding under one model (shared with the retriever's store)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
    return f"ragcomp:emb:{model}:{digest}"


class CachedEmbedder:
    """Wraps an Embedder; looks every text up by hash first and embeds only the misses.

    Values are raw little-endian float32 bytes with the dimension checked on read, so a
    corrupt or foreign entry is re-embedded instead of returned. The default store is an
    in-process LRU bounded to `max_bytes` (256 MiB: about 170k MiniLM vectors).
    """

    def __init__(
        self,
        embedder: Embedder | str = "minilm",
        store: ByteStore | None = None,
        device: str | None = None,
        max_bytes: int = 256 * 2**20,
    ) -> None:
        self.embedder = load_embedder(embedder, device) if isinstance(embedder, str) else embedder
        self.store = store if store is not None else MemoryStore(max_bytes=max_bytes)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text, in order."""
        texts = list(texts)
        dim = self.dim
        out = np.zeros((len(texts), dim), dtype=np.float32)
        if not texts:
            return out
        keys = [text_key(self.name, t) for t in texts]
        found = self.store.get_many(keys)
        missing: dict[str, list[int]] = {}
        for i, (t, raw) in enumerate(zip(texts, found, strict=True)):
            if raw is not None and len(raw) == dim * 4:
                out[i] = np.frombuffer(raw, dtype="<f4")
            else:
                missing.setdefault(t, []).append(i)
        with self._lock:
            self.hits += len(texts) - sum(len(v) for v in missing.values())
            self.misses += len(missing)
        if missing:
            unique = list(missing)
            vecs = self.embedder.encode(unique)
            self.store.set_many(
                (text_key(self.name, t), vecs[j].astype("<f4").tobytes()) for j, t in enumerate(unique)
            )
            for j, t in enumerate(unique):
                out[missing[t]] = vecs[j]
        return out

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


_SHARED: dict[tuple[str, str | None], CachedEmbedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(name: str = "minilm", device: str | None = None) -> CachedEmbedder:
    """One cached embedder per model in this process, so caches are shared across steps."""
    with _SHARED_LOCK:
        key = (name, device)
        if key not in _SHARED:
            _SHARED[key] = CachedEmbedder(name, device=device)
        return _SHARED[key]
