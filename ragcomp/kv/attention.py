"""Attention over reused KV without the copies eager HF code makes on every forward.

Two copies dominate the question's forward pass over a long cached context (profiled on the
H100 with a Llama-3-8B shape at 16k tokens, ~16 ms of a ~60 ms time to first token):

- `repeat_kv`: with a mask, transformers' SDPA path repeats each KV head for every query head of
  its group (4x the context's K and V, per layer), because CUDA's masked SDPA kernels have no
  grouped-query mode. `folded_sdpa` instead folds the query heads of one KV group into the
  sequence axis ([b, kv_heads, groups * q_len, dim]), so each KV head is read once by a plain
  masked SDPA call, and unfolds the output. Same arithmetic, no repeated KV.
- `DynamicLayer.update` concatenates the new tokens onto the cached ones, i.e. copies the whole
  context once more per layer and step. `GrowingLayer` writes them into spare room reserved at
  the end of the context's buffer and hands out views.

`folded_attention(model)` switches a model to `folded_sdpa` for the duration of a call (under
the engine's model lock), so other users of the same model object keep the stock path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from ragcomp._optional import require

NAME = "ragcomp_folded_sdpa"
_REGISTERED = threading.Lock()
_done = False


def folded_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                **kwargs: Any) -> tuple[Any, None]:
    """SDPA with query groups folded onto the sequence axis; returns [b, q_len, heads, dim]."""
    torch = require("torch", "models")
    if attention_mask is None or attention_mask.dim() != 4:
        # No mask: transformers only skips it where SDPA's own `is_causal` is right (one query
        # token, or no cached tokens), and the stock path then uses SDPA's grouped-query mode.
        sdpa = require("transformers.integrations.sdpa_attention", "models")
        return sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, is_causal=is_causal, **kwargs)
    b, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    # Head h of the query reads KV head h // groups (the order `repeat_kv` makes).
    q = query.reshape(b, kv_heads, groups * q_len, dim)
    # Row (g, i) of the folded query gets row i of the mask.
    mask = attention_mask[:, :, :, :kv_len]
    mb, mh, rows = mask.shape[0], mask.shape[1], mask.shape[2]
    mask = mask.unsqueeze(2).expand(mb, mh, groups, rows, kv_len).reshape(mb, mh, groups * rows, kv_len)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling)
    out = out.reshape(b, q_heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `folded_sdpa` (and SDPA's mask builder under the same name) with transformers."""
    global _done
    with _REGISTERED:
        if not _done:
            transformers = require("transformers", "models")
            masking = require("transformers.masking_utils", "models")
            transformers.AttentionInterface.register(NAME, folded_sdpa)
            masking.ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, masking.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
            _done = True
    return NAME


@contextlib.contextmanager
def folded_attention(model: Any, enabled: bool = True) -> Iterator[None]:
    """Run `model` with `folded_sdpa` inside the block when it uses SDPA (call under its lock)."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before != "sdpa":
        yield
        return
    config._attn_implementation = register()
    try:
        yield
    finally:
        config._attn_implementation = before


def growing_layer_class() -> type:
    """`GrowingLayer`, defined on first use so that importing this module needs no transformers."""
    global _GrowingLayer
    if _GrowingLayer is None:
        cache_utils = require("transformers.cache_utils", "models")

        class GrowingLayer(cache_utils.DynamicLayer):
            """A cache layer over a [batch, heads, capacity, dim] buffer holding `length` tokens:
            `update` writes new tokens into the spare room and returns views, no concatenation.
            Past the capacity it falls back to the stock concatenation."""

            def __init__(self, keys: Any, values: Any, length: int) -> None:
                super().__init__()
                self._kbuf, self._vbuf, self._len = keys, values, length
                self.dtype, self.device = keys.dtype, keys.device
                self.keys, self.values = keys[:, :, :length], values[:, :, :length]
                self.is_initialized = True

            def update(self, key_states: Any, value_states: Any, *args: Any,
                       **kwargs: Any) -> tuple[Any, Any]:
                n = key_states.shape[-2]
                if self._kbuf is None or self.keys is None or self._len + n > self._kbuf.shape[-2] \
                        or self.keys.data_ptr() != self._kbuf.data_ptr():  # reset or replaced
                    self._kbuf = self._vbuf = None
                    return super().update(key_states, value_states, *args, **kwargs)
                end = self._len + n
                self._kbuf[:, :, self._len:end].copy_(key_states)
                self._vbuf[:, :, self._len:end].copy_(value_states)
                self._len = end
                self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
                return self.keys, self.values

            def crop(self, tokens_to_remove: int) -> None:
                super().crop(tokens_to_remove)
                if self._kbuf is not None:
                    self._len = self.keys.shape[-2]

        _GrowingLayer = GrowingLayer
    return _GrowingLayer


_GrowingLayer: type | None = None
