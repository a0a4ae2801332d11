"""Dense retrieval over a whole corpus: embed every passage once into a FAISS index on disk.

The index folder records a fingerprint of the corpus (ids and texts) and of the embedder,
so a saved index is reused only for exactly the corpus and model that built it; anything
else rebuilds it. Document vectors live in the index only; queries go through the shared
embedding cache, so the compressors that embed the same query later get it for free.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ragcomp.corpus import load_corpus
from ragcomp.embeddings import CachedEmbedder, shared_embedder
from ragcomp.models import cache_dir
from ragcomp.stores.faiss import FaissIndex
from ragcomp.types import Passage

# Texts per encode call: small enough for a live progress bar, large enough to batch well.
_CHUNK = 512


def corpus_fingerprint(passages: Sequence[Passage], embedder: str, factory: str = "Flat") -> str:
    """Hash of the embedder name, index factory and every (id, text), in order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{embedder}\x00{factory}\x00{len(passages)}\x00".encode())
    for p in passages:
        h.update(p.id.encode("utf-8"))
        h.update(b"\x00")
        h.update(p.text.encode("utf-8"))
        h.update(b"\x01")
    return h.hexdigest()


def default_index_dir(corpus: str | Path, embedder: str) -> Path:
    """`<cache>/indexes/<name>-<embedder>`; a file corpus adds a hash of its absolute path."""
    if str(corpus) == "wiki":
        name = "wiki"
    else:
        path = Path(corpus).resolve()
        name = f"{path.stem}-{hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()}"
    return cache_dir() / "indexes" / _safe(f"{name}-{embedder}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


class CorpusRetriever:
    """Top-k passages of a corpus for a query, by cosine similarity of embeddings."""

    def __init__(self, passages: Sequence[Passage], index: FaissIndex, embedder: CachedEmbedder) -> None:
        self.passages = list(passages)
        self.by_id = {p.id: p for p in self.passages}
        if len(self.by_id) != len(self.passages):
            raise ValueError("passage ids must be unique")
        missing = next((i for i in index.ids if i not in self.by_id), None)
        if missing is not None:
            raise ValueError(f"the index holds id {missing!r} that is not in the corpus")
        if index.dim != embedder.dim:
            raise ValueError(
                f"index dim {index.dim} does not match embedder {embedder.name!r} ({embedder.dim})"
            )
        self.index = index
        self.embedder = embedder
        self.loaded_from_disk = False
        self.build_seconds = 0.0

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        embedder: str | CachedEmbedder = "minilm",
        index_dir: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
        factory: str = "Flat",
    ) -> CorpusRetriever:
        """Embed `passages` into a FAISS index; with `index_dir`, save it there and reuse it
        on later calls while the corpus fingerprint matches."""
        passages = list(passages)
        if not passages:
            raise ValueError("cannot build a retriever over an empty corpus")
        emb = shared_embedder(embedder, device) if isinstance(embedder, str) else embedder
        fp = corpus_fingerprint(passages, emb.name, factory)
        if index_dir is not None and (Path(index_dir) / "meta.json").exists():
            try:
                index = FaissIndex.load(index_dir)
            except (OSError, ValueError) as e:
                _say(progress, f"ignoring unreadable index at {index_dir} ({e}); rebuilding")
            else:
                if index.info.get("fingerprint") == fp:
                    self = cls(passages, index, emb)
                    self.loaded_from_disk = True
                    return self
                _say(progress, f"index at {index_dir} was built for another corpus or embedder; rebuilding")
        t0 = time.perf_counter()
        vecs = _embed_all(emb, [p.text for p in passages], progress)
        index = FaissIndex(emb.dim, factory, info={
            "fingerprint": fp, "embedder": emb.name, "passages": len(passages),
        })
        index.add([p.id for p in passages], vecs)
        if index_dir is not None:
            index.save(index_dir)
        self = cls(passages, index, emb)
        self.build_seconds = time.perf_counter() - t0
        return self

    @classmethod
    def for_corpus(
        cls,
        corpus: str | Path = "wiki",
        embedder: str = "minilm",
        index_dir: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
    ) -> CorpusRetriever:
        """A retriever over `load_corpus(corpus)`, its index cached under the ragcomp cache dir."""
        passages = load_corpus(corpus)
        if index_dir is None:
            index_dir = default_index_dir(corpus, embedder)
        return cls.build(passages, embedder, index_dir, device, progress)

    def retrieve(self, query: str, k: int = 10) -> list[Passage]:
        """The k passages most similar to `query`, best first, `score` = cosine similarity."""
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Passage]]:
        if isinstance(queries, str):
            raise TypeError("retrieve_batch takes a list of queries, not one string")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        bad = next((q for q in queries if not isinstance(q, str)), None)
        if bad is not None:
            raise TypeError(f"queries must be str, got {type(bad).__name__}")
        if not queries:
            return []
        qv = self.embedder.embed(list(queries))
        hits = self.index.search(qv, k)
        out = []
        for row in hits:
            res = []
            for pid, score in row:
                p = self.by_id[pid]
                # A copy: callers may rewrite text or metadata without touching the corpus.
                res.append(Passage(p.id, p.text, score, dict(p.metadata)))
            out.append(res)
        return out


def _embed_all(emb: CachedEmbedder, texts: list[str], progress: bool) -> np.ndarray:
    # The raw embedder, not the cache: 10k document vectors would only crowd out the
    # query and sentence vectors that the cache is for; the index keeps them instead.
    model = emb.embedder
    out = np.zeros((len(texts), emb.dim), dtype=np.float32)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=f"embedding corpus ({model.name})", unit="passage")
        except ImportError:
            _say(True, f"embedding {len(texts)} passages with {model.name}...")
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        out[start : start + len(chunk)] = model.encode(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"ragcomp: {msg}", file=sys.stderr, flush=True)
