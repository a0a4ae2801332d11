"""DeBERTa's disentangled attention as one Triton kernel: q.k, both relative terms, the key padding,
an online softmax and the product with v, per tile, with nothing of [batch, heads, length, length]
ever written. Used by `FastDebertaV2Encoder(attention="triton")`.

For query i and key j (n = length - 1), with the per-distance scores of `deberta_fast`
(`_position_scores`, already divided by the scale, [heads, batch, length, width]):

    score = q.k / scale + c2p[h, b, i, n - i + j] + p2c[h, b, j, n + i - j] + key_bias[b, j]

the same columns that `deberta_fast._skew` reads. Each tile reads its c2p terms as rows shifted by
one column per query and its p2c terms as rows shifted by one column per key: both are contiguous
runs, so the reads coalesce, and every score term is read once (the SDPA path writes the bias, then
reads it again, and the add before it reads the p2c term against its layout).

The output is written as [batch, length, heads * head_dim], the layout the output projection reads,
so no transpose copy follows. Softmax and accumulation are fp32; inputs stay in the model dtype.
Inference only (no backward). Needs Triton; on CPU it runs under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

from typing import Any

from ragcomp._optional import require

torch = require("torch", "models")

try:  # Triton ships with torch's CUDA wheels, not with the CPU wheel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

# A padding key's score: finite, so a row whose keys are all padding stays finite (HF: finfo.min).
MASKED_SCORE = -1.0e30


def available() -> bool:
    return triton is not None


def unavailable_reason(device: Any) -> str | None:
    """Why the kernel cannot run on `device` here (None: it can)."""
    import os

    if triton is None:
        return "Triton is not installed (it ships with torch's CUDA wheels)"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1, for tests)"
    return None


if triton is not None:

    @triton.jit
    def _relative_attention_kernel(
        q_ptr, k_ptr, v_ptr, c2p_ptr, p2c_ptr, mask_ptr, out_ptr,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_ob, stride_ol, stride_oh,
        stride_ch, stride_cb, stride_cl,
        stride_ph, stride_pb, stride_pl,
        stride_mb,
        heads, length, head_dim, inv_scale, length_bucket,
        HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        block_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < length
        dim_ok = dims < head_dim
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        last = length - 1
        # Row i of c2p starts its run of key columns at n - i; row j of p2c at n - j (+ i).
        c2p_rows = c2p_ptr + h * stride_ch + b * stride_cb + rows[:, None] * (stride_cl - 1) + last
        p2c_base = p2c_ptr + h * stride_ph + b * stride_pb + last + rows[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, length, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < length
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * inv_scale
            tile_ok = row_ok[:, None] & col_ok[None, :]
            if HAS_C2P:
                s += tl.load(c2p_rows + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            if HAS_P2C:  # loaded as [keys, queries], the contiguous way, then transposed
                p2c_t = tl.load(p2c_base + cols[:, None] * (stride_pl - 1), mask=tl.trans(tile_ok), other=0.0)
                s += tl.trans(p2c_t).to(tl.float32)
            key_ok = tl.load(mask_ptr + b * stride_mb + cols, mask=col_ok, other=0) != 0
            s = tl.where(key_ok[None, :], s, MASKED)
            s = tl.where(col_ok[None, :], s, float("-inf"))  # past the end: no weight at all
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + cols[:, None] * stride_vl + dims[None, :],
                        mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


    @triton.jit
    def _relative_attention_positions_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pq_ptr, mask_ptr, out_ptr,
        stride_qb, stride_ql, stride_kb, stride_kl, stride_vb, stride_vl, stride_ob, stride_ol,
        stride_pk, stride_pq, stride_mb,
        heads, length, width, head_dim, inv_scale, length_bucket,
        HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BAND: tl.constexpr,
    ):
        """As `_relative_attention_kernel`, computing the position terms itself: per tile, the
        queries against the BLOCK_M + BLOCK_N - 1 position keys its c2p terms use (one tensor-core
        product), and the keys against the position queries of its p2c terms; each term then picks
        its diagonal band (`tl.gather`). Nothing per distance is written to memory."""
        block_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        i0 = block_m * BLOCK_M
        rows = i0 + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        band = tl.arange(0, BAND)
        row_ok = rows < length
        dim_ok = dims < head_dim
        hd = h * head_dim
        q = tl.load(q_ptr + b * stride_qb + hd + rows[:, None] * stride_ql + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        last = length - 1
        r_idx = tl.arange(0, BLOCK_M)
        c_idx = tl.arange(0, BLOCK_N)
        # Tile (i0 + r, j0 + c): c2p reads position key n - i + j = first + (BLOCK_M - 1 - r + c);
        # p2c reads position query n + i - j = first + (BLOCK_N - 1 + r - c).
        c2p_pick = (BLOCK_M - 1) - r_idx[:, None] + c_idx[None, :]  # [M, N] into the band
        p2c_pick = (BLOCK_N - 1) + r_idx[None, :] - c_idx[:, None]  # [N, M] into the band
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for j0 in range(0, length, BLOCK_N):
            cols = j0 + c_idx
            col_ok = cols < length
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + b * stride_kb + hd + cols[:, None] * stride_kl + dims[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * inv_scale
            if HAS_C2P:
                pos = last - i0 - (BLOCK_M - 1) + j0 + band
                pos_ok = (pos >= 0) & (pos < width)
                pk = tl.load(pk_ptr + hd + pos[:, None] * stride_pk + dims[None, :],
                             mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
                scores = tl.dot(q, tl.trans(pk), input_precision=PRECISION)  # [M, BAND]
                s += tl.gather(scores, c2p_pick, 1)
            if HAS_P2C:
                pos = last + i0 - j0 - (BLOCK_N - 1) + band
                pos_ok = (pos >= 0) & (pos < width)
                pq = tl.load(pq_ptr + hd + pos[:, None] * stride_pq + dims[None, :],
                             mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
                scores = tl.dot(k, tl.trans(pq), input_precision=PRECISION)  # [N, BAND]
                s += tl.trans(tl.gather(scores, p2c_pick, 1))
            key_ok = tl.load(mask_ptr + b * stride_mb + cols, mask=col_ok, other=0) != 0
            s = tl.where(key_ok[None, :], s, MASKED)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * stride_vb + hd + cols[:, None] * stride_vl + dims[None, :],
                        mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + hd + rows[:, None] * stride_ol + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) that the autotuner tries once per (length bucket,
# head size), in the first call of that shape (for CUDA graphs: the warm-up before capture).
CONFIGS = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2), (64, 32, 4, 2),
           (128, 32, 4, 3), (32, 64, 4, 2))
INTERPRETER_CONFIG = (32, 32, 4, 1)  # small tiles: the interpreter's cost grows with tile size
# The in-kernel position terms hold a [BLOCK_M, BLOCK_M + BLOCK_N] product per term: smaller tiles.
POSITION_CONFIGS = ((64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2),
                    (64, 64, 4, 3))
_tuned: dict[str, Any] = {}


def _autotuned(name: str, kernel: Any, configs: tuple[tuple[int, int, int, int], ...],
               with_band: bool) -> Any:
    """`kernel` under Triton's autotuner (built once); `with_band`: each config also sets BAND."""
    if name not in _tuned:
        options = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **({"BAND": _band(m, n)} if with_band else {})},
                                 num_warps=w, num_stages=st) for m, n, w, st in configs]
        _tuned[name] = triton.autotune(options, key=["length_bucket", "BLOCK_D"])(kernel)
    return _tuned[name]


