"""Inputs of `ragcomp bench pages --part quality`: long documents built from the wiki corpus
(a question's gold article(s) at a random place among random other articles, filled up to a
token target), the qa_dev questions whose gold articles are all in the corpus, and the
sentence chunks that the text-chunk RAG baseline retrieves from. No model or KV cache here."""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any


def _article(p: Any) -> str:
    return f"{p.metadata.get('title', p.id)}\n{p.text}"


def build_document(gold: list[Any], others: list[Any], target_tokens: int, count: Any,
                   rng: random.Random) -> str:
    """Gold articles (kept together, in order) at a random place among random other
    articles, filled up to about `target_tokens` (never more, unless the gold alone is)."""
    sep = "\n\n"
    used = sum(count(_article(p) + sep) for p in gold)
    fill = []
    for p in rng.sample(others, len(others)):
        n = count(_article(p) + sep)
        if used + n > target_tokens:
            break
        fill.append(p)
        used += n
    at = rng.randint(0, len(fill))
    order = fill[:at] + list(gold) + fill[at:]
    return sep.join(_article(p) for p in order)


def load_items(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], list[Any]]:
    from ragcomp.corpus import iter_jsonl, load_corpus

    corpus = load_corpus(args.corpus)
    by_title = {p.metadata.get("title", p.id): p for p in corpus}
    items = []
    for _, rec in iter_jsonl(Path(args.qa)):
        if all(t in by_title for t in rec.get("titles", [])) and rec.get("titles"):
            items.append(rec)
        if len(items) >= args.questions:
            break
    return items, by_title, corpus


def text_chunks(text: str, count: Any, max_tokens: int) -> list[str]:
    """Whole sentences grouped into chunks of at most `max_tokens` tokens (an over-long
    sentence is a chunk of its own); articles never share a chunk."""
    from ragcomp.text import split_sentences

    out: list[str] = []
    for article in text.split("\n\n"):
        cur: list[str] = []
        used = 0
        for s in split_sentences(article):
            n = count(s.text + " ")
            if cur and used + n > max_tokens:
                out.append(" ".join(cur))
                cur, used = [], 0
            cur.append(s.text)
            used += n
        if cur:
            out.append(" ".join(cur))
    return out
