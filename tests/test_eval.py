"""`ragcomp eval`: metrics with hand-computed values, data validation and run planning (the
end-to-end eval: test_eval_end_to_end.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from ragcomp.cli import main
from ragcomp.eval import (
    aggregate,
    contains_answer,
    evidence_present,
    exact_match,
    f1_score,
    load_questions,
    percentile,
    plan_runs,
    squad_normalize,
)
from ragcomp.llm import clean_answer
from ragcomp.types import Passage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "wiki_summaries_en.json"
QA = DATA / "qa_dev.jsonl"
needs_data = pytest.mark.skipif(not WIKI.exists() or not QA.exists(), reason="../shared/data not present")


# -- metrics --------------------------------------------------------------------------------------

def test_squad_normalize_and_exact_match() -> None:
    assert squad_normalize("The  Captains\u00a0Regent.") == "captains regent"
    assert exact_match("the Mokattam Formation.", ["Mokattam Formation"]) == 1.0
    assert exact_match("Mokattam", ["Mokattam Formation"]) == 0.0
    assert exact_match("Aire", ["River Aire", "Aire"]) == 1.0  # any alias
    assert exact_match(None, ["x"]) == 0.0


def test_f1_hand_computed() -> None:
    # pred {in, 1915} vs gold {1915}: precision 1/2, recall 1 -> 2/3.
    assert f1_score("in 1915", ["1915"]) == pytest.approx(2 / 3)
    # vs "franklin d roosevelt": p 2/2, r 2/3 -> 0.8; vs "roosevelt": p 1/2, r 1 -> 2/3; max 0.8.
    assert f1_score("Franklin Roosevelt", ["Franklin D. Roosevelt", "Roosevelt"]) == pytest.approx(0.8)
    assert f1_score("Paris", ["London"]) == 0.0
    # Repeated tokens count once per occurrence in both: "a b b" vs "b b c" -> common 2 of 3 and 3.
    assert f1_score("x y y", ["y y z"]) == pytest.approx(2 / 3)
    # Normalisation: non-breaking space and punctuation.
    assert f1_score("6.7\u00a0million tonnes", ["6.7 million tonnes"]) == 1.0


def test_contains_answer_whitespace_case_and_word_edges() -> None:
    ctx = "It produced 6.7 million tonnes in 2019. Born in 1917."
    assert contains_answer(ctx, ["6.7\u00a0million tonnes"])  # NBSP in the answer
    assert contains_answer("six: 6.7\u00a0million  tonnes", ["6.7 million tonnes"])  # NBSP in the context
    assert contains_answer(ctx, ["BORN IN 1917"])
    assert not contains_answer(ctx, ["17"])  # not inside 1917
    assert not contains_answer(ctx, ["million ton"])
    assert contains_answer("the U.S. and", ["U.S."])
    assert not contains_answer("", ["x"]) and not contains_answer(None, ["x"])


def test_evidence_present_is_verbatim_modulo_whitespace() -> None:
    ctx = "First sentence here.  It is located 440\u00a0kilometres south of Tehran. Last."
    assert evidence_present(ctx, [
        "It is located 440 kilometres south of Tehran.",
        "it is located 440 kilometres south of tehran.",  # case matters: verbatim
        "It is located 440 kilometres south",  # a substring still counts as present
        "Not there.",
    ]) == [True, False, True, False]


def test_percentile_linear_interpolation() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile(list(range(1, 21)), 95) == pytest.approx(19.05)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def _rec(titles: int, found: int, ev: int, ev_retr: int, ev_kept: int, ans_retr: bool, ans_ctx: bool,
         tin: int, tout: int, empty: bool = False, em: float | None = None, f1: float | None = None,
         ms: float = 10.0, acc: int | None = None) -> dict:
    return {"titles": ["t"] * titles, "titles_found": found, "evidence": ev, "evidence_in_retrieved": ev_retr,
            "evidence_kept": ev_kept, "answer_in_retrieved": ans_retr, "answer_in_context": ans_ctx,
            "tokens_in": tin, "tokens_out": tout, "empty": empty, "em": em, "f1": f1,
            "acc": acc, "latency_ms": {"retrieve": 1.0, "compress": ms, "generate": None, "total": ms + 1}}


def test_aggregate_micro_averages_by_hand() -> None:
    per_q = [
        _rec(1, 1, 1, 1, 0, True, True, 100, 25, ms=10),
        _rec(2, 1, 2, 1, 1, False, False, 200, 50, ms=30),
        _rec(1, 0, 1, 0, 0, True, False, 100, 0, empty=True, ms=20),
    ]
    agg = aggregate(per_q, generates=False)
    assert agg["n"] == 3
    assert (agg["tokens_in"], agg["tokens_out"]) == (400, 75)
    assert agg["compression_ratio"] == pytest.approx(400 / 75, abs=1e-4)
    assert agg["retrieval_recall"] == pytest.approx(2 / 4)  # titles found / titles
    assert agg["evidence_recall"] == pytest.approx(1 / 2)  # kept / present in retrieved
    assert agg["answer_kept"] == pytest.approx(1 / 2)  # of the 2 whose retrieval had it
    assert agg["empty_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert agg["em"] is None and agg["f1"] is None
    assert agg["latency_ms"]["compress"] == {"p50": 20.0, "p95": 29.0}
    assert agg["latency_ms"]["generate"] == {"p50": None, "p95": None}
    with_reader = aggregate([_rec(1, 1, 1, 1, 1, True, True, 10, 5, em=1.0, f1=1.0, acc=1),
                             _rec(1, 1, 1, 1, 1, True, True, 10, 5, em=0.0, f1=0.5, acc=1),
                             _rec(1, 1, 1, 1, 1, True, True, 10, 5, em=0.0, f1=0.0, acc=0),
                             _rec(1, 1, 1, 1, 1, True, True, 10, 5, em=0.0, f1=0.25, acc=0)], generates=True)
    assert (with_reader["em"], with_reader["f1"], with_reader["acc"]) == (0.25, 0.4375, 0.5)
    nothing = aggregate([_rec(1, 0, 0, 0, 0, False, False, 10, 0, empty=True)], generates=False)
    assert nothing["compression_ratio"] is None and nothing["evidence_recall"] is None
    assert nothing["answer_kept"] is None


def test_clean_answer() -> None:
    assert clean_answer("The answer is: 17 kJ.") == "17 kJ"
    assert clean_answer('"Paris"\nBecause the context says so.') == "Paris"
    assert clean_answer("\n\nAnswer: mouthguards.") == "mouthguards"
    assert clean_answer("Washington, D.C.") == "Washington, D.C."
    assert clean_answer("**Almagest**") == "Almagest"
    assert clean_answer("") == "" and clean_answer(None) == ""


# -- data -----------------------------------------------------------------------------------------

def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


Q1 = {"id": "a", "question": "Q?", "answers": ["x"], "titles": ["T"], "evidence": ["x is T."]}


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "qa.jsonl", [json.dumps(Q1), "", '{"id": "b", "question": '])
    with pytest.raises(ValueError, match=r"qa\.jsonl:3: malformed JSON"):
        load_questions(p)
    p = _write(tmp_path, "qa2.jsonl", [json.dumps(Q1), json.dumps({"id": "b", "answers": ["y"]})])
    with pytest.raises(ValueError, match=r"qa2\.jsonl:2: 'question' must be a non-empty string"):
        load_questions(p)
    p = _write(tmp_path, "qa3.jsonl", [json.dumps({**Q1, "answers": "x", "titles": [1]})])
    with pytest.raises(ValueError, match=r"qa3\.jsonl:1: 'titles' must be a list of strings"):
        load_questions(p)
    p = _write(tmp_path, "qa4.jsonl", [json.dumps(Q1), json.dumps(Q1)])
    with pytest.raises(ValueError, match=r"duplicate question id 'a'"):
        load_questions(p)


def test_unknown_keys_warn_once(tmp_path: Path) -> None:
    lines = [json.dumps({**Q1, "id": str(i), "foo": 1, **({"bar": 2} if i == 0 else {})}) for i in range(3)]
    p = _write(tmp_path, "qa.jsonl", lines)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qs = load_questions(p)
    assert len(qs) == 3
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "'bar' (1 item)" in msg and "'foo' (3 items)" in msg and "qa.jsonl" in msg
    # multi_type is part of the format: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = load_questions([{**Q1, "multi_type": "bridge"}])[0]
    assert q.meta == {"multi_type": "bridge"}


@needs_data
def test_dev_set_loads_cleanly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qs = load_questions(QA)
    assert len(qs) == 200 and qs[0].id == "dev-s-001"
    assert len(load_questions(QA, limit=7)) == 7


# -- planning -------------------------------------------------------------------------------------

def test_plan_runs_routes_params_and_sweeps() -> None:
    runs = plan_runs(["rerank", "recomp-extractive"], {"rerank.top_n": 3, "threshold": 0.1}, None, True)
    assert [r.label for r in runs] == ["none (uncompressed)", "rerank top_n=3 threshold=0.1",
                                       "recomp-extractive threshold=0.1"]
    assert runs[1].params == {"top_n": 3, "threshold": 0.1}
    assert runs[2].params == {"threshold": 0.1}
    runs = plan_runs(["rerank", "recomp-extractive"], {"top_n": 2}, ("top_k", [1, 4]), False)
    assert [r.label for r in runs] == ["rerank top_n=2", "recomp-extractive top_k=1",
                                       "recomp-extractive top_k=4"]
    assert runs[2].params == {"top_k": 4}
    # One sweep per method, each routed by its prefix; values parsed like --param.
    runs = plan_runs(["rerank", "recomp-extractive"], {"threshold": None},
                     ["rerank.top_n=1,3", "recomp-extractive.threshold=0.1,none"])
    assert [(r.method, r.params) for r in runs] == [
        ("rerank", {"threshold": None, "top_n": 1}), ("rerank", {"threshold": None, "top_n": 3}),
        ("recomp-extractive", {"threshold": 0.1}), ("recomp-extractive", {"threshold": None}),
    ]
    with pytest.raises(ValueError, match="swept by both 'top_k' and 'threshold'"):
        plan_runs(["recomp-extractive"], None, ["top_k=1,2", "threshold=0.1,0.2"])
    with pytest.raises(ValueError, match="accepts sweep key 'top_k'"):
        plan_runs(["rerank"], None, "top_k=1,2")
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        plan_runs(["rerank"], None, "top_n")
    with pytest.raises(ValueError, match=r"no method among .* accepts parameter 'bogus'"):
        plan_runs(["rerank"], {"bogus": 1})
    with pytest.raises(ValueError, match="does not accept parameter 'top_k'"):
        plan_runs(["rerank", "recomp-extractive"], {"rerank.top_k": 1})
    with pytest.raises(ValueError, match="not among the methods run"):
        plan_runs(["rerank"], {"recomp-extractive.top_k": 1})
    with pytest.raises(ValueError, match="Did you mean 'rerank'"):
        plan_runs(["rerankk"])
    with pytest.raises(ValueError, match="no method"):
        plan_runs([], baseline=False)


def test_every_run_starts_from_the_same_cache() -> None:
    from ragcomp.eval import Question
    from ragcomp.eval.runner import _cold_cache
    from ragcomp.retrieval import CorpusRetriever

    r = CorpusRetriever.build([Passage("a", "Alpha text."), Passage("b", "Beta text.")], device="cpu",
                              progress=False)
    qs = [Question("1", "first question?", ["x"]), Question("2", "second question?", ["y"])]
    r.embedder.embed(["a sentence some earlier run embedded", "another one"])
    _cold_cache(r, qs)
    assert len(r.embedder.store) == 2  # exactly the two questions
    hits = r.embedder.hits
    r.embedder.embed(["first question?"])
    assert r.embedder.hits == hits + 1


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path, "qa.jsonl", [json.dumps(Q1), "{not json"])
    assert main(["eval", "--data", str(bad), "--method", "rerank"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err and "Traceback" not in err
    assert main(["eval", "--data", str(tmp_path / "missing.jsonl"), "--baseline"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--data", str(bad)]) == 2
    assert "--method" in capsys.readouterr().err
