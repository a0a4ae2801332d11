"""The files of the Provence training data (`provence_data`, `provence_multi`): records written
atomically as JSONL (gzipped for a .gz name, byte-reproducible) with a `<file>.meta.json` next to
them, read back with every record checked (errors name file and line), and the sha256 of a file
that the metadata records."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragcomp.corpus import iter_jsonl


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def meta_path(path: str | Path) -> Path:
    """Where the metadata of a data file lives: `<file>.meta.json`."""
    p = Path(path)
    return p.with_name(p.name + ".meta.json")


def write_jsonl(records: Sequence[dict[str, Any]], path: str | Path,
                meta: dict[str, Any] | None = None) -> Path:
    """Write records atomically (a half-written file is never left under the final name); a name
    ending in .gz is gzipped (about 4x smaller: the device machine takes 64 MiB a call)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as raw:
            # mtime=0: the same records give the same bytes, so the recorded sha256 is reproducible.
            f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if p.suffix == ".gz" else raw
            with f:
                for rec in records:
                    f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a data file is for sharing
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if meta is not None:
        meta = {**meta, "sha256": file_sha256(p)}
        meta_path(p).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return p


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """Records of a data file (.jsonl, or .jsonl.gz), checked line by line (errors name file and line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training data {str(p)!r} does not exist "
                                f"(write it with `python -m ragcomp.train provence-data --out {p}`)")
    out = []
    for lineno, rec in iter_jsonl(p):
        _check_record(rec, f"{p}:{lineno}")
        rec.setdefault("qid", f"line-{lineno}")
        out.append(rec)
    if not out:
        raise ValueError(f"{p}: no training examples (the file is empty)")
    return out


def _check_record(rec: Any, loc: str) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
    for key in ("question", "text"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise ValueError(f"{loc}: {key!r} must be a non-empty string")
    spans, labels = rec.get("sentences"), rec.get("labels")
    if not isinstance(spans, list) or not isinstance(labels, list) or len(spans) != len(labels) or not spans:
        raise ValueError(f"{loc}: 'sentences' and 'labels' must be non-empty lists of the same length")
    end = 0
    for span, label in zip(spans, labels, strict=True):
        ok = isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
        if not ok or not end <= span[0] < span[1] <= len(rec["text"]):
            raise ValueError(f"{loc}: sentence span {span!r} is not an increasing [start, end] in the text")
        if label not in (0, 1):
            raise ValueError(f"{loc}: labels must be 0 or 1, got {label!r}")
        end = span[1]
    rank = rec.get("ranking_label")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"{loc}: 'ranking_label' must be a number, got {rank!r}")
