"""Leaf helpers of the KV layer, shared by the engine and the steps built on it (streamed assembly,
repair, page scoring): keys rotated into place, ending a forward pass early, and `Assembled`, the
context KV laid out for one prompt. Imports nothing from `ragcomp.kv`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def rotate_into(torch: Any, k: Any, cos: Any, sin: Any, out: Any) -> None:
    """out = k rotated in the half-split layout: [x1 c - x2 s, x2 c + x1 s].

    Math in float32 (bf16/fp16 inputs are widened exactly inside each op, fp32 `cos`/`sin`
    promote them), one rounding when the result is stored in `out`'s dtype.
    """
    h = k.shape[-1] // 2
    k1, k2 = k[..., :h], k[..., h:]
    torch.addcmul(k1 * cos, k2, sin, value=-1.0, out=out[..., :h])
    torch.addcmul(k2 * cos, k1, sin, out=out[..., h:])


class StopForward(Exception):
    """Raised from a forward hook to end a forward pass early (after the layers we need)."""


def stop_forward(*_: Any) -> None:
    """A forward hook that ends the forward pass (catch `StopForward` around it)."""
    raise StopForward


@dataclass
class Assembled:
    """Context KV laid out for one prompt: buffers [layers, heads, tokens, dim] and token ids."""

    keys: Any
    values: Any
    ids: list[int]
    spans: list[tuple[int, int]]  # (start, end) of each chunk; the prefix is spans[0]
