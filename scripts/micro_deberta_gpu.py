"""Micro-benchmarks behind the Provence GPU figures (CUDA + Triton needed): SDPA backends with a
materialised [B, H, L, L] bias, the GEMMs of one DeBERTa-v3-large layer by row count (what
packing the padding away would leave) and with query/key/value fused, and the FFN's GELU in the
GEMM's epilogue. Prints one line per shape.

    python scripts/micro_deberta_gpu.py
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

DTYPE = torch.bfloat16


def microseconds(fn: object) -> float:
    return do_bench(fn) * 1e3  # do_bench flushes L2 between runs and reports milliseconds


def attention(batch: int, length: int) -> dict[str, float | str]:
    shape = (batch, length, 16, 64)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=DTYPE).transpose(1, 2) for _ in range(3))
    bias = torch.randn(batch, 16, length, length, device="cuda", dtype=DTYPE)
    row: dict[str, float | str] = {}
    backends = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("math", SDPBackend.MATH))
    for name, backend in backends:
        try:
            with sdpa_kernel([backend]):
                call = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=bias)
                row[name] = round(microseconds(call), 1)
        except RuntimeError as e:  # a backend that does not take this input
            row[name] = f"fails: {type(e).__name__}"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        row["flash, no bias"] = round(microseconds(partial(F.scaled_dot_product_attention, q, k, v)), 1)
    return row


def linears(rows: int) -> str:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=DTYPE)

    x, wide = randn(rows, 1024), randn(rows, 4096)
    square = microseconds(partial(F.linear, x, randn(1024, 1024), randn(1024)))
    up = microseconds(partial(F.linear, x, randn(4096, 1024), randn(4096)))
    down = microseconds(partial(F.linear, wide, randn(1024, 4096), randn(1024)))
    qkv = microseconds(partial(F.linear, x, randn(3072, 1024), randn(3072)))
    layer = 4 * square + up + down
    tflops = rows * 2 * 12 * 1024 * 1024 / layer / 1e6
    return (f"rows {rows}: 1024x1024 {square:.1f} us, 1024->4096 {up:.1f}, 4096->1024 {down:.1f}, "
            f"q/k/v fused {qkv:.1f} (three: {3 * square:.1f}); per layer {layer:.1f} us "
            f"({24 * layer / 1e3:.2f} ms for 24 layers, {tflops:.0f} TFLOP/s)")


def gelu_epilogue(rows: int) -> str:
    """The FFN's first half: linear then exact GELU (two kernels) against cuBLASLt's bias + GELU
    epilogue (`_addmm_activation`, tanh GELU, one kernel)."""
    x = torch.randn(rows, 1024, device="cuda", dtype=DTYPE)
    w, b = torch.randn(4096, 1024, device="cuda", dtype=DTYPE), torch.randn(4096, device="cuda", dtype=DTYPE)
    two = microseconds(lambda: F.gelu(F.linear(x, w, b)))
    one = microseconds(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    diff = (F.gelu(F.linear(x, w, b)) - torch._addmm_activation(b, x, w.t(), use_gelu=True)).abs().max()
    return f"rows {rows}: linear + gelu {two:.1f} us, GELU epilogue {one:.1f} us (max diff {diff:.3g})"


def main() -> None:
    torch.manual_seed(0)
    for batch, length in ((20, 224), (20, 256), (10, 256)):
        print(f"SDPA us, batch {batch} x {length} tokens, 16 heads of 64:", attention(batch, length))
    for rows in (2048, 2560, 3584, 4096, 4224, 4480, 4608, 5120):
        print(linears(rows))
    for rows in (4224, 5120):
        print(gelu_epilogue(rows))


if __name__ == "__main__":
    main()
