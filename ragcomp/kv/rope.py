"""Moving cached keys to new positions: RoPE re-rotation, and the checks that it is exact.

Llama, Qwen2/2.5/3 and Mistral apply RoPE before keys enter the cache, so a cached key
carries its absolute position. Rotating a key encoded at position B by the angle
(P - B) * inv_freq gives exactly the key encoded at P, provided the frequencies do not
depend on the sequence length. Static scalings ('default', 'linear', 'llama3', 'yarn')
satisfy that; 'dynamic' NTK and 'longrope' pick their frequencies from the current
sequence length, so a key moved across that boundary would be wrong: those are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ragcomp._optional import require

# model_type values whose attention rotates the full head with the half-split
# (`rotate_half`) layout before caching keys.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
# Frequencies fixed per position: rotation by delta * inv_freq is exact. For yarn the
# attention factor is already inside the stored keys and must not be applied again.
MOVABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The model's position encoding cannot be moved exactly; its KV cannot be reused elsewhere."""


@dataclass(frozen=True)
class RopeSpec:
    """What re-rotation needs: the fp32 inverse frequencies and a description for fingerprints."""

    inv_freq: Any  # torch.Tensor [head_dim // 2], float32, on the model's device
    rope_type: str
    params: dict[str, Any]
    head_dim: int

    def describe(self) -> str:
        """Stable text of the RoPE settings (goes into the fingerprint)."""
        freqs = ",".join(f"{x:.9e}" for x in self.inv_freq.double().cpu().tolist())
        return json.dumps({"type": self.rope_type, "params": self.params, "inv_freq": freqs},
                          sort_keys=True, default=str)


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def rope_parameters(config: Any) -> dict[str, Any]:
    """The RoPE parameters across transformers versions (rope_parameters in v5, rope_scaling before)."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def check_movable(config: Any) -> None:
    """Raise UnsupportedModelError unless cached keys of this model can be moved exactly."""
    cfg = _text_config(config)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"KV reuse supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {mtype!r}, whose keys "
            "may use another RoPE layout (interleaved, partial or none)"
        )
    params = rope_parameters(cfg)
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer RoPE settings are not supported for KV reuse")
    rtype = params["rope_type"]
    if rtype not in MOVABLE_ROPE_TYPES:
        why = {
            "dynamic": "dynamic NTK scaling recomputes the frequencies from the sequence length",
            "longrope": "LongRoPE switches frequency sets when the sequence passes its original length",
        }.get(rtype, "its frequencies are not known to be fixed per position")
        raise UnsupportedModelError(
            f"RoPE type {rtype!r} cannot be moved exactly ({why}); cached chunk keys would land at "
            f"wrong angles. Movable types: {', '.join(MOVABLE_ROPE_TYPES)}"
        )
    partial = float(getattr(cfg, "partial_rotary_factor", None) or params.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedModelError(f"partial rotary embeddings (factor {partial}) are not supported")


def rope_spec(model: Any) -> RopeSpec:
    """The model's own inverse frequencies (the same fp32 buffer its attention uses)."""
    torch = require("torch", "models")
    config = _text_config(model.config)
    check_movable(config)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    rotary = getattr(base, "rotary_emb", None)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    params = rope_parameters(config)
    if rotary is not None:
        # original_inv_freq: the static set, whatever a dynamic update may have written.
        inv = getattr(rotary, "original_inv_freq", None)
        inv = rotary.inv_freq if inv is None else inv
    else:
        theta = float(params.get("rope_theta", 10000.0))
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    inv = inv.detach().to(torch.float32).clone()
    if inv.numel() * 2 != head_dim:
        raise UnsupportedModelError(f"inv_freq has {inv.numel()} entries for head_dim {head_dim}")
    clean = {k: v for k, v in params.items() if k != "type"}
    return RopeSpec(inv, params["rope_type"], clean, head_dim)


def rotation(inv_freq: Any, delta: int, device: Any) -> tuple[Any, Any]:
    """cos and sin of delta * inv_freq, each [head_dim] in the half-split layout, float32.

    The angle is formed in float64: delta can be tens of thousands, and the rotation
    should add no error beyond the model's own fp32 RoPE.
    """
    torch = require("torch", "models")
    ang = inv_freq.to(device=device, dtype=torch.float64) * float(delta)
    ang = torch.cat([ang, ang])
    return ang.cos().to(torch.float32), ang.sin().to(torch.float32)


def rotate_keys(keys: Any, delta: int, inv_freq: Any, out_dtype: Any = None, scale: Any = None) -> Any:
    """Keys [..., tokens, head_dim] rotated by delta positions; fp32 math, `out_dtype` result.

    `scale` (broadcastable, optional) dequantises int8/fp8 keys first. No attention
    scaling is applied: the stored keys already carry it.
    """
    torch = require("torch", "models")
    out_dtype = out_dtype or keys.dtype
    k = keys.to(torch.float32)
    if scale is not None:
        k = k * scale
    if delta == 0:
        return k.to(out_dtype)
    cos, sin = rotation(inv_freq, delta, k.device)
    half = k.shape[-1] // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)  # rotate_half
    return (k * cos + rot * sin).to(out_dtype)
