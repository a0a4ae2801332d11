"""FAISS vector index with string ids: inner product over L2-normalised float32 vectors.

On disk an index is a folder: `index.faiss` (faiss.write_index), `ids.json` (the string ids in
FAISS's internal order) and `meta.json` (format, dim, count, factory, and a free-form `info` dict,
e.g. the embedding model). Nothing is pickled. `load` checks that the three agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.stores.base import VectorIndex

FORMAT = "ragcomp.faiss"
FORMAT_VERSION = 1
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.json", "meta.json"


def _faiss() -> Any:
    return require("faiss", "faiss")


class FaissIndex(VectorIndex):
    """String ids over a FAISS index built from a factory string ("Flat", "HNSW32", "IVF256,Flat"...).

    Vectors are normalised on `add` and queries on `search`, so scores are cosine similarities.
    Factories that need training (IVF, PQ) are trained on the first batch added. Methods take a
    lock, so one index can be shared by threads.
    """

    def __init__(self, dim: int, factory: str = "Flat", *, info: dict[str, Any] | None = None) -> None:
        if not isinstance(dim, int | np.integer) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        faiss = _faiss()
        self.dim = int(dim)
        self.factory = factory
        self.info: dict[str, Any] = dict(info or {})
        try:
            self._index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"FAISS cannot build index {factory!r} of dim {dim}: {_first_line(e)}") from e
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"FaissIndex(dim={self.dim}, factory={self.factory!r}, size={len(self)})"

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._pos

    @property
    def ids(self) -> list[str]:
        """The ids in insertion order (a copy)."""
        with self._lock:
            return list(self._ids)

    # -- adding and searching ----------------------------------------------------------------

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors (n, dim) under `ids` (n unique strings not already in the index)."""
        ids = list(ids)
        x = self._as_matrix(vectors, "vectors")
        if len(ids) != x.shape[0]:
            raise ValueError(f"got {len(ids)} ids for {x.shape[0]} vectors")
        bad = next((i for i in ids if not isinstance(i, str)), None)
        if bad is not None:
            raise TypeError(f"ids must be strings, got {type(bad).__name__} {bad!r}")
        dup = _first_duplicate(ids)
        if dup is not None:
            raise ValueError(f"duplicate id {dup!r} in one add() call")
        if not ids:
            return
        with self._lock:
            dup = next((i for i in ids if i in self._pos), None)
            if dup is not None:
                raise ValueError(f"id {dup!r} is already in the index")
            if not self._index.is_trained:
                try:
                    self._index.train(x)
                except RuntimeError as e:
                    raise ValueError(
                        f"FAISS index {self.factory!r} needs training and could not be trained on "
                        f"{len(ids)} vectors: {_first_line(e)}"
                    ) from e
                self._enable_reconstruct()
            self._index.add(x)
            start = len(self._ids)
            self._ids.extend(ids)
            self._pos.update((i, start + n) for n, i in enumerate(ids))

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (id, cosine score) per query, best first. A 1-D query is one query."""
        q = self._as_matrix(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        with self._lock:
            k = min(int(k), len(self._ids))
            if k == 0 or q.shape[0] == 0:
                return [[] for _ in range(q.shape[0])]
            scores, labels = self._index.search(q, k)
            ids = self._ids
            return [
                [(ids[j], float(s)) for j, s in zip(row_l, row_s, strict=True) if j >= 0]
                for row_l, row_s in zip(labels.tolist(), scores.tolist(), strict=True)
            ]

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored (normalised) vectors for `ids`, shape (len(ids), dim)."""
        ids = list(ids)
        with self._lock:
            missing = next((i for i in ids if i not in self._pos), None)
            if missing is not None:
                raise KeyError(f"id {missing!r} is not in the index")
            if not ids:
                return np.zeros((0, self.dim), dtype=np.float32)
            keys = np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))
            try:
                return np.asarray(self._index.reconstruct_batch(keys), dtype=np.float32).reshape(
                    len(ids), self.dim
                )
            except RuntimeError as e:
                raise ValueError(
                    f"FAISS index {self.factory!r} cannot return stored vectors: {_first_line(e)}"
                ) from e

    def _as_matrix(self, a: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(a)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}) or ({self.dim},), got {np.shape(a)}")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise TypeError(f"{what} must be real numbers, got dtype {x.dtype}")
        x = np.array(x, dtype=np.float32, order="C", copy=True)  # our copy: normalised in place
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        _faiss().normalize_L2(x)
        return x

    def _enable_reconstruct(self) -> None:
        # IVF indexes can only reconstruct by id with a direct map.
        faiss = _faiss()
        with contextlib.suppress(RuntimeError, AttributeError):
            faiss.extract_index_ivf(self._index).make_direct_map()

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index folder (created if needed); files are replaced atomically, meta last."""
        faiss = _faiss()
        path = Path(directory).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        with self._lock:
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "dim": self.dim,
                "count": len(self._ids),
                "factory": self.factory,
                "metric": "inner_product",
                "normalized": True,
                "info": self.info,
            }
            tmp = _tmp_name(path, INDEX_FILE)
            try:
                faiss.write_index(self._index, str(tmp))
                os.replace(tmp, path / INDEX_FILE)
            finally:
                tmp.unlink(missing_ok=True)
            try:
                _write_text(path / IDS_FILE, json.dumps(self._ids, ensure_ascii=False))
                _write_text(path / META_FILE, json.dumps(meta, ensure_ascii=False, indent=2))
            except TypeError as e:
                raise ValueError(f"index info must be JSON-serialisable: {e}") from e
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> FaissIndex:
        """Read a folder written by `save`; raise FileNotFoundError or ValueError naming the problem."""
        faiss = _faiss()
        path = Path(directory).expanduser()
        where = f"FAISS index folder {path}"
        for name in (META_FILE, IDS_FILE, INDEX_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{where} has no {name}")
        meta = _read_json(path / META_FILE, where)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{where}: {META_FILE} is not a ragcomp FAISS index description")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where}: unsupported format version {meta.get('version')!r}")
        dim, count = meta.get("dim"), meta.get("count")
        if not (isinstance(dim, int) and dim > 0 and isinstance(count, int) and count >= 0):
            raise ValueError(f"{where}: {META_FILE} has invalid dim {dim!r} or count {count!r}")
        info = meta.get("info") or {}
        if not isinstance(info, dict):
            raise ValueError(f"{where}: {META_FILE} 'info' must be an object")
        ids = _read_json(path / IDS_FILE, where)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{where}: {IDS_FILE} must be a list of strings")
        if len(ids) != count:
            raise ValueError(f"{where}: {IDS_FILE} has {len(ids)} ids, {META_FILE} says {count}")
        dup = _first_duplicate(ids)
        if dup is not None:
            raise ValueError(f"{where}: {IDS_FILE} lists id {dup!r} twice")
        try:
            index = faiss.read_index(str(path / INDEX_FILE))
        except RuntimeError as e:
            raise ValueError(f"{where}: cannot read {INDEX_FILE}: {_first_line(e)}") from e
        if index.d != dim or index.ntotal != count:
            raise ValueError(
                f"{where}: {INDEX_FILE} holds {index.ntotal} vectors of dim {index.d}, "
                f"{META_FILE} says {count} of dim {dim}"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{where}: {INDEX_FILE} does not use inner product")
        self = cls.__new__(cls)
        self.dim = dim
        self.factory = str(meta.get("factory", "Flat"))
        self.info = info
        self._index = index
        self._ids = ids
        self._pos = {i: n for n, i in enumerate(ids)}
        self._lock = threading.RLock()
        if count:
            self._enable_reconstruct()
        return self


def open_index(
    path: str | os.PathLike[str] | None,
    dim: int | None = None,
    factory: str = "Flat",
    *,
    info: dict[str, Any] | None = None,
) -> FaissIndex:
    """Load the index saved at `path` if there is one, else a new empty index of `dim`.

    A loaded index must match `dim` when one is given (a different embedding model would
    silently give meaningless scores).
    """
    if path is not None and (Path(path).expanduser() / META_FILE).exists():
        index = FaissIndex.load(path)
        if dim is not None and index.dim != dim:
            raise ValueError(f"FAISS index at {path} has dim {index.dim}, expected {dim}")
        return index
    if dim is None:
        raise ValueError(f"no FAISS index at {path}; give dim to create a new one")
    return FaissIndex(dim, factory, info=info)


def _first_duplicate(ids: list[str]) -> str | None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # FAISS errors carry a C++ location block; its "Error: ..." line is what helps.
    for line in text.splitlines():
        if "Error" in line and "'" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tmp_name(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


def _write_text(target: Path, text: str) -> None:
    tmp = _tmp_name(target.parent, target.name)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(file: Path, where: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: {file.name} is not valid JSON ({e})") from e