def relative_attention(q_rows: Any, k_rows: Any, v_rows: Any, c2p: Any, p2c: Any, key_mask: Any,
                       heads: int, scale: float, config: tuple[int, int, int, int] | None = None) -> Any:
    """Context [batch, length, heads * head_dim] of the projections `q_rows`, `k_rows`, `v_rows`
    [batch, length, heads * head_dim] (any row stride, unit column stride) with DeBERTa's relative
    terms `c2p`, `p2c` (either may be None; [heads, batch, length, width >= 2 * length - 1], divided
    by `scale` already, unit column stride) and `key_mask` [batch, length] (non-zero: a real key)."""
    reason = unavailable_reason(q_rows.device)
    if reason is not None:
        raise RuntimeError(reason)
    batch, length, hidden = q_rows.shape
    head_dim = hidden // heads
    for name, t in (("q", q_rows), ("k", k_rows), ("v", v_rows), ("c2p", c2p), ("p2c", p2c)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit column stride, got strides {tuple(t.stride())}")
    for name, t in (("c2p", c2p), ("p2c", p2c)):
        if t is not None and (t.shape[:3] != (heads, batch, length) or t.shape[3] < 2 * length - 1):
            raise ValueError(f"{name} scores of shape {tuple(t.shape)}; expected [{heads}, {batch}, "
                             f"{length}, >= {2 * length - 1}]")
    out = q_rows.new_empty(batch, length, hidden)
    mask = key_mask if key_mask.dtype != torch.bool else key_mask.to(torch.int32)
    dummy = q_rows.new_empty(1, 1, 1, 1)
    c2p_t, p2c_t = (c2p if c2p is not None else dummy), (p2c if p2c is not None else dummy)
    args = (
        q_rows, k_rows, v_rows, c2p_t, p2c_t, mask, out,
        q_rows.stride(0), q_rows.stride(1), head_dim,
        k_rows.stride(0), k_rows.stride(1), head_dim,
        v_rows.stride(0), v_rows.stride(1), head_dim,
        out.stride(0), out.stride(1), head_dim,
        c2p_t.stride(0), c2p_t.stride(1), c2p_t.stride(2),
        p2c_t.stride(0), p2c_t.stride(1), p2c_t.stride(2),
        mask.stride(0),
        heads, length, head_dim, 1.0 / scale, -(-length // 64) * 64,
    )
    flags = dict(HAS_C2P=c2p is not None, HAS_P2C=p2c is not None,
                 # fp32 (the tests): exact products, not TF32
                 PRECISION="ieee" if q_rows.dtype == torch.float32 else "tf32",
                 BLOCK_D=max(16, triton.next_power_of_2(head_dim)), MASKED=MASKED_SCORE)
    if config is None and not q_rows.is_cuda:  # the interpreter: nothing to tune
        config = INTERPRETER_CONFIG
    if config is None:
        tuned = _autotuned("scores", _relative_attention_kernel, CONFIGS, with_band=False)
        tuned[lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)](*args, **flags)
    else:
        block_m, block_n, warps, stages = config
        _relative_attention_kernel[(triton.cdiv(length, block_m), batch * heads)](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out


def relative_attention_positions(q_rows: Any, k_rows: Any, v_rows: Any, pos_keys: Any, pos_queries: Any,
                                 key_mask: Any, heads: int, scale: float,
                                 config: tuple[int, int, int, int] | None = None) -> Any:
    """As `relative_attention`, from the position rows instead of per-distance scores: `pos_keys`
    [width, heads * head_dim] (row c: the c2p position key of distance n - c, divided by the scale;
    None: no c2p) and `pos_queries` (row c: the p2c position query of distance c - n; None: no p2c),
    width >= 2 * length - 1. The kernel computes each tile's position terms itself."""
    reason = unavailable_reason(q_rows.device)
    if reason is not None:
        raise RuntimeError(reason)
    batch, length, hidden = q_rows.shape
    head_dim = hidden // heads
    rows = [t for t in (pos_keys, pos_queries) if t is not None]
    width = rows[0].shape[0] if rows else 2 * length - 1
    for name, t in (("q", q_rows), ("k", k_rows), ("v", v_rows), ("pos_keys", pos_keys),
                    ("pos_queries", pos_queries)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit column stride, got strides {tuple(t.stride())}")
    for name, t in (("pos_keys", pos_keys), ("pos_queries", pos_queries)):
        if t is not None and (t.shape[0] != width or width < 2 * length - 1 or t.shape[1] != hidden):
            raise ValueError(f"{name} of shape {tuple(t.shape)}; expected [>= {2 * length - 1}, {hidden}]")
    out = q_rows.new_empty(batch, length, hidden)
    mask = key_mask if key_mask.dtype != torch.bool else key_mask.to(torch.int32)
    dummy = q_rows.new_empty(1, 1)
    pk = pos_keys if pos_keys is not None else dummy
    pq = pos_queries if pos_queries is not None else dummy
    args = (q_rows, k_rows, v_rows, pk, pq, mask, out,
            q_rows.stride(0), q_rows.stride(1), k_rows.stride(0), k_rows.stride(1),
            v_rows.stride(0), v_rows.stride(1), out.stride(0), out.stride(1),
            pk.stride(0), pq.stride(0), mask.stride(0),
            heads, length, width, head_dim, 1.0 / scale, -(-length // 64) * 64)
    flags = dict(HAS_C2P=pos_keys is not None, HAS_P2C=pos_queries is not None,
                 PRECISION="ieee" if q_rows.dtype == torch.float32 else "tf32",
                 BLOCK_D=max(16, triton.next_power_of_2(head_dim)), MASKED=MASKED_SCORE)
    if config is None and not q_rows.is_cuda:
        config = INTERPRETER_CONFIG
    if config is None:
        tuned = _autotuned("positions", _relative_attention_positions_kernel, POSITION_CONFIGS,
                           with_band=True)

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)

        tuned[grid](*args, **flags)
    else:
        block_m, block_n, warps, stages = config
        _relative_attention_positions_kernel[(triton.cdiv(length, block_m), batch * heads)](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BAND=_band(block_m, block_n),
            num_warps=warps, num_stages=stages)
    return out


def _band(block_m: int, block_n: int) -> int:
    return triton.next_power_of_2(block_m + block_n - 1)
