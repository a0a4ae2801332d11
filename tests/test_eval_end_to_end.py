"""`ragcomp eval` end to end (API and CLI) over a small real corpus with the offline MiniLM, and the
readers it uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from small_wiki import QA, WIKI, small_corpus

from ragcomp.cli import main
from ragcomp.eval import (
    contains_answer,
    evaluate,
    markdown,
    plot,
    write_json,
)
from ragcomp.llm import Reader, load_reader

needs_data = pytest.mark.skipif(not WIKI.exists() or not QA.exists(), reason="../shared/data not present")


# -- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "small-wiki-index"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "text": p.text, **p.metadata}) + "\n"
                            for p in small_corpus()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six dev questions (singles and multis) plus one whose gold article is not in the corpus."""
    lines = QA.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in lines[:4] + lines[160:162]]
    rows.append({"id": "orphan", "question": "What is the capital of Atlantis?", "answers": ["Poseidonia"],
                 "titles": ["Atlantis (fictional)"], "evidence": ["Its capital is Poseidonia."]})
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@needs_data
def test_evaluate_end_to_end(corpus_file: Path, qa_file: Path, index_dir: Path, tmp_path: Path) -> None:
    report = evaluate(qa_file, method="rerank,recomp-extractive", params={"rerank.top_n": 2},
                      corpus=corpus_file, retrieve_k=5, reader="none", baseline=True, device="cpu",
                      index_dir=index_dir)
    assert report["n_questions"] == 7
    assert report["missing_titles"] == {"count": 1, "questions": [{"id": "orphan",
                                                                   "titles": ["Atlantis (fictional)"]}]}
    assert report["config"]["tokenizer"] == "cl100k_base"
    base, rerank, recomp = report["runs"]
    labels = [r["label"] for r in report["runs"]]
    assert labels == ["none (uncompressed)", "rerank top_n=2", "recomp-extractive"]
    # One retrieval shared by every row.
    for r in (rerank, recomp):
        assert [q["retrieved"] for q in r["per_question"]] == [q["retrieved"] for q in base["per_question"]]
        assert r["retrieval_recall"] == base["retrieval_recall"]
        assert r["tokens_in"] == base["tokens_in"]
    # The uncompressed row keeps everything by definition.
    assert base["tokens_out"] == base["tokens_in"] and base["compression_ratio"] == 1.0
    assert base["evidence_recall"] == 1.0 and base["answer_kept"] == 1.0 and base["empty_rate"] == 0.0
    # The orphan question is kept and counted as a retrieval miss.
    orphan = base["per_question"][-1]
    assert orphan["id"] == "orphan" and orphan["titles_found"] == 0 and not orphan["answer_in_retrieved"]
    titles = sum(len(q["titles"]) for q in base["per_question"])
    found = sum(q["titles_found"] for q in base["per_question"])
    assert base["retrieval_recall"] == round(found / titles, 4)
    assert found >= titles - 2  # the gold articles are in this small corpus
    assert all(len(q["kept"]) <= 2 for q in rerank["per_question"])
    assert rerank["compression_ratio"] > 1.5 and recomp["compression_ratio"] > 1.5
    for run in report["runs"]:
        assert run["em"] is None and run["f1"] is None
        assert set(run["latency_ms"]) == {"retrieve", "compress", "generate", "total"}
        assert run["latency_ms"]["total"]["p50"] <= run["latency_ms"]["total"]["p95"]
        assert run["latency_ms"]["generate"]["p50"] is None
        per = run["per_question"]
        kept = sum(q["evidence_kept"] for q in per)
        assert run["evidence_recall"] == round(kept / sum(q["evidence_in_retrieved"] for q in per), 4)
        assert 0.0 <= run["answer_kept"] <= 1.0
    json.loads(json.dumps(report, allow_nan=False))  # strict JSON: no inf or NaN anywhere
    md = markdown(report)
    assert "| none (uncompressed)" in md and "| recomp-extractive" in md and "orphan" in md
    png = plot(report, tmp_path / "eval.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(write_json(report, tmp_path / "r.json").read_text())["runs"][0]["n"] == 7


@needs_data
def test_cli_sweep_writes_all_outputs(corpus_file: Path, qa_file: Path, index_dir: Path,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["eval", "--data", str(qa_file), "--corpus", str(corpus_file), "--index-dir", str(index_dir),
               "--retrieve-k", "5", "--method", "recomp-extractive", "--baseline", "--sweep", "top_k=1,3",
               "--limit", "4", "--device", "cpu", "--quiet", "--json", str(out / "e.json"),
               "--markdown", str(out / "e.md"), "--plot", str(out / "e.png")])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "recomp-extractive top_k=1" in stdout and "recomp-extractive top_k=3" in stdout
    report = json.loads((out / "e.json").read_text())
    labels = [r["label"] for r in report["runs"]]
    assert labels == ["none (uncompressed)", "recomp-extractive top_k=1", "recomp-extractive top_k=3"]
    k1, k3 = report["runs"][1], report["runs"][2]
    assert k1["sweep"] == {"key": "top_k", "value": 1}
    assert k1["tokens_out"] <= k3["tokens_out"]  # fewer sentences, fewer tokens
    assert (out / "e.md").read_text().startswith("## ragcomp eval")
    assert (out / "e.png").stat().st_size > 10_000


def test_load_reader_rejects_bad_specs() -> None:
    assert load_reader("none").tokenizer == "cl100k"
    assert load_reader("none", tokenizer="o200k").tokenizer == "o200k"
    with pytest.raises(ValueError, match="needs a model name"):
        load_reader("openai:")
    with pytest.raises(ValueError, match="only for 'openai:MODEL'"):
        load_reader("smollm2-135m", base_url="http://localhost:1/v1")


@needs_data
@pytest.mark.slow
def test_smollm2_reader_answers_short() -> None:
    reader = load_reader("smollm2-135m", device="cpu")
    assert reader.tokenizer == "smollm2-135m"
    ctx = json.loads(WIKI.read_text(encoding="utf-8"))["Boxing"]["extract"]
    # The raw generation is 'The answer is: "mouthguards"': the lead and quotes must go.
    answer = reader.answer("Besides protective gloves and hand wraps, what protective equipment is "
                           "usually worn in boxing?", ctx)
    assert answer == "mouthguards"
    assert "\n" not in answer and not answer.endswith(".")
    assert len(answer.split()) <= 32


class _FirstWordsReader(Reader):
    """A rule-based reader (no model): answers with the context's first three words; records
    the batches it was given, so the batching of the eval loop can be checked."""

    tokenizer = "whitespace"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def answer(self, question: str, context: str | None) -> str:
        return " ".join((context or "no context").split()[:3])

    def answer_batch(self, items: list[tuple[str, str | None]]) -> list[str | None]:
        self.batches.append(len(items))
        return super().answer_batch(items)


@needs_data
def test_batched_reading_matches_one_at_a_time(corpus_file: Path, qa_file: Path, index_dir: Path) -> None:
    runs = {}
    for bs in (1, 3):
        reader = _FirstWordsReader()
        runs[bs] = evaluate(qa_file, method="recomp-extractive", corpus=corpus_file, retrieve_k=3,
                            reader=reader, device="cpu", index_dir=index_dir, batch_size=bs)
        assert reader.batches == ([1] * 7 if bs == 1 else [3, 3, 1])
    one, three = runs[1]["runs"][0], runs[3]["runs"][0]
    assert [q["prediction"] for q in one["per_question"]] == [q["prediction"] for q in three["per_question"]]
    assert (one["em"], one["f1"], one["acc"]) == (three["em"], three["f1"], three["acc"])
    # Compression is batched too (compress_batch over 3 questions): same contexts, and each
    # question of a batch is given the same share of its time.
    assert [q["tokens_out"] for q in one["per_question"]] == [q["tokens_out"] for q in three["per_question"]]
    ms = [q["latency_ms"]["compress"] for q in three["per_question"]]
    assert ms[0] == ms[1] == ms[2] and ms[3] == ms[4] == ms[5]
    # acc is "a gold answer appears in the prediction", recomputed here from the predictions.
    per = three["per_question"]
    assert three["acc"] == round(sum(contains_answer(q["prediction"], q["answers"]) for q in per) / 7, 4)
    assert runs[3]["config"]["batch_size"] == 3
    assert "compress and generate ms = a batch of 3 questions" in markdown(runs[3])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate(qa_file, method="recomp-extractive", corpus=corpus_file, reader=reader, batch_size=0)


@needs_data
@pytest.mark.slow
def test_smollm2_batched_answers_equal_single() -> None:
    """Left-padded batched greedy decoding gives the same answers as one prompt at a time."""
    reader = load_reader("smollm2-135m", device="cpu")
    wiki = json.loads(WIKI.read_text(encoding="utf-8"))
    boxing = "Besides protective gloves and hand wraps, what protective equipment is usually worn in boxing?"
    items = [(boxing, wiki["Boxing"]["extract"][:600]),
             ("What is the capital of France?", None),
             ("Which river flows through Leeds?", wiki["Leeds"]["extract"][:300])]
    assert reader.answer_batch(items) == [reader.answer(q, c) for q, c in items]
    assert reader.answer_batch([]) == []
