"""`prune-gpu --profile N`: where a Provence question's time goes, under torch.profiler: the
compressor's named ranges (CPU and GPU ms per question), the critical path (CPU ranges and GPU
work on one clock) and the GPU kernels that take the most time."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ragcomp.bench import print_table


def profile_paths(args: argparse.Namespace, config: Any, dtype: Any, paths: list[str], items: list[Any],
                  warm: list[Any], tok: Any, sync: Any,
                  compressor: Callable[[Any, Any, argparse.Namespace, str, int], Any]) -> None:
    """Per path: the compressor's named ranges (CPU and GPU ms per question) and the top GPU kernels,
    recorded on the first questions of `items` after a warm-up on `warm` and the other questions.
    `compressor(model, tok, args, path, passage_cache)` builds a path's compressor as the timed rows
    do (passed in by prune_gpu, which imports this module: no import back)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from ragcomp.compressors.provence.model import ProvenceModel

    on_gpu = args.device.startswith("cuda")
    torch.manual_seed(0)
    model = ProvenceModel(config).to(args.device, dtype).eval()
    n = min(args.profile, len(items))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    for path in paths:
        comp = compressor(model, tok, args, path, 0)
        try:
            for it in warm + items[n:]:  # warm-up, untimed: kernels and graph captures out of the record
                comp.compress(*it)
        except Exception as e:  # as in the timed rows: the other paths still get their profile
            print(f"profile of path {path} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        sync()
        walls = []
        with profile(activities=activities) as prof:
            for it in items[:n]:
                t = time.perf_counter()
                with torch.profiler.record_function("bench.question"):
                    comp.compress(*it)
                    sync()
                walls.append(time.perf_counter() - t)
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.trace) / f"prune_gpu_{path}.json"))
        events = prof.key_averages()
        rows = [{"range": e.key, "calls_per_q": round(e.count / n, 2),
                 "cpu_ms_per_q": round(e.cpu_time_total / n / 1e3, 3),
                 "gpu_ms_per_q": round(_device_us(e) / n / 1e3, 3)}
                for e in events if e.key.startswith(("provence.", "graphs."))]
        # Kernel and copy rows only: a CPU op's self GPU time counts the same kernels again.
        kernel_us = sum(_device_us(e, self_only=True) for e in events
                        if getattr(e, "device_type", None) == DeviceType.CUDA)
        rows.append({"range": "ALL GPU work (sum of kernels and copies)", "calls_per_q": None,
                     "cpu_ms_per_q": None, "gpu_ms_per_q": round(kernel_us / n / 1e3, 3)})
        rows.append({"range": "wall per question (under the profiler)", "calls_per_q": None,
                     "cpu_ms_per_q": round(statistics.median(walls) * 1e3, 3), "gpu_ms_per_q": None})
        label = str(dtype).split(".")[-1]
        print_table(rows, f"Profile of path {path} ({label}, {n} questions): per question")
        if on_gpu:
            print_table(_critical_path(prof.events()), f"Critical path of path {path} ({label}): "
                        "median over the profiled questions, ms from the question's start")
        sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=20, max_name_column_width=60))
        del comp
    del model


def _critical_path(events: Any) -> list[dict[str, Any]]:
    """When, within each profiled question, the CPU reached each named range and the GPU worked:
    the GPU's first and last work (copies included), its busy time, and what the CPU did before
    and after it (medians over the questions, ms from the question's start; CPU and GPU times
    share the profiler's clock)."""
    from torch.autograd import DeviceType

    questions = [e for e in events if e.name == "bench.question"]
    gpu = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    marks: dict[str, list[float]] = {}

    def mark(name: str, value: float) -> None:
        marks.setdefault(name, []).append(value / 1e3)

    for q in questions:
        start, end = q.time_range.start, q.time_range.end
        seen: set[str] = set()
        for e in sorted(events, key=lambda e: e.time_range.start):
            if (e.name.startswith(("provence.", "graphs.")) and e.name not in seen
                    and start <= e.time_range.start <= end):
                seen.add(e.name)  # a range's first occurrence in the question
                mark(f"{e.name} starts", e.time_range.start - start)
                mark(f"{e.name} ends", e.time_range.end - start)
        work = sorted((e.time_range.start, e.time_range.end) for e in gpu
                      if start <= e.time_range.start <= end)
        if work:
            busy, reach = 0.0, work[0][0]
            for lo, hi in work:  # union of the intervals (copies may overlap kernels)
                busy += max(0.0, hi - max(lo, reach))
                reach = max(reach, hi)
            mark("GPU: first work starts", work[0][0] - start)
            mark("GPU: last work ends", reach - start)
            mark("GPU: busy (union of work)", busy)
        mark("end", end - start)
    busy = marks.pop("GPU: busy (union of work)", [])
    rows = sorted(({"event": k, "ms": round(statistics.median(v), 3)} for k, v in marks.items()),
                  key=lambda r: r["ms"])
    return rows + ([{"event": "GPU: busy (union of work)", "ms": round(statistics.median(busy), 3)}]
                   if busy else [])


def _device_us(event: Any, self_only: bool = False) -> float:
    """GPU microseconds of a profiler row (torch renamed cuda_* to device_* around 2.4)."""
    prefix = "self_" if self_only else ""
    for name in (f"{prefix}device_time_total", f"{prefix}cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0
