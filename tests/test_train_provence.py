"""Provence training: data generation (a scripted LM for exact checks, real SmolLM2 for one small
run), labels lining up with sentence spans, evaluation titles and questions kept out, a tiny random
BERT trained a few steps (loss falls), the saved fp16 folder loading in ProvenceCompressor, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ragcomp import Passage  # noqa: E402
from ragcomp.compressors.provence import ProvenceCompressor  # noqa: E402
from ragcomp.corpus import load_corpus  # noqa: E402
from ragcomp.models import minilm_path  # noqa: E402
from ragcomp.text import split_sentences  # noqa: E402
from ragcomp.train import provence_data as pd  # noqa: E402
from ragcomp.train.cli import main as train_main  # noqa: E402
from ragcomp.train.provence import token_labels, train  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI, QA = DATA / "wiki_summaries_en.json", DATA / "qa_dev.jsonl"
needs_data = pytest.mark.skipif(not WIKI.exists() or not QA.exists(), reason="../shared/data not present")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exclusions() -> tuple[set[str], set[str]]:
    titles, questions, _ = pd.load_exclusions([QA])
    return titles, questions


@pytest.fixture(scope="module")
def subset(exclusions: tuple[set[str], set[str]]) -> list[Passage]:
    """3 evaluation gold articles, then 6 others with at least three sentences."""
    titles, _ = exclusions
    corpus = sorted(load_corpus(WIKI), key=lambda p: p.id)
    gold = [p for p in corpus if p.id in titles][:3]
    other = [p for p in corpus if p.id not in titles and len(split_sentences(p.text)) >= 3][:6]
    return gold + other


class ScriptedLM:
    """Stands in for SmolLM2: reads the title and sentence back from the prompt and writes a
    question from them; `first` is returned for the first prompt instead."""

    def __init__(self, first: str | None = None) -> None:
        self.texts: list[str] = []
        self.first = first
        self.tokenizer = self._tokenize

    def _tokenize(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        self.texts.append(text)
        return {"input_ids": [len(self.texts) - 1]}

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 32,
                       stop_at_line: bool = False) -> list[str]:
        out = []
        for p in prompts:
            block = self.texts[p[0]].rsplit("Topic: ", 1)[1]
            title, rest = block.split("\nSentence: ", 1)
            sentence = rest.rsplit("\nQuestion:", 1)[0]
            if self.first is not None:
                out.append(f" {self.first}\n")
                self.first = None
                continue
            word = sorted(pd.content_words(sentence) - pd.content_words(title))[0]
            out.append(f" Which fact about {title} involves {word}?\nTopic: more")
        return out


class ListRetriever:
    """Returns the same passages for every question, evaluation gold articles first."""

    def __init__(self, passages: list[Passage]) -> None:
        self.passages = passages

    def retrieve_batch(self, questions: list[str], k: int = 10) -> list[list[Passage]]:
        return [list(self.passages[:k]) for _ in questions]


def check_record(rec: dict[str, Any], titles: set[str], questions: set[str]) -> None:
    """Labels line up with the splitter's sentences; nothing from the evaluation file."""
    sents = split_sentences(rec["text"])
    assert rec["sentences"] == [[s.start, s.end] for s in sents]
    assert len(rec["labels"]) == len(sents)
    assert rec["passage_id"] not in titles and rec["source"] not in titles
    assert pd.normalise_question(rec["question"]) not in questions
    assert rec["question"].endswith("?")
    if rec["kind"] == "positive":
        assert rec["ranking_label"] == 1.0 and rec["passage_id"] == rec["source"]
        assert rec["labels"] == [int(i == rec["target"]) for i in range(len(sents))]
        a, b = rec["sentences"][rec["target"]]
        assert 6 <= len(rec["text"][a:b].split()) <= 40
    else:
        assert rec["kind"] == "negative" and rec["ranking_label"] == 0.0 and not any(rec["labels"])
        assert rec["passage_id"] != rec["source"]


@needs_data
def test_examples_scripted_lm(subset: list[Passage], exclusions: tuple[set[str], set[str]],
                              tmp_path: Path) -> None:
    titles, questions = exclusions
    eval_question = json.loads(QA.read_text().splitlines()[0])["question"]
    four = subset[:7]  # 3 gold articles (never sampled) and 4 others: n_articles None takes them all
    run = lambda first: pd.make_examples(  # noqa: E731
        four, ScriptedLM(first), ListRetriever(four), None, titles, questions, n_negatives=2, seed=3)
    records, stats = run(eval_question)
    assert stats["articles"] == 4 and stats["articles_excluded_eval"] == 3
    assert stats["rejected_eval_question"] == 1  # the qa_dev question the LM "wrote" was dropped
    assert stats["questions"] == 3 and stats["negatives"] == 6 and len(records) == 9
    for rec in records:
        check_record(rec, titles, questions)
    assert records == run(eval_question)[0]  # seeded: the same sample and the same records
    assert not any(q == pd.normalise_question(c) for _, _, c in pd.FEW_SHOT for q in questions)
    assert not {t for t, _, _ in pd.FEW_SHOT} & titles

    path = pd.write_jsonl(records, tmp_path / "d.jsonl", {"stats": stats})
    assert pd.read_examples(path) == records
    assert json.loads(pd.meta_path(path).read_text())["sha256"] == pd.file_sha256(path)
    gz = pd.write_jsonl(records, tmp_path / "d.jsonl.gz")
    assert pd.read_examples(gz) == records and gz.stat().st_size < path.stat().st_size


