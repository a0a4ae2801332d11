"""Streamed assembly on a GPU: chunk KV copied layer group by layer group under the question's
forward pass (`prefill_streamed`, also `KVEngine.prefill_streamed`). A copy stream moves each
group's slices of every chunk into one staging buffer, a compute stream gathers them into token
order, rotates the keys and fills the cache's layers, and a forward pre-hook on the group's first
layer makes the question wait just for its own group. The stream helpers and the staging,
gathering and rotating steps live here; `EngineCore` keeps the model-side primitives they use
(buffers, caches, side streams, prefill).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ragcomp.kv.codec import ChunkKV
from ragcomp.kv.engine_core import EngineCore
from ragcomp.kv.ops import Assembled, rotate_into


def _waiter(event: Any) -> Callable[..., None]:
    def wait(*_: Any) -> None:
        # The layer's kernels go on the current stream; they start once its KV group is in place.
        event.wait()

    return wait


def _on(torch: Any, stream: Any) -> Any:
    """`torch.cuda.stream(stream)`, or nothing on a CPU."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(torch: Any, stream: Any) -> Any:
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def prefill_streamed(engine: EngineCore, prefix: ChunkKV, chunks: Sequence[ChunkKV], q_ids: Sequence[int],
                     groups: int = 8, timings: dict[str, float] | None = None, reserve: int | None = None
                     ) -> tuple[Assembled, Any, Any]:
    """Assemble and prefill the question in one go on `engine`: (assembled, cache, next-token
    logits). See `KVEngine.prefill_streamed`."""
    torch = engine.torch
    t_start = time.perf_counter()
    n_layers = engine.num_layers
    lens = [len(c) for c in chunks]
    plen, tc = len(prefix), sum(lens)
    total = plen + tc
    keys, values = engine.new_buffers(total, len(q_ids) if reserve is None else reserve)
    ids = list(prefix.ids)
    spans = [(0, plen)]
    pos = plen
    # Per context token: rotation delta, first token of its chunk, index within, chunk length.
    per_token = np.zeros((4, tc), dtype=np.float64)
    t = 0
    for c, n in zip(chunks, lens, strict=True):
        ids.extend(c.ids)
        spans.append((pos, pos + n))
        per_token[:, t : t + n] = [[pos - c.base], [t], [0], [n]]
        per_token[2, t : t + n] = np.arange(n)
        t += n
        pos += n
    asm = Assembled(keys, values, ids, spans)
    size = -(-n_layers // max(1, groups))
    bounds = [(a, min(a + size, n_layers)) for a in range(0, n_layers, size)]
    cuda = engine.device.type == "cuda"
    copy_s, comp_s = engine.side_streams() if cuda else (None, None)
    main = torch.cuda.current_stream(engine.device) if cuda else None
    events: list[Any] = []
    cache = engine.make_cache()
    quant = any(c.k_scale is not None for c in chunks)
    with torch.inference_mode():
        if cuda:
            copy_s.wait_stream(main)  # the buffers above were allocated on the main stream
            comp_s.wait_stream(main)
        rows: dict[int, Any] = {}
        cos = sin = None
        with _on(torch, comp_s):
            if tc:
                # One small pinned upload; a pageable one would block the host until the
                # stream reached it, stalling everything queued after it.
                host = torch.from_numpy(per_token)
                table = host.pin_memory().to(engine.device, non_blocking=True) if cuda else host
                ang = table[0][:, None] * engine.inv_freq.to(torch.float64)[None, :]
                cos, sin = ang.cos().float(), ang.sin().float()  # [tokens, dim / 2], as `rotation`
                start, local, length = table[1].long(), table[2].long(), table[3].long()
                heads = engine.kv_heads
                for a, b in bounds:
                    g = b - a
                    if g not in rows:
                        # Staging holds chunk after chunk, each [g, 2, heads, n, dim]: the
                        # row (of `dim` values) of key (layer l, head h, token t of chunk i)
                        # is 2*g*heads*start_i + (2*heads*l + h)*n_i + t; its value is
                        # heads*n_i rows further.
                        gl = torch.arange(g, device=engine.device)[:, None] * (2 * heads)
                        gh = (gl + torch.arange(heads, device=engine.device)[None, :]).reshape(-1, 1)
                        rk = (2 * g * heads * start + local + gh * length).reshape(-1)
                        rows[g] = (rk, rk + (heads * length).repeat(g * heads))
        # Each chunk's tensors cut into per-group flat views once (not once per group).
        src = [_group_views(c, bounds) for c in chunks]
        for gi, (a, b) in enumerate(bounds):
            g = b - a
            staged, copied = None, None
            if tc:
                with _on(torch, copy_s):
                    staged = _copy_group(engine, src, lens, gi, g, quant)
                    copied = _record(torch, copy_s)
            with _on(torch, comp_s):
                if copied is not None:
                    comp_s.wait_event(copied)
                keys[a:b, :, :plen].copy_(prefix.keys[a:b])
                values[a:b, :, :plen].copy_(prefix.values[a:b])
                if tc:
                    for t in staged:
                        if t is not None and cuda:
                            t.record_stream(comp_s)
                    _rotate_group(engine, staged, rows[g], g, tc, cos, sin,
                                       keys[a:b, :, plen:], values[a:b, :, plen:])
                for layer in range(a, b):
                    engine.adopt(cache, layer, keys[layer][None], values[layer][None], grow=True)
                    lay = cache.layers[layer]
                    if cuda and lay.keys.data_ptr() != keys[layer].data_ptr():
                        # adopt fell back to a copy made here: the main stream reads it next,
                        # so the allocator must not recycle it for side-stream work early.
                        lay.keys.record_stream(main)
                        lay.values.record_stream(main)
                if cuda:
                    events.append(_record(torch, comp_s))
    if timings is not None:
        timings["enqueue"] = time.perf_counter() - t_start
    # Hooks live on the shared model: hold its lock while they are attached.
    with engine.lock:
        hooks = [engine.decoder.layers[a].register_forward_pre_hook(_waiter(ev))
                 for (a, _), ev in zip(bounds, events, strict=False)]  # no events on a CPU
        try:
            logits = engine.prefill(cache, q_ids, total)
        finally:
            for h in hooks:
                h.remove()
    if timings is not None:
        timings["forward_enqueued"] = time.perf_counter() - t_start
    return asm, cache, logits


def _group_views(c: ChunkKV, bounds: list[tuple[int, int]]) -> list[Any]:
    """Per layer group, flat contiguous views of the chunk's [g, 2, heads, n, dim] data
    (and scales): one view each when the chunk is packed, else (keys, values) pairs."""
    out = []
    for buf, k, v in ((c.packed, c.keys, c.values), (c.packed_scale, c.k_scale, c.v_scale)):
        if buf is not None:
            per_layer = buf[0].numel()
            out.append(list(buf.view(-1).split([(b - a) * per_layer for a, b in bounds])))
        elif k is not None:
            out.append([(k[a:b], v[a:b]) for a, b in bounds])
        else:
            out.append([None] * len(bounds))
    return out


def _copy_group(engine: EngineCore, src: list[list[Any]], lens: list[int], gi: int, g: int,
                quant: bool) -> list[Any]:
    """Staging of one layer group: chunk after chunk, each [g, 2, heads, n_i, dim]."""
    torch = engine.torch
    heads, dim, tc = engine.kv_heads, engine.head_dim, sum(lens)
    out = []
    for j, width in enumerate((dim, 1)):
        if j == 1 and not quant:
            out.append(None)
            continue
        first = src[0][j][gi]
        dtype = (first if not isinstance(first, tuple) else first[0]).dtype
        stage = torch.empty(2 * g * heads * tc * width, dtype=dtype, device=engine.device)
        parts = stage.split([2 * g * heads * n * width for n in lens])
        for part, views, n in zip(parts, src, lens, strict=True):
            view = views[j][gi]
            if isinstance(view, tuple):  # not packed: keys and values separately
                block = part.view(g, 2, heads, n, width)
                block[:, 0].copy_(view[0], non_blocking=True)
                block[:, 1].copy_(view[1], non_blocking=True)
            else:
                if view.dtype != dtype:
                    raise ValueError("chunks of one prompt must share a storage dtype")
                part.copy_(view, non_blocking=True)
        out.append(stage)
    return out


def _rotate_group(engine: EngineCore, staged: list[Any], rows: tuple[Any, Any], g: int, tc: int,
                  cos: Any, sin: Any, k_out: Any, v_out: Any) -> None:
    torch = engine.torch
    heads, dim = engine.kv_heads, engine.head_dim
    stage, stage_s = staged
    rk, rv = rows
    flat = stage.view(-1, dim)
    k = flat.index_select(0, rk).view(g, heads, tc, dim)
    v = flat.index_select(0, rv).view(g, heads, tc, dim)
    if stage_s is not None:
        k = k.to(torch.float32) * stage_s.index_select(0, rk).view(g, heads, tc, 1)
        v = v.to(torch.float32) * stage_s.index_select(0, rv).view(g, heads, tc, 1)
    # The same arithmetic as `place`, so both paths give identical bits.
    rotate_into(torch, k, cos, sin, k_out)
    v_out.copy_(v)
