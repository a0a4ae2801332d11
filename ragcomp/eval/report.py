"""Reports of an eval: JSON, a markdown table, and a chart of compression against kept answers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragcomp._optional import require


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: the report never holds inf/NaN (None stands for "undefined").
    text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _ms(lat: dict[str, float | None]) -> str:
    p50, p95 = lat.get("p50"), lat.get("p95")
    if p50 is None:
        return ""
    return f"{_num(p50)} / {_num(p95)}"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One dict per run, columns in display order, values formatted."""
    rows = []
    for run in report["runs"]:
        n = max(run["n"], 1)
        lat = run["latency_ms"]
        ratio = run["compression_ratio"]
        rows.append({
            "method": run["label"],
            "ratio": "∞" if ratio is None and run["tokens_out"] == 0 else f"{ratio:.2f}×",
            "tokens/q in→out": f"{run['tokens_in'] / n:,.0f} → {run['tokens_out'] / n:,.0f}",
            "retrieval recall": _pct(run["retrieval_recall"]),
            "evidence recall": _pct(run["evidence_recall"]),
            "answer kept": _pct(run["answer_kept"]),
            "EM": _pct(run["em"]),
            "F1": _pct(run["f1"]),
            "empty": _pct(run["empty_rate"]),
            "retrieve ms p50/p95": _ms(lat["retrieve"]),
            "compress ms p50/p95": _ms(lat["compress"]),
            "generate ms p50/p95": _ms(lat["generate"]),
            "total ms p50/p95": _ms(lat["total"]),
        })
    if rows and all(r["EM"] == "" for r in rows):  # no reader: drop the empty columns
        for r in rows:
            for col in ("EM", "F1", "generate ms p50/p95"):
                del r[col]
    return rows


def render_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r[c].ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
    return "\n".join(lines)


def summary_line(report: dict[str, Any]) -> str:
    c = report["config"]
    reader = c["reader"]["name"]
    miss = report["missing_titles"]["count"]
    return (
        f"{report['n_questions']} questions from {c['data']}"
        + (f" ({miss} with a gold title missing from the corpus)" if miss else "")
        + f"; corpus {c['corpus']} ({c['corpus_passages']:,} passages), "
        f"top-{c['retrieve_k']} by {c['embedder']}; reader {reader}; tokens counted with "
        f"{c['tokenizer']}; wall time {report['seconds']['total']:,.1f} s"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a summary, the table, and what each column means."""
    parts = ["## ragcomp eval", "", summary_line(report), "", render_table(table_rows(report)), ""]
    miss = report["missing_titles"]
    if miss["count"]:
        listed = "; ".join(f"{m['id']}: {', '.join(m['titles'])}" for m in miss["questions"][:20])
        more = f" (and {miss['count'] - 20} more)" if miss["count"] > 20 else ""
        parts += [f"Gold titles not in the corpus ({miss['count']} questions, counted as retrieval "
                  f"misses): {listed}{more}", ""]
    for w in report.get("warnings", []):
        parts += [f"Warning: {w}", ""]
    parts += [
        "ratio = tokens in / tokens out over all questions; retrieval recall = gold titles in the top-k; "
        "evidence recall = gold evidence sentences kept verbatim, of those the top-k held; answer kept = "
        "questions whose answer is still in the context, of those whose top-k held it; EM/F1 = SQuAD-style, "
        "best over aliases; empty = the method judged nothing relevant (answered without context); "
        "latencies per question.",
        "",
    ]
    return "\n".join(parts)


# -- chart ---------------------------------------------------------------------------------------

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Compression (x, log scale) against answers kept in the context and, with a reader,
    exact match (or evidence recall without one). One colour per method; a sweep is a line
    through its values, each point labelled; the baseline is a dashed reference."""
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    runs = report["runs"]
    has_reader = any(r["em"] is not None for r in runs)
    panels = [("answer_kept", "answers still in the context", "of questions whose top-k held the answer")]
    if has_reader:
        panels.append(("em", "exact match of the reader", f"reader {report['config']['reader']['name']}"))
        panels.append(("f1", "token F1 of the reader", "SQuAD-style, best over aliases"))
    else:
        panels.append(("evidence_recall", "gold evidence sentences kept",
                       "of those the top-k held, verbatim"))

    methods = list(dict.fromkeys(r["method"] for r in runs))
    color = {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(methods)}
    xs_all = [r["compression_ratio"] for r in runs if r["compression_ratio"]]
    xmax = max([*xs_all, 2.0])

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.8), squeeze=False)
    for ax, (key, title, subtitle) in zip(axes[0], panels, strict=True):
        for m in methods:
            pts = [(r["compression_ratio"], r[key], r) for r in runs
                   if r["method"] == m and r["compression_ratio"] and r[key] is not None]
            if not pts:
                continue
            pts.sort(key=lambda t: t[0])
            x = [p[0] for p in pts]
            y = [100 * p[1] for p in pts]
            if m == "none":
                ax.axhline(y[0], color=color[m], ls="--", lw=1, alpha=0.7, zorder=1)
                ax.scatter(x, y, s=110, marker="*", color=color[m], zorder=3, label="uncompressed top-k")
            else:
                if len(pts) > 1:
                    ax.plot(x, y, color=color[m], lw=1.6, alpha=0.8, zorder=2)
                ax.scatter(x, y, s=46, color=color[m], edgecolor="white", linewidth=0.8, zorder=3, label=m)
            for (xi, _, r), yi in zip(pts, y, strict=True):
                tok = r["tokens_out"] / max(r["n"], 1)
                tag = f"{r['sweep']['key']}={r['sweep']['value']}" if r.get("sweep") else ""
                text = f"{tag}\n{tok:,.0f} tok" if tag else f"{tok:,.0f} tok/q"
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(6, 5), fontsize=7.5,
                            color=color[m], linespacing=0.95, zorder=4,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
        ax.set_xscale("log", base=2)
        ticks = [2.0**i for i in range(0, math.ceil(math.log2(xmax * 1.3)) + 1)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.set_xlim(0.85, xmax * 1.6)
        ax.set_ylim(0, 105)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}%"))
        ax.grid(True, which="major", color="#dddddd", lw=0.7)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_xlabel("compression (tokens in ÷ tokens out), more →")
        ax.set_title(f"{title}\n", fontsize=11, loc="left")
        ax.text(0, 1.02, subtitle, transform=ax.transAxes, fontsize=8, color="#666666")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False,
                   bbox_to_anchor=(0.5, -0.01))
    c = report["config"]
    fig.suptitle(
        f"Compression vs. kept answers: {report['n_questions']} questions of {Path(c['data']).name}, "
        f"top-{c['retrieve_k']} from {Path(c['corpus']).name}, tokens of {c['tokenizer']}",
        fontsize=12, x=0.01, ha="left",
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
