"""Tables of a multi-domain suite run (`ragcomp.eval.suite.run_suite`): one per domain, one across domains."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ragcomp.eval.report import render_table
from ragcomp.eval.suite import BUCKETS


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _ratio(row: Mapping[str, Any]) -> str:
    r = row.get("compression_ratio")
    if r is None:
        return "∞" if row.get("tokens_out") == 0 and row.get("tokens_in") else ""
    return f"{r:.2f}×"


def _ms(row: Mapping[str, Any]) -> str:
    lat = row["latency_ms"]["compress"]
    if lat.get("p50") is None:
        return ""
    return (
        f"{lat['p50']:,.0f} / {lat['p95']:,.0f}"
        if lat["p50"] >= 10
        else f"{lat['p50']:.2g} / {lat['p95']:.2g}"
    )


def _bucket_cell(b: Mapping[str, Any]) -> str:
    if not b.get("n"):
        return "–"
    return f"{_pct(b.get('answer_kept')) or 'n/a'} @ {_ratio(b)}"


def suite_rows(rows: Sequence[Mapping[str, Any]], macro: bool = False) -> list[dict[str, str]]:
    """One table row per method row: ratio, tokens, answer kept, evidence recall, empty rate, compress
    latency, and answer kept @ ratio per passage-length bucket."""
    out = []
    for row in rows:
        n = max(row["n"], 1)
        cells = {
            "method": row["label"],
            "n": str(row["n"]),
            "ratio": _ratio(row),
            "tokens/q in→out": f"{row['tokens_in'] / n:,.0f} → {row['tokens_out'] / n:,.0f}",
            "retrieval recall": _pct(row["retrieval_recall"]),
            "answer kept": _pct(row["answer_kept"]),
        }
        if macro:
            cells["answer kept, mean of domains"] = _pct(row.get("macro_answer_kept"))
        cells.update(
            {
                "evidence recall": _pct(row["evidence_recall"]),
                "empty": _pct(row["empty_rate"]),
                "compress ms p50/p95": _ms(row),
            }
        )
        for b in BUCKETS:
            cells[f"kept @ ratio, {b} words"] = _bucket_cell(row["buckets"][b])
        out.append(cells)
    return out


def kind_rows(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """Across domains, per question kind (the `type` of the questions): answer kept @ ratio."""
    acc: dict[str, dict[str, list[int]]] = {}
    for dom in report["domains"].values():
        for row in dom["rows"]:
            for q in row.get("per_question", []):
                a = acc.setdefault(row["label"], {}).setdefault(q.get("type") or "-", [0, 0, 0, 0, 0])
                a[0] += 1
                a[1] += bool(q["answer_in_retrieved"])
                a[2] += bool(q["answer_in_retrieved"] and q["answer_in_context"])
                a[3] += q["tokens_in"]
                a[4] += q["tokens_out"]
    kinds = sorted({k for by_kind in acc.values() for k in by_kind})
    out = []
    for label, by_kind in acc.items():
        cells = {"method": label}
        for k in kinds:
            n, retr, kept, tin, tout = by_kind.get(k, [0, 0, 0, 0, 0])
            name = f"{k} ({n})"
            cells[name] = "–" if not retr else f"{_pct(kept / retr)} @ " + _ratio(
                {"compression_ratio": tin / tout if tout else None, "tokens_in": tin, "tokens_out": tout})
        out.append(cells)
    return out


def suite_markdown(report: Mapping[str, Any]) -> str:
    """The whole run as markdown: a line of settings, a table per domain, the table across domains."""
    cfg = report["config"]
    parts = [
        "## ragcomp eval --suite",
        "",
        f"{report['suite']} ({report['split']} split), top-{cfg['retrieve_k']} by {cfg['embedder']}, "
        f"tokens counted with {cfg['tokenizer']}"
        + (f", first {cfg['limit']} questions per domain" if cfg.get("limit") else "")
        + f"; wall time {report['seconds']:,.0f} s",
        "",
    ]
    for name, dom in report["domains"].items():
        counts = ", ".join(f"{b}: {n}" for b, n in dom["bucket_questions"].items())
        parts += [
            f"### {name}",
            "",
            f"{dom['n_questions']} questions ({dom['short_answers']} with a short answer; gold passage "
            f"words {counts}), {dom['corpus_passages']:,} passages",
            "",
            render_table(suite_rows(dom["rows"])),
            "",
        ]
    parts += ["### all domains", "", render_table(suite_rows(report["across"], macro=True)), ""]
    kinds = kind_rows(report)
    if kinds:
        parts += ["### all domains by question kind (answer kept @ ratio)", "", render_table(kinds), ""]
    parts += [
        "ratio = tokens in / tokens out; answer kept = questions whose short answer (or, without one, "
        "evidence sentence) is still in the context, of those whose top-k held it; evidence recall = "
        "evidence sentences kept verbatim, of those the top-k held; empty = the method kept nothing; "
        "naive@M = MiniLM's most similar retrieved sentences at M's tokens out, per question; "
        "buckets by the gold passage's words; all domains = pooled questions (mean of domains beside it).",
        "",
    ]
    return "\n".join(parts)