def test_question_checks() -> None:
    s, t = "The Eiffel Tower opened in 1889 for the World's Fair in Paris.", "Eiffel Tower"
    assert pd.reject_reason("When did the Eiffel Tower open for the World's Fair?", s, t, set()) is None
    assert pd.reject_reason("When did it open", s, t, set()) == "no_question_mark"
    assert pd.reject_reason("Why?", s, t, set()) == "length"
    assert pd.reject_reason("The Eiffel Tower opened in 1889 for the World's Fair?", s, t, set()) \
        == "copies_sentence"
    assert pd.reject_reason("What is the subject of this sentence?", s, t, set()) == "about_the_text"
    assert pd.reject_reason("What is the Eiffel Tower?", s, t, set()) == "no_overlap_with_sentence"
    q = "When did the Eiffel Tower open for the World's Fair?"
    assert pd.reject_reason(q, s, t, {pd.normalise_question(q)}) == "eval_question"
    assert pd.reject_reason(q, s, t, set(), {pd.normalise_question(q)}) == "duplicate"
    assert pd.clean_question(' Question: "Who built it?"\nmore') == "Who built it?"


def test_generate_data_needs_exclusion(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no evaluation file"):
        pd.generate_data(tmp_path / "d.jsonl", n_articles=1, exclude_qa=[])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pd.generate_data(tmp_path / "d.jsonl", n_articles=1, exclude_qa=[tmp_path / "missing.jsonl"])


@needs_data
@pytest.mark.slow
def test_examples_smollm2(subset: list[Passage], exclusions: tuple[set[str], set[str]]) -> None:
    from ragcomp.models import load_causal_lm
    from ragcomp.retrieval import CorpusRetriever

    titles, questions = exclusions
    lm = load_causal_lm("smollm2-135m", device="cpu")
    retriever = CorpusRetriever.build(subset, "minilm", None, "cpu", progress=False)
    records, stats = pd.make_examples(subset, lm, retriever, 6, titles, questions, n_negatives=2,
                                      batch_size=6, seed=0)
    assert stats["prompts"] == 6 and stats["questions"] >= 1, stats
    for rec in records:
        check_record(rec, titles, questions)
    assert sum(r["kind"] == "negative" for r in records) == stats["negatives"] >= 1


def test_token_labels_follow_last_character() -> None:
    text = "Aa bb. Cc dd. Ee."
    spans, labels = [[0, 6], [7, 13], [14, 17]], [0, 1, 0]
    offsets = [(0, 2), (3, 5), (5, 6), (6, 9), (10, 12), (12, 13), (14, 16), (16, 17), (5, 5)]
    # (6, 9) is " Cc" with its leading space: its last character is in sentence 1.
    assert token_labels(offsets, spans, labels) == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert text[6:9] == " Cc"


RECORDS = [
    ("When did the tower open?", "The tower is in Paris. It opened in 1889. It is made of iron.", 1),
    ("How high is Everest?", "Everest is in Nepal. It is 8849 metres high. Climbers use oxygen.", 1),
    ("What do cats eat?", "Cats are small mammals. They eat meat. Many sleep all day.", 1),
    ("Where is the Nile?", "Rice is a grain. It grows in water. Asia grows most rice.", None),
]


def write_records(path: Path, rows: list[tuple[str, str, int | None]]) -> Path:
    recs = []
    for i, (q, text, target) in enumerate(rows):
        sents = split_sentences(text)
        recs.append({"qid": f"q{i}", "question": q, "passage_id": f"p{i}", "text": text,
                     "sentences": [[s.start, s.end] for s in sents],
                     "labels": [int(j == target) for j in range(len(sents))],
                     "ranking_label": 0.0 if target is None else 1.0, "source": f"s{i}"})
    return pd.write_jsonl(recs, path)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved like a hub model."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_train_lowers_loss_and_saves_fp16(tiny_backbone: Path, tmp_path: Path) -> None:
    data = write_records(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "model"
    report = train(data, out, backbone=str(tiny_backbone), epochs=20, batch_size=4, lr=2e-3, max_length=64,
                   device="cpu", seed=0, dev_fraction=0.0, log_every=1, progress=False)
    m = report["metrics"]
    assert report["steps"] == 20 and len(report["history"]) == 20
    assert m["train_loss_after"] < 0.7 * m["train_loss_before"], m
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert report["data"]["sha256"] == pd.file_sha256(data) and report["args"]["epochs"] == 20

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}
    comp = ProvenceCompressor(model=str(out), device="cpu", threshold=0.5)
    scored = comp.score(RECORDS[0][0], [Passage("p0", RECORDS[0][1]), Passage("p3", RECORDS[3][1])])
    assert scored[0].ranking > scored[1].ranking  # learnt on these very examples
    assert int(scored[0].sentence_scores.argmax()) == 1
    with pytest.raises(FileExistsError):
        train(data, out, backbone=str(tiny_backbone), epochs=1, device="cpu", progress=False)


def test_cli_with_dev_split(tiny_backbone: Path, tmp_path: Path) -> None:
    data = write_records(tmp_path / "d.jsonl", RECORDS * 2)  # 8 records, 8 sources
    small = tmp_path / "fp16-backbone"  # what export-backbone writes is a valid --backbone
    assert train_main(["export-backbone", "--backbone", str(tiny_backbone), "--out", str(small)]) == 0
    out = tmp_path / "m"
    argv = ["provence", "--data", str(data), "--out", str(out), "--backbone", str(small),
            "--epochs", "1", "--batch-size", "4", "--max-length", "64", "--device", "cpu",
            "--dev-fraction", "0.25", "--keep-weight", "3", "--quiet"]
    assert train_main(argv) == 0
    report = json.loads((out / "training.json").read_text())
    assert report["command"] == "python -m ragcomp.train " + " ".join(argv)
    assert report["split"]["dev_records"] == 2 and report["split"]["train_records"] == 6
    dev = report["metrics"]["dev_after"]
    assert {"token_f1", "sentence_accuracy", "ranking_acc1", "negatives_emptied", "target_top1",
            "target_top1_lexical"} <= set(dev)
    assert report["args"]["keep_weight"] == 3.0 and report["metrics"]["dev_before"]["records"] == 2
    assert 0 <= dev["sentence_accuracy"] <= 1


def test_cli_mixes_data_files(tiny_backbone: Path, tmp_path: Path) -> None:
    from ragcomp.train.provence import read_data_files

    first = write_records(tmp_path / "a.jsonl", RECORDS[:2])
    second = write_records(tmp_path / "b.jsonl", RECORDS)  # qids q0, q1 again: other questions
    mixed = read_data_files([first, second])
    assert [r["qid"] for r in mixed] == ["0:q0", "0:q1", "1:q0", "1:q1", "1:q2", "1:q3"]
    assert read_data_files([first])[0]["qid"] == "q0"  # one file: qids unchanged
    out = tmp_path / "m"
    argv = ["provence", "--data", str(first), str(second), "--out", str(out), "--backbone",
            str(tiny_backbone), "--epochs", "1", "--batch-size", "4", "--max-length", "64",
            "--device", "cpu", "--dev-fraction", "0", "--quiet"]
    assert train_main(argv) == 0
    report = json.loads((out / "training.json").read_text())
    assert [f["path"] for f in report["data"]["files"]] == [str(first), str(second)]
    assert report["data"]["files"][1]["sha256"] == pd.file_sha256(second)
    assert report["data"]["records"] == 6 and report["split"]["train_records"] == 6
    assert report["args"]["data_jsonl"] == [str(first), str(second)]


def test_bad_data(tiny_backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no training examples"):
        train(empty, tmp_path / "o1", backbone=str(tiny_backbone), device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tmp_path / "missing.jsonl", tmp_path / "o2", backbone=str(tiny_backbone), device="cpu")
    good = json.loads(write_records(tmp_path / "g.jsonl", RECORDS[:1]).read_text())
    for bad, match in [
        ("{not json", "malformed JSON"),
        (json.dumps({**good, "labels": [0, 1]}), "same length"),
        (json.dumps({**good, "sentences": [[0, 5], [3, 9], [10, 12]]}), "increasing"),
        (json.dumps({**good, "labels": [0, 2, 0]}), "0 or 1"),
        (json.dumps({**good, "question": ""}), "'question'"),
    ]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=match) as err:
            pd.read_examples(path)
        assert ":2:" in str(err.value)  # the line is named
    with pytest.raises(ValueError, match="epochs"):
        train(tmp_path / "g.jsonl", tmp_path / "o3", backbone=str(tiny_backbone), epochs=0)
    assert train_main(["provence", "--data", str(empty), "--out", str(tmp_path / "o4")]) == 2
    assert "no training examples" in capsys.readouterr().err
