"""The FAISS vector index, against real faiss."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

RNG = np.random.default_rng(1234)


# -- FAISS ---------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def faiss_mod():
    return pytest.importorskip("faiss")


def make_index(n: int = 300, dim: int = 24, **kw):
    from ragcomp.stores.faiss import FaissIndex

    vecs = RNG.standard_normal((n, dim)).astype(np.float32) * RNG.uniform(0.1, 5, (n, 1)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(n)]
    index = FaissIndex(dim, **kw)
    index.add(ids, vecs)
    return index, ids, vecs


def brute_force(vecs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = unit(queries.astype(np.float64)) @ unit(vecs.astype(np.float64)).T
    order = np.argsort(-scores, axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_faiss_search_matches_numpy(faiss_mod) -> None:
    index, ids, vecs = make_index()
    queries = RNG.standard_normal((7, 24)).astype(np.float64) * 3  # float64 and unnormalised
    got = index.search(queries, 10)
    order, scores = brute_force(vecs, queries, 10)
    assert len(got) == 7
    for row, o, s in zip(got, order, scores, strict=True):
        assert [i for i, _ in row] == [ids[j] for j in o]
        np.testing.assert_allclose([sc for _, sc in row], s, atol=1e-5)
        assert all(isinstance(sc, float) for _, sc in row)


def test_faiss_query_shapes_and_k(faiss_mod) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index, ids, vecs = make_index(n=5, dim=8)
    one = index.search(vecs[2], 1)  # 1-D query
    assert one[0][0][0] == "doc-2" and one[0][0][1] == pytest.approx(1.0, abs=1e-5)
    everything = index.search(vecs[:2], 50)  # k > size: all of them
    assert [len(r) for r in everything] == [5, 5]
    assert sorted(i for i, _ in everything[0]) == sorted(ids)
    assert index.search(vecs[:3], 0) == [[], [], []]
    assert index.search(np.zeros((0, 8), np.float32), 3) == []
    empty = FaissIndex(8)
    assert len(empty) == 0 and empty.search(vecs[:2], 5) == [[], []]
    with pytest.raises(ValueError, match="k must be"):
        index.search(vecs[0], -1)


def test_faiss_bad_input_errors_name_the_problem(faiss_mod) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index = FaissIndex(16)
    with pytest.raises(ValueError, match=r"shape \(n, 16\) or \(16,\), got \(3, 12\)"):
        index.add(["a", "b", "c"], np.ones((3, 12), np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 16\).*got \(12,\)"):
        index.search(np.ones(12, np.float32), 1)
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        index.add(["a", "b"], np.ones((3, 16), np.float32))
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        index.add(["a", "a"], np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add(["a"], np.full((1, 16), np.nan, np.float32))
    index.add(["a"], np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="'a' is already in the index"):
        index.add(["a"], np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        FaissIndex(0)
    with pytest.raises(ValueError, match="NoSuchIndex"):
        FaissIndex(16, "NoSuchIndex")
    assert len(index) == 1  # failed adds left nothing behind


def test_faiss_vectors_by_id(faiss_mod) -> None:
    index, _, vecs = make_index(n=50, dim=12)
    got = index.vectors(["doc-7", "doc-0", "doc-7"])
    np.testing.assert_allclose(got, unit(vecs[[7, 0, 7]]), atol=1e-6)
    assert index.vectors([]).shape == (0, 12)
    with pytest.raises(KeyError, match="doc-999"):
        index.vectors(["doc-1", "doc-999"])


def test_faiss_save_load_roundtrip(faiss_mod, tmp_path: Path) -> None:
    from ragcomp.stores.faiss import FaissIndex, open_index

    index, ids, _ = make_index(n=120, dim=16, info={"model": "minilm", "normalize": True})
    folder = index.save(tmp_path / "idx")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.json", "index.faiss", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["dim"], meta["count"], meta["info"]["model"]) == (16, 120, "minilm")
    loaded = FaissIndex.load(folder)
    assert (loaded.dim, len(loaded), loaded.info, loaded.ids) == (16, 120, index.info, ids)
    q = RNG.standard_normal((4, 16)).astype(np.float32)
    assert loaded.search(q, 7) == index.search(q, 7)
    np.testing.assert_allclose(loaded.vectors(["doc-3"]), index.vectors(["doc-3"]))
    loaded.add(["extra"], q[:1])  # a loaded index keeps growing
    assert loaded.search(q[0], 1)[0][0][0] == "extra"
    again = open_index(folder, dim=16)
    assert len(again) == 120
    with pytest.raises(ValueError, match="has dim 16, expected 32"):
        open_index(folder, dim=32)
    fresh = open_index(tmp_path / "none-yet", dim=16)
    assert len(fresh) == 0
    with pytest.raises(ValueError, match="give dim"):
        open_index(tmp_path / "none-yet")


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        ("meta-not-json", ValueError, "meta.json is not valid JSON"),
        ("meta-wrong-count", ValueError, "ids.json has 30 ids, meta.json says 31"),
        ("meta-wrong-dim", ValueError, "holds 30 vectors of dim 8, meta.json says 30 of dim 9"),
        ("meta-other-format", ValueError, "not a ragcomp FAISS index"),
        ("ids-not-strings", ValueError, "ids.json must be a list of strings"),
        ("ids-duplicate", ValueError, "lists id 'doc-0' twice"),
        ("index-truncated", ValueError, "cannot read index.faiss"),
        ("index-missing", FileNotFoundError, "has no index.faiss"),
    ],
)
def test_faiss_load_rejects_corrupt_folders(
    faiss_mod, tmp_path: Path, damage: str, error: type[Exception], match: str
) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index, ids, _ = make_index(n=30, dim=8)
    folder = index.save(tmp_path / "idx")
    meta_file, ids_file, index_file = folder / "meta.json", folder / "ids.json", folder / "index.faiss"
    meta = json.loads(meta_file.read_text())
    if damage == "meta-not-json":
        meta_file.write_text(meta_file.read_text()[:-5])
    elif damage == "meta-wrong-count":
        meta_file.write_text(json.dumps({**meta, "count": 31}))
    elif damage == "meta-wrong-dim":
        meta_file.write_text(json.dumps({**meta, "dim": 9}))
    elif damage == "meta-other-format":
        meta_file.write_text(json.dumps({**meta, "format": "something-else"}))
    elif damage == "ids-not-strings":
        ids_file.write_text(json.dumps(list(range(30))))
    elif damage == "ids-duplicate":
        ids_file.write_text(json.dumps(["doc-0", *ids[:-1]]))
    elif damage == "index-truncated":
        index_file.write_bytes(index_file.read_bytes()[:100])
    elif damage == "index-missing":
        index_file.unlink()
    with pytest.raises(error, match=match) as info:
        FaissIndex.load(folder)
    assert str(folder) in str(info.value)


def test_faiss_trained_factory_and_threads(faiss_mod) -> None:
    from ragcomp.stores.faiss import FaissIndex

    index, _, vecs = make_index(n=400, dim=16, factory="IVF4,Flat")
    np.testing.assert_allclose(index.vectors(["doc-5"]), unit(vecs[5:6]), atol=1e-6)
    assert len(index.search(vecs[:2], 3)[0]) == 3

    # Concurrent adds must keep ids and vectors aligned: vector i points along axis i % dim.
    shared = FaissIndex(32)

    def add(worker: int) -> None:
        for j in range(20):
            n = worker * 20 + j
            v = np.zeros(32, np.float32)
            v[n % 32] = 1.0 + n
            shared.add([f"w{n}"], v[None])

    threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(shared) == 80
    for n in (0, 33, 79):
        assert int(np.argmax(shared.vectors([f"w{n}"])[0])) == n % 32
