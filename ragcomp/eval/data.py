"""Eval questions: the JSONL format of qa_dev.jsonl, validated line by line."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys the format defines; anything else is ignored with one warning per file.
KNOWN_KEYS = frozenset({"id", "type", "question", "answers", "titles", "evidence", "multi_type"})


@dataclass
class Question:
    """One eval item. `evidence[i]` is a verbatim sentence of the article `titles[i]`."""

    id: str
    question: str
    answers: list[str]
    titles: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def load_questions(
    source: str | Path | Iterable[Mapping[str, Any] | Question], limit: int | None = None
) -> list[Question]:
    """Questions from a JSONL file, or from dicts / Questions given directly.

    Errors name the file and line. Unknown keys are ignored with a single warning.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"eval data file {str(source)!r} does not exist")
        rows = _read_jsonl(path, limit)
        where = str(path)
    else:
        rows = []
        for i, rec in enumerate(source, 1):
            if limit is not None and len(rows) >= limit:
                break
            rows.append((f"item {i}", rec))
        where = "data"
    questions: list[Question] = []
    unknown: Counter[str] = Counter()
    seen: dict[str, str] = {}
    for loc, rec in rows:
        q = rec if isinstance(rec, Question) else _parse(rec, loc, unknown)
        if q.id in seen:
            raise ValueError(f"{loc}: duplicate question id {q.id!r} (first at {seen[q.id]})")
        seen[q.id] = loc
        questions.append(q)
    if unknown:
        keys = ", ".join(f"{k!r} ({n} item{'s' if n > 1 else ''})" for k, n in sorted(unknown.items()))
        warnings.warn(f"{where}: ignoring unknown key(s) {keys}", UserWarning, stacklevel=2)
    if not questions:
        raise ValueError(f"{where}: no questions")
    return questions


def _read_jsonl(path: Path, limit: int | None) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    return rows


def _parse(rec: Any, loc: str, unknown: Counter[str]) -> Question:
    if not isinstance(rec, Mapping):
        raise ValueError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
    for k in rec:
        if k not in KNOWN_KEYS:
            unknown[k] += 1
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{loc}: 'question' must be a non-empty string")
    answers = _str_list(rec.get("answers"), "answers", loc, allow_str=True)
    if not answers:
        raise ValueError(f"{loc}: 'answers' must hold at least one answer")
    titles = _str_list(rec.get("titles", []), "titles", loc, allow_str=True)
    evidence = _str_list(rec.get("evidence", []), "evidence", loc, allow_str=True)
    qid = rec.get("id")
    if qid is None:
        qid = f"line-{loc.rsplit(':', 1)[-1]}" if ":" in loc else loc.replace(" ", "-")
    qtype = rec.get("type")
    meta = {"multi_type": rec["multi_type"]} if rec.get("multi_type") is not None else {}
    qtype = None if qtype is None else str(qtype)
    return Question(str(qid), question, answers, titles, evidence, qtype, meta)


def _str_list(value: Any, key: str, loc: str, allow_str: bool = False) -> list[str]:
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{loc}: '{key}' must be a list of strings, got {json.dumps(value)[:80]}")
    return [v for v in value if v.strip()]
