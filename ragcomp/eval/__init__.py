"""Evaluate compression methods on questions: `evaluate(...)` and `ragcomp eval`.

    from ragcomp.eval import evaluate
    report = evaluate("qa.jsonl", method=["rerank", "recomp-extractive"], baseline=True,
                      params={"rerank.top_n": 3}, reader="smollm2-135m")
    report["runs"][0]["compression_ratio"], report["runs"][0]["answer_kept"]
"""

from ragcomp.eval.data import Question, load_questions
from ragcomp.eval.metrics import (
    contains_answer,
    evidence_present,
    exact_match,
    f1_score,
    normalize_ws,
    percentile,
    squad_normalize,
)
from ragcomp.eval.report import markdown, plot, write_json
from ragcomp.eval.runner import aggregate, evaluate, plan_runs

__all__ = [
    "Question",
    "aggregate",
    "contains_answer",
    "evaluate",
    "evidence_present",
    "exact_match",
    "f1_score",
    "load_questions",
    "markdown",
    "normalize_ws",
    "percentile",
    "plan_runs",
    "plot",
    "squad_normalize",
    "write_json",
]
