"""Two-passage (comparison, bridge) training data for the Provence pruner: facts, templates, labels,
exclusions, determinism, and mixing with single-passage data at training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ragcomp import Passage
from ragcomp.text import split_sentences
from ragcomp.train import provence_multi as pm
from ragcomp.train.provence_data import normalise_question, read_examples, write_jsonl


def art(title: str, text: str, topic: str, description: str) -> Passage:
    return Passage(title, text, metadata={"title": title, "topic": topic, "description": description})


CORPUS = [
    art("Alphaville", "Alphaville is a city in Testland. It lies on the Blue River. "
        "It has a population of 2.5 million.", "Geography", "City in Testland"),
    art("Betatown", "Betatown is a city in Otherland. Betatown has a population of 800,000 and a port.",
        "Geography", "City in Otherland"),
    art("Gammaburg", "Gammaburg is a city in Testland. It has a population of 5 million.",
        "Geography", "City in Testland"),  # an evaluation gold title below: never used
    art("Ann Example", "Ann Example was a Testish writer. Her first novel appeared in 1925. "
        "She later moved to Alphaville with her family.", "People", "Testish writer (1900–1970)"),
    art("Bob Sample", "Bob Sample was a Testish writer. In 1890 he wrote a poem about Alphaville.",
        "People", "Testish writer"),
    art("Cy Other", "Cy Other was an Otherish writer of plays. Cy Other wrote in 1950 and 1960.",
        "People", "Otherish writer"),
    art("Dee Other", "Dee Other was an Otherish painter. She painted rivers.", "People", "Otherish painter"),
]
EXCLUDED = {"Gammaburg"}
# A question of the single-passage data about Alphaville's second sentence (what a bridge rephrases).
SINGLE = [{"qid": "q0", "question": "Which river does Alphaville lie on?", "kind": "positive",
           "source": "Alphaville", "target": 1, "passage_id": "Alphaville"}]


def sentence_text(rec: dict[str, Any], i: int) -> str:
    a, b = rec["sentences"][i]
    return rec["text"][a:b]


def labelled(rec: dict[str, Any]) -> list[int]:
    return [i for i, x in enumerate(rec["labels"]) if x]


def make(seed: int = 0, retriever: Any = None, exclude_questions: set[str] | None = None,
         n_negatives: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return pm.make_multi_examples(CORPUS, retriever, SINGLE, EXCLUDED, exclude_questions or set(),
                                  n_comparison=20, n_bridge=5, n_negatives=n_negatives, seed=seed,
                                  min_kind_count=2)


def test_facts_and_helpers() -> None:
    sents = split_sentences(CORPUS[0].text)
    facts = pm.article_facts(CORPUS[0], sents)
    assert facts["population"].value == 2.5e6 and facts["population"].sentence == 2
    assert facts["kind"].value == "city" and facts["kind"].sentence == 0
    ann = pm.article_facts(CORPUS[3], split_sentences(CORPUS[3].text))
    assert ann["nationality"].value == "Testish" and ann["year_People"].value == 1925.0
    assert ann["year_People"].sentence == 1
    bc = art("Old", "Old was a Testish king. He ruled from 1750 to 1050 BC. He died in 1000 BC.", "People",
             "Testish king")
    assert "year_People" not in pm.article_facts(bc, split_sentences(bc.text))  # BC years are skipped
    assert pm.kind_noun("Elasmobranch fish in the family Ginglymostomatidae") == "fish"
    assert pm.plural("city") == "cities" and pm.plural("species") == "species" and pm.plural("box") == "boxes"
    assert pm.entity_name("Orange (colour)") == "Orange"
    # The population sentence does not name Alphaville: its first sentence is labelled too.
    assert pm.evidence_labels(sents, 2, "Alphaville") == [0, 2]
    assert pm.evidence_labels(split_sentences(CORPUS[1].text), 1, "Betatown") == [1]
    assert pm.standalone("He went to Java in May.", 11, 15)
    assert not pm.standalone("He sailed the Java Sea.", 14, 18)


def test_comparison_labels_and_answers() -> None:
    records, stats = make()
    by_q: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_q.setdefault(r["qid"], []).append(r)
        assert r["passage_id"] not in EXCLUDED and "Gammaburg" not in r["source"]
        assert r["sentences"] == [[s.start, s.end] for s in split_sentences(r["text"])]
    pop = [rs for rs in by_q.values() if rs[0]["task"] == "comparison:population"]
    assert len(pop) == 1  # Gammaburg is excluded, so Alphaville-Betatown is the only pair
    q = pop[0][0]["question"]
    assert "Alphaville" in q and "Betatown" in q and q.endswith("?")
    bigger_wins = "larger" in q or "more populous" in q
    assert pop[0][0]["answer"] == ("Alphaville" if bigger_wins else "Betatown")
    labels = {r["passage_id"]: labelled(r) for r in pop[0]}
    assert labels == {"Alphaville": [0, 2], "Betatown": [1]}
    assert all(r["ranking_label"] == 1.0 and r["kind"] == "positive" for r in pop[0])
    nationality = [rs for rs in by_q.values() if rs[0]["task"] == "comparison:nationality"]
    answers = {r["answer"] for seed in range(4) for r in make(seed)[0]
               if r["task"] == "comparison:nationality"}
    assert answers == {"yes", "no"}
    assert all(len(rs) == 2 for rs in nationality)
    for rs in nationality:
        names = {r["passage_id"] for r in rs}
        same = names in ({"Ann Example", "Bob Sample"}, {"Cy Other", "Dee Other"})
        assert rs[0]["answer"] == ("yes" if same else "no")
        for r in rs:  # the sentence stating the nationality, which also names the person
            assert labelled(r) == [0]
    assert stats["questions"] == len(by_q) and stats["articles_excluded_eval"] == 1


def test_bridge_question_and_labels() -> None:
    records, stats = make()
    bridge = [r for r in records if r["task"] == "bridge"]
    assert stats["questions_bridge"] == 2  # Alphaville is named by Ann Example and Bob Sample
    for r in bridge:
        q = r["question"]
        assert "Alphaville" not in q and "the city" in q and q.startswith("Which river does the city")
        if r["passage_id"] == "Alphaville":
            assert labelled(r) == [1]  # the original target sentence
        else:
            assert r["passage_id"] in q  # asked through the article that mentions Alphaville
            (i,) = labelled(r)
            assert "Alphaville" in sentence_text(r, i)
    assert {r["passage_id"] for r in bridge} == {"Alphaville", "Ann Example", "Bob Sample"}


def test_deterministic_and_eval_questions_filtered() -> None:
    first, _ = make(seed=0)
    assert make(seed=0)[0] == first
    assert make(seed=1)[0] != first  # another seed orders pairs and templates differently
    banned = {normalise_question(first[0]["question"])}
    again, stats = make(seed=0, exclude_questions=banned)
    assert stats["rejected_eval_question"] == 1
    assert all(normalise_question(r["question"]) not in banned for r in again)
    with pytest.raises(ValueError, match="n_bridge"):
        pm.make_multi_examples(CORPUS, None, SINGLE, set(), set(), 1, -1)


def test_negatives_from_real_retrieval(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from ragcomp.retrieval import CorpusRetriever

    retriever = CorpusRetriever.build(CORPUS, "minilm", None, "cpu", progress=False)
    records, stats = make(retriever=retriever, n_negatives=1)
    negatives = [r for r in records if r["kind"] == "negative"]
    assert negatives and stats["negatives"] == len(negatives)
    for r in negatives:
        assert r["ranking_label"] == 0.0 and not any(r["labels"])
        assert r["passage_id"] not in r["source"].split("|") and r["passage_id"] not in EXCLUDED
    path = write_jsonl(records, tmp_path / "multi.jsonl.gz")
    assert read_examples(path) == records  # the trainer's reader accepts the records as written
