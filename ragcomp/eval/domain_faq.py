"""The `faq` domain: the FAQs that upstream projects ship in Debian packages (SQLite, GNU nano,
fetchmail, curl). Each entry is a document: the question is the FAQ's own question, the passage is
its answer body (long bodies cut into 512-token chunks), the evidence is the body's first sentence
(an FAQ answer usually opens with the answer) and there is no short answer."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from ragcomp.eval.domain_core import Built, Candidate, Doc, first_sentence
from ragcomp.eval.domain_text import Block, html_blocks

# "(1) How ...?", "1.1. What ...?", "G1. What ...?", "1.4 When ...?"
_NUMBERED_Q = re.compile(r"(?:\(\d+\)|[A-Z]{0,2}\d+(?:\.\d+)*\.?)\s+(\S.*\?)")
_TEXT_Q = re.compile(r"^ {1,3}\d+\.\d+ (\S[^\n]*)$", re.M)
_TEXT_SECTION = re.compile(r"^ ?\d+\. \S[^\n]*$", re.M)
MIN_WORDS = 15

# (package, file inside it, format)
FAQ_FILES = (
    ("sqlite3-doc", "usr/share/doc/sqlite3/faq.html", "html"),
    ("nano", "usr/share/doc/nano/faq.html", "html"),
    ("fetchmail", "usr/share/doc/fetchmail/fetchmail-FAQ.html", "html"),
    ("libcurl4-doc", "usr/share/doc/libcurl4/FAQ.gz", "text"),
)


def html_faq_entries(blocks: list[Block]) -> list[tuple[str, str]]:
    """(question, answer body) for each numbered question (a heading or paragraph that is only the
    question) followed by its answer blocks, up to the next question or heading."""
    out: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for b in blocks:
        m = _NUMBERED_Q.fullmatch(b.text) if b.kind in ("h", "p") and b.text.count("?") == 1 else None
        if m:
            current = []
            out.append((" ".join(m.group(1).split()), current))
        elif b.kind == "h":
            current = None
        elif current is not None:
            current.append(b.text)
    return _best([(q, "\n\n".join(body)) for q, body in out])


def text_faq_entries(text: str) -> list[tuple[str, str]]:
    """(question, answer body) from a plain-text FAQ with "  1.2 Question?" lines (curl's): the
    table of contents lists each question too, so the entry with the longest body wins."""
    starts = [(m.start(), m.end(), m.group(1).strip()) for m in _TEXT_Q.finditer(text)]
    sections = [m.start() for m in _TEXT_SECTION.finditer(text)]
    out = []
    for i, (_, end, question) in enumerate(starts):
        following = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        stop = min([s for s in sections if s > end] + [following])
        lines = text[end:stop].strip("\n").split("\n")
        indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
        body = "\n".join(x[indent:] for x in lines).strip()
        if question.endswith("?"):
            out.append((question, body))
    return _best(out)


def _best(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One entry per question (the longest body), in first-seen order, bodies of MIN_WORDS or more."""
    best: dict[str, str] = {}
    for q, body in entries:
        if len(body.split()) > len(best.get(q, "").split()):
            best[q] = body
    return [(q, b) for q, b in best.items() if len(b.split()) >= MIN_WORDS]


def faq_candidates(source: str, entries: list[tuple[str, str]]) -> tuple[list[Doc], list[Candidate]]:
    docs, cands = [], []
    for i, (question, body) in enumerate(entries, 1):
        doc = Doc(f"{source}#{i}", question, [("", body)])
        docs.append(doc)
        ev = first_sentence(body, 3)
        if ev and body.startswith(ev):
            cands.append(Candidate(doc.id, "faq", question, [], ev))
    return docs, cands


def build_faq(root: Path) -> Built:
    docs, cands = [], []
    counts = {}
    for package, rel, fmt in FAQ_FILES:
        path = root / rel
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8", "replace")
        entries = html_faq_entries(html_blocks(text)) if fmt == "html" else text_faq_entries(text)
        d, c = faq_candidates(package, entries)
        docs += d
        cands += c
        counts[package] = len(d)
    return Built(docs, cands, "section:512", {"entries": counts})
