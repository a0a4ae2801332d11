"""Replay an encoder forward as CUDA graphs: one graph per bucketed (batch, width) shape.

An encoder forward of a few hundred small kernels is bound by Python and kernel launches, not by
the GPU; a graph replays all of them in one launch. Inputs are `[batch, width]` integer tensors
(ids, mask, types); they are padded up to the bucket (width to a multiple of `width_multiple` with
each input's pad value, batch to a multiple of `batch_multiple` by repeating the first row, so no
row is ever fully masked), copied into the graph's static buffers, and the outputs are sliced back.

Memory: every graph of one runner shares one memory pool, so activations cost about one forward at
the largest shape captured (e.g. DeBERTa-v3-large, batch 32 x 512 tokens, bf16: about 1-2 GB),
plus the static inputs and outputs of each graph (small). Capture runs once per new shape (two
warm-up forwards on a side stream, then one captured forward). Copy-in, replay and a device copy
of the outputs run under one lock, so the tensors returned are the caller's own and threads that
share a runner cannot overwrite each other's buffers.

Off CUDA, or when `enabled` is False, or after a capture failed (a warning says why), the same
call runs the function eagerly on the unpadded inputs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ragcomp._optional import require


def profile_range(name: str) -> Any:
    """A `torch.profiler` range called `name` while a profiler records (the benchmark's --profile);
    a no-op otherwise (a quarter of a microsecond: cheap enough to leave in the hot path)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def bucket_shape(batch: int, width: int, batch_multiple: int, width_multiple: int,
                 max_batch: int | None = None) -> tuple[int, int]:
    """The static (batch, width) a call of this shape replays: rounded up, batch capped at max_batch
    (but never below the batch itself)."""
    padded_batch = round_up(batch, batch_multiple)
    if max_batch is not None:
        padded_batch = max(batch, min(padded_batch, max_batch))
    return padded_batch, round_up(width, width_multiple)


def pad_inputs(inputs: Sequence[Any], pad_values: Sequence[int], shape: tuple[int, int]) -> list[Any]:
    """Each `[batch, width]` input padded to `shape`: extra columns get its pad value, extra rows
    repeat the first row (a valid input, so no row is all padding)."""
    out = []
    for x, pad in zip(inputs, pad_values, strict=True):
        full = x.new_empty(shape)
        _pad_into(full, x, pad)
        out.append(full)
    return out


def _pad_into(full: Any, x: Any, pad: int) -> None:
    """`x` [batch, width] into the top-left of `full` (both torch tensors or both numpy arrays):
    pad value to the right, the first row repeated below."""
    batch, width = x.shape
    full[:, width:] = pad
    full[:batch, :width] = x
    full[batch:, :width] = x[:1]


@dataclass
class _Graph:
    graph: Any
    inputs: Any  # [n_inputs, batch, width] on the device; the captured forward reads its rows
    outputs: tuple[Any, ...]
    staging: Any = None  # pinned host twin of `inputs`, reused (allocating pinned memory costs ~1 ms)
    uploaded: Any = None  # event after the last upload from `staging`: wait before refilling it


class GraphedForward:
    """`runner(*inputs) -> outputs` of `fn(*inputs)`, replayed from CUDA graphs where possible.

    `fn` takes `[batch, width]` integer tensors on `device` and returns a tuple of tensors whose first
    dimension is the batch; a dimension 1 equal to the width is sliced back too (per-token outputs).
    """

    def __init__(self, fn: Callable[..., tuple[Any, ...]], pad_values: Sequence[int], device: Any,
                 enabled: bool = True, width_multiple: int = 32, batch_multiple: int = 4,
                 max_batch: int | None = None) -> None:
        torch = require("torch", "models")  # lazily: Provence's compressor imports this module without torch
        self._torch = torch
        self.fn = fn
        self.pad_values = list(pad_values)
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self.width_multiple = width_multiple
        self.batch_multiple = batch_multiple
        self.max_batch = max_batch
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self._lock = threading.Lock()

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        batch, width = inputs[0].shape
        if not self.enabled:
            return self.fn(*(x.to(self.device, non_blocking=True) for x in inputs))
        if len({x.dtype for x in inputs}) != 1 or len({tuple(x.shape) for x in inputs}) != 1:
            raise ValueError("graphed inputs must share one dtype and one [batch, width] shape, got "
                             f"{[(tuple(x.shape), str(x.dtype)) for x in inputs]}")
        shape = bucket_shape(batch, width, self.batch_multiple, self.width_multiple, self.max_batch)
        with self._lock:
            graph = self.graphs.get(shape)
            if graph is None:
                graph = self._capture(self._torch.stack(pad_inputs(inputs, self.pad_values, shape)))
                if graph is not None:
                    self.graphs[shape] = graph
        if graph is None:
            return self.fn(*(x.to(self.device, non_blocking=True) for x in inputs))
        with self._lock:
            if all(x.device.type == "cpu" for x in inputs):
                self._upload(graph, inputs)
            else:  # already on a device: pad straight into the graph's inputs
                for row, x, pad in zip(graph.inputs, inputs, self.pad_values, strict=True):
                    _pad_into(row, x, pad)
            with profile_range("graphs.replay"):
                graph.graph.replay()
            with profile_range("graphs.copy_out"):
                # Outputs live in the shared pool and the next replay overwrites them: copy them out.
                return tuple(_unpad(y, batch, width, shape[1]).clone() for y in graph.outputs)

    def _upload(self, graph: _Graph, inputs: Sequence[Any]) -> None:
        """Host inputs padded into the graph's pinned staging buffer (through numpy: ~1 us per
        slice, torch ~20), then one asynchronous upload into its static inputs."""
        torch = self._torch
        with profile_range("graphs.pad"):
            if graph.staging is None:
                graph.staging = torch.empty(graph.inputs.shape, dtype=graph.inputs.dtype, pin_memory=True)
                graph.uploaded = torch.cuda.Event()
            else:
                graph.uploaded.synchronize()  # the previous upload has read the buffer
            for row, x, pad in zip(graph.staging.numpy(), inputs, self.pad_values, strict=True):
                _pad_into(row, x.numpy(), pad)
        with profile_range("graphs.copy_in"):
            graph.inputs.copy_(graph.staging, non_blocking=True)  # pinned: asynchronous
            graph.uploaded.record()

    def _capture(self, staged: Any) -> _Graph | None:
        torch = self._torch
        try:
            static_all = staged.to(self.device)
            static = list(static_all.unbind(0))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: lazy caches, cuBLAS workspaces, kernel choice
                for _ in range(2):
                    self.fn(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: work that other threads launch meanwhile does not break this capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = self.fn(*static)
            return _Graph(graph, static_all, tuple(outputs))
        except Exception as e:  # e.g. a host sync inside fn: eager from now on
            self.enabled = False
            warnings.warn(f"CUDA graph capture failed, running eagerly ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=3)
            return None


def to_host(t: Any) -> Any:
    """`t` on the CPU; from CUDA, an asynchronous copy into pinned memory (read it after a sync)."""
    if t.device.type == "cpu":
        return t
    host = t.new_empty(t.shape, device="cpu", pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _unpad(y: Any, batch: int, width: int, padded_width: int) -> Any:
    y = y[:batch]
    if y.dim() >= 2 and y.shape[1] == padded_width:
        y = y[:, :width]
    return y
