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
            "acc": _pct(run.get("acc")),
            "empty": _pct(run["empty_rate"]),
            "retrieve ms p50/p95": _ms(lat["retrieve"]),
            "compress ms p50/p95": _ms(lat["compress"]),
            "generate ms p50/p95": _ms(lat["generate"]),
            "total ms p50/p95": _ms(lat["total"]),
        })
    if rows and all(r["EM"] == "" for r in rows):  # no reader: drop the empty columns
        for r in rows:
            for col in ("EM", "F1", "acc", "generate ms p50/p95"):
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
        "best over aliases; acc = a gold answer appears in the prediction; empty = the method judged "
        "nothing relevant (answered without context); "
        "latencies per question, each row starting from the same embedding cache (questions cached by "
        "retrieval, passages and sentences not)"
        + (f"; compress and generate ms = a batch of {report['config']['batch_size']} questions' time "
           "over its size."
           if report["config"].get("batch_size", 1) > 1 else "."),
        "",
    ]
    return "\n".join(parts)


# -- chart ---------------------------------------------------------------------------------------

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Compression (x, log scale) against answers kept in the context and, with a reader,
    exact match and F1 (evidence recall without one). One colour per method; a sweep is a
    line through its values; every point is labelled (sweep value, tokens per question) with
    labels placed so they do not overlap; the uncompressed baseline is a star and a dashed line."""
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, MultipleLocator, NullLocator

    runs = report["runs"]
    has_reader = any(r["em"] is not None for r in runs)
    panels = [("answer_kept", "Answer still in the context", "of questions whose top-k held the answer")]
    if has_reader:
        reader = report["config"]["reader"]["name"]
        panels.append(("em", "Exact match", f"reader {reader}, SQuAD-style, best over aliases"))
        panels.append(("f1", "Token F1", f"reader {reader}, SQuAD-style, best over aliases"))
    else:
        panels.append(("evidence_recall", "Gold evidence sentences kept",
                       "of those the top-k held, verbatim"))

    methods = list(dict.fromkeys(r["method"] for r in runs))
    color = {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(methods)}
    xs_all = [r["compression_ratio"] for r in runs if r["compression_ratio"]]
    xmax = max([*xs_all, 2.0])

    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.9), squeeze=False)
    labels_per_ax = []
    for ax, (key, title, subtitle) in zip(axes[0], panels, strict=True):
        labels = []
        ys_all = []
        for m in methods:
            pts = [(r["compression_ratio"], 100 * r[key], r) for r in runs
                   if r["method"] == m and r["compression_ratio"] and r[key] is not None]
            if not pts:
                continue
            pts.sort(key=lambda t: t[0])
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            ys_all += y
            if m == "none":
                ax.axhline(y[0], color=color[m], ls="--", lw=1, alpha=0.6, zorder=1)
                ax.scatter(x, y, s=150, marker="*", color=color[m], zorder=3, label="uncompressed top-k")
            else:
                if len(pts) > 1:
                    ax.plot(x, y, color=color[m], lw=1.8, alpha=0.85, zorder=2)
                ax.scatter(x, y, s=52, color=color[m], edgecolor="white", linewidth=0.9, zorder=3, label=m)
            for xi, yi, r in pts:
                tok = r["tokens_out"] / max(r["n"], 1)
                sw = r.get("sweep")
                if sw:  # the method is in the legend; its sweep value and size are what differ
                    text = f"{sw['key']}={sw['value']} · {tok:,.0f} tok"
                elif m == "none":
                    text = f"uncompressed · {tok:,.0f} tok/q"
                else:
                    text = f"{r['label']} · {tok:,.0f} tok/q"
                labels.append((xi, yi, text, color[m]))
        lo, hi = _y_range(ys_all)
        ax.set_ylim(lo, hi + (hi - lo) * 0.04)
        ax.yaxis.set_major_locator(MultipleLocator(10 if hi - lo <= 60 else 20))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}%"))
        ax.set_xscale("log", base=2)
        ticks = [2.0**i for i in range(0, math.ceil(math.log2(xmax * 1.3)) + 1)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.set_xlim(0.8, xmax * 1.9)
        ax.grid(True, which="major", color="#e3e3e3", lw=0.7)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_xlabel("compression: tokens in ÷ tokens out  (more →)")
        ax.set_title(f"{title}\n{subtitle}", fontsize=10.5, loc="left", linespacing=1.5)
        ax.title.set_color("#222222")
        labels_per_ax.append((ax, labels))
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    c = report["config"]
    fig.suptitle(
        f"How much context each method keeps, and what survives it: {report['n_questions']} questions "
        f"of {Path(c['data']).name}, top-{c['retrieve_k']} of {Path(c['corpus']).name}, "
        f"tokens of {c['tokenizer']}",
        fontsize=11.5, x=0.01, ha="left",
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    for ax, labels in labels_per_ax:  # after layout: placement works in final display coordinates
        _place_labels(fig, ax, labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _y_range(ys: list[float]) -> tuple[float, float]:
    """Percent axis that fits the data with a margin, snapped to tens, at least 30 points tall."""
    if not ys:
        return 0.0, 100.0
    lo = max(0.0, math.floor((min(ys) - 6) / 10) * 10)
    hi = min(100.0, math.ceil((max(ys) + 6) / 10) * 10)
    if hi - lo < 30:
        lo = max(0.0, hi - 30)
        hi = max(hi, lo + 30)
    return lo, hi


# Candidate label offsets (points) around a marker, tried in order: right, left, above, below...
_OFFSETS = [(7, 3, "left"), (7, -11, "left"), (-7, 3, "right"), (-7, -11, "right"), (0, 9, "center"),
            (0, -18, "center"), (12, 12, "left"), (12, -20, "left"), (-12, 12, "right"), (-12, -20, "right"),
            (0, 20, "center"), (0, -28, "center")]


def _place_labels(fig: Any, ax: Any, labels: list[tuple[float, float, str, str]]) -> None:
    """Greedy placement: each label takes the first candidate spot that overlaps no marker,
    no earlier label and stays inside the axes; failing that, the least overlapping one."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    dpi_scale = fig.dpi / 72.0
    axes_box = ax.get_window_extent(renderer)
    r = 5 * dpi_scale
    taken = [Bbox.from_extents(px - r, py - r, px + r, py + r)
             for px, py in (to_px((x, y)) for x, y, _, _ in labels)]
    # Most constrained first: labels of points with close neighbours pick before the others.
    order = sorted(range(len(labels)), key=lambda i: labels[i][0])
    for i in order:
        x, y, text, col = labels[i]
        best = None
        for dx, dy, ha in _OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha,
                              va="bottom", fontsize=7.5, color=col, zorder=4,
                              bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.85})
            box = ann.get_window_extent(renderer)
            inside = (box.x0 >= axes_box.x0 and box.x1 <= axes_box.x1
                      and box.y0 >= axes_box.y0 and box.y1 <= axes_box.y1 + 4 * dpi_scale)
            overlap = sum(_area(box, t) for t in taken) + (0 if inside else 1e9)
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, ann, box)
            else:
                ann.remove()
            if overlap == 0:
                break
        assert best is not None
        taken.append(best[2])


def _area(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0
