"""DeBERTa's disentangled attention through FlexAttention: the relative-position terms are added to
each score inside the attention kernel, so the [batch, heads, length, length] bias of the SDPA path
is never written (nor its transposed p2c read). Used by `FastDebertaV2Encoder(attention="flex")`.

For query i and key j (n = length - 1), with the per-distance scores of `deberta_fast`
(`_position_scores`, already divided by the scale, [heads, batch, length, width]):

    score = q.k / scale + c2p[h, b, i, n - i + j] + p2c[h, b, j, n + i - j] + key_bias[b, j]

the same columns that `deberta_fast._skew`'s strided views read. FlexAttention runs compiled
(torch.compile; Triton on CUDA, inductor's C++ backend on CPU), once per shape (dynamic=False):
callers bucket their shapes (the CUDA-graph runner rounds width to 16 and batch to 2) and, for CUDA
graphs, run it once before capture (GraphedForward's warm-up does). The first call per shape
compiles (seconds to a minute).

On CPU, heads smaller than 24 run eager (unfused) FlexAttention instead, with one warning: torch
2.13's compiled C++ flex kernel returned wrong values or NaN, from call to call, for head sizes 8 and
16 at lengths that are not a multiple of 64 (16 of 112 calls on an AVX2 AMD EPYC; none of 168 at
head sizes 24, 32 and 64). Real checkpoints have heads of 64; the tiny test models have 8.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from ragcomp._optional import require

torch = require("torch", "models")

_RECOMPILE_LIMIT = 64  # one compiled kernel per (batch, width) bucket; dynamo's default stops at 8
_compiled: Any = None
_compiled_layer: Any = None
_lock = threading.Lock()


def _compile_static(fn: Any, fullgraph: bool = False) -> Any:
    """`fn` compiled with static shapes (a kernel per shape), with room for one per bucket."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False, fullgraph=fullgraph)


def compiled_flex_attention() -> Any:
    """`flex_attention` compiled once per process (shapes static: a kernel per shape)."""
    global _compiled
    with _lock:
        if _compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            _compiled = _compile_static(flex_attention)
    return _compiled


def compiled_layer(layer_forward: Any) -> Any:
    """`deberta_fast._layer_forward` compiled once per process, whole (fullgraph): every layer of a
    model shares the compiled code (parameters are its inputs), one compilation per shape."""
    global _compiled_layer
    with _lock:
        if _compiled_layer is None:
            _compiled_layer = _compile_static(layer_forward, fullgraph=True)
    return _compiled_layer


_MIN_CUDA_HEAD_SIZE = 16
_MIN_CPU_COMPILED_HEAD_SIZE = 24  # smaller ones: wrong results from the compiled CPU kernel (above)
_warned_small_cpu_heads = False


def relative_flex_attention(q: Any, k: Any, v: Any, c2p: Any, p2c: Any, key_bias: Any,
                            scale: float) -> Any:
    """Attention output [batch, heads, length, head_dim] of q, k, v [batch, heads, length, head_dim]
    with DeBERTa's relative terms: `c2p`, `p2c` (either may be None) per-distance scores [heads, batch,
    length, width >= 2 * length - 1], divided by `scale` already; `key_bias` [batch, length] additive
    key padding."""
    if q.is_cuda and q.shape[-1] < _MIN_CUDA_HEAD_SIZE:  # Triton's flex kernel refuses smaller heads
        raise ValueError(f"FlexAttention on CUDA needs a head size of at least {_MIN_CUDA_HEAD_SIZE}, "
                         f"this model has {q.shape[-1]}; use attention='sdpa'")
    n = q.shape[-2] - 1

    def score_mod(score: Any, b: Any, h: Any, i: Any, j: Any) -> Any:
        score = score + key_bias[b, j]
        if c2p is not None:
            score = score + c2p[h, b, i, n - i + j]
        if p2c is not None:
            score = score + p2c[h, b, j, n + i - j]
        return score

    if not q.is_cuda and q.shape[-1] < _MIN_CPU_COMPILED_HEAD_SIZE:
        return _eager_flex_attention(q, k, v, score_mod, scale)
    return compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=1.0 / scale)


def _eager_flex_attention(q: Any, k: Any, v: Any, score_mod: Any, scale: float) -> Any:
    """Unfused FlexAttention (it materialises the scores): correct where the compiled CPU kernel is not."""
    global _warned_small_cpu_heads
    from torch.nn.attention.flex_attention import flex_attention

    if not _warned_small_cpu_heads:
        _warned_small_cpu_heads = True
        warnings.warn(f"FlexAttention on CPU with a head size of {q.shape[-1]} (below "
                      f"{_MIN_CPU_COMPILED_HEAD_SIZE}) runs unfused: torch's compiled CPU kernel gives "
                      "wrong results for such heads", RuntimeWarning, stacklevel=3)
    with warnings.catch_warnings():  # "flex_attention called without torch.compile": intended here
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, score_mod=score_mod, scale=1.0 / scale)
