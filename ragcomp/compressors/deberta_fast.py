"""A faster inference forward for transformers' `DebertaV2Model`, on the model's own parameters.

Same math as `transformers.models.deberta_v2.modeling_deberta_v2` (checked against 5.17-5.23), with
the host-side work taken out of the per-layer loop:

- the bucketed relative positions (`build_relative_position`, HF's own function) are built once per
  sequence length and device and cached, together with the c2p/p2c gather indices;
- the relative embeddings are LayerNorm'd once per forward (HF: once per layer), and only the rows
  that the cached indices can reach are projected (a short sequence never looks 256 buckets away);
- attention is `scaled_dot_product_attention` with one additive float bias per layer:
  (c2p + p2c) / scale plus the key padding mask, scale = sqrt(head_dim * (1 + len(pos_att_type)))
  rounded to the model dtype as HF rounds it.

Outputs equal HF's last hidden state at every non-padding position (padding rows differ: HF masks
padding queries too, which only changes rows nobody reads). Inference only: dropout is not applied,
so `ProvenceModel` uses this path in eval mode only. Configs outside what is written here (the
published DeBERTa-v3 options) are refused with the reason, and callers keep HF's forward.
"""

from __future__ import annotations

from typing import Any

from ragcomp._optional import require

torch = require("torch", "models")
_deberta = require("transformers.models.deberta_v2.modeling_deberta_v2", "models")
F = torch.nn.functional

_POS_TYPES = {"c2p", "p2c"}


def unsupported_reason(config: Any) -> str | None:
    """Why the fast forward cannot run this DeBERTa-v2 config (None: it can)."""
    if getattr(config, "model_type", None) != "deberta-v2":
        return f"backbone model_type is {getattr(config, 'model_type', None)!r}, not 'deberta-v2'"
    if not getattr(config, "relative_attention", False):
        return "relative_attention is off (only relative-attention DeBERTa is written here)"
    pos_types = set(config.pos_att_type or [])
    if not pos_types or not pos_types <= _POS_TYPES:
        return f"pos_att_type {config.pos_att_type!r} (supported: a non-empty subset of c2p, p2c)"
    if getattr(config, "conv_kernel_size", 0) > 0:
        return "conv_kernel_size > 0 (DeBERTa-v2's convolution layer is not written here)"
    norm = {x.strip() for x in str(getattr(config, "norm_rel_ebd", "none")).lower().split("|")}
    if not norm <= {"layer_norm", "none"}:
        return f"norm_rel_ebd {config.norm_rel_ebd!r} (supported: layer_norm, none)"
    return None


class FastDebertaV2Encoder:
    """`encoder(input_ids, attention_mask, token_type_ids) -> last_hidden_state` for a DebertaV2Model.

    A plain object holding a reference to the model (not a submodule: no parameter is copied or
    registered twice). Raises ValueError for a config it does not implement (see `unsupported_reason`).
    """

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model.config)
        if reason is not None:
            raise ValueError(f"fast DeBERTa forward not available: {reason}")
        self.model = model
        config = model.config
        attention = model.encoder.layer[0].attention.self
        self.heads = attention.num_attention_heads
        self.head_dim = attention.attention_head_size
        self.share_att_key = attention.share_att_key
        self.pos_types = set(config.pos_att_type)
        self.position_buckets = attention.position_buckets
        self.max_relative_positions = attention.max_relative_positions
        self.span = attention.pos_ebd_size  # HF's att_span: the embedding rows used are [0, 2 * span)
        self.scale_factor = 1 + len(self.pos_types)
        self._positions: dict[tuple[int, str], tuple[Any, Any, int, int]] = {}

    def scale(self, dtype: Any) -> float:
        # HF divides by sqrt(head_dim * factor) cast to the model dtype (bf16 rounds 13.86 to 13.88).
        exact = torch.sqrt(torch.tensor(self.head_dim, dtype=torch.float) * self.scale_factor)
        return float(exact.to(dtype))

    def positions(self, length: int, device: Any) -> tuple[Any, Any, int, int]:
        """(c2p index, p2c index, lo, hi) for a sequence of `length`: gather indices into the projected
        embedding rows [lo, hi), built once per length and device (HF rebuilds them every layer)."""
        key = (length, str(device))
        cached = self._positions.get(key)
        if cached is None:
            probe = torch.empty(length, 0)  # build_relative_position reads only sizes and device
            rel = _deberta.build_relative_position(probe, probe, bucket_size=self.position_buckets,
                                                   max_position=self.max_relative_positions)[0]
            span = self.span
            c2p = torch.clamp(rel + span, 0, span * 2 - 1)
            # p2c is indexed [key, query] as in HF: gathered along the key rows, then transposed.
            p2c = torch.clamp(-rel + span, 0, span * 2 - 1)
            lo = int(min(c2p.min(), p2c.min()))
            hi = int(max(c2p.max(), p2c.max())) + 1
            cached = ((c2p - lo).to(device).contiguous(), (p2c - lo).to(device).contiguous(), lo, hi)
            self._positions[key] = cached
        return cached

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        model = self.model
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)
        length = input_ids.shape[1]
        c2p_index, p2c_index, lo, hi = self.positions(length, input_ids.device)
        encoder = model.encoder
        rel = encoder.get_rel_embedding()[lo:hi]  # LayerNorm'd once, not once per layer
        # Key padding as an additive bias; the most negative finite value keeps fully padded rows finite.
        key_bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        scale = self.scale(h.dtype)
        for layer in encoder.layer:
            attention = layer.attention
            context = self._attention(attention.self, h, rel, key_bias, c2p_index, p2c_index, scale)
            a = attention.output(context, h)  # dense + residual LayerNorm (HF modules, no copy)
            h = layer.output(layer.intermediate(a), a)
        return h

    def _split_heads(self, x: Any) -> Any:
        return x.view(*x.shape[:-1], self.heads, self.head_dim).transpose(-3, -2)

    def _attention(self, att: Any, h: Any, rel: Any, key_bias: Any, c2p_index: Any, p2c_index: Any,
                   scale: float) -> Any:
        batch, length, _ = h.shape
        q = self._split_heads(att.query_proj(h))  # [batch, heads, length, head_dim]
        k = self._split_heads(att.key_proj(h))
        v = self._split_heads(att.value_proj(h))
        expand = (batch, self.heads, length, length)
        # 1/scale goes on the few projected position rows, not on the [batch, heads, length, length]
        # scores; the biases are then summed in place (each full pass over them is memory traffic).
        bias = None
        if "c2p" in self.pos_types:
            pos_key = self._split_heads((att.key_proj if self.share_att_key else att.pos_key_proj)(rel))
            c2p = torch.matmul(q, pos_key.transpose(-1, -2) / scale)  # [batch, heads, length, rows]
            bias = torch.gather(c2p, -1, c2p_index.expand(expand))
        if "p2c" in self.pos_types:
            pos_query = self._split_heads((att.query_proj if self.share_att_key else att.pos_query_proj)(rel))
            p2c = torch.matmul(k, pos_query.transpose(-1, -2) / scale)  # [batch, heads, key, rows]
            p2c = torch.gather(p2c, -1, p2c_index.expand(expand)).transpose(-1, -2)
            bias = p2c.contiguous() if bias is None else bias.add_(p2c)
        bias = bias.add_(key_bias)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / scale)
        return context.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)


def fast_encoder_for(model: Any) -> FastDebertaV2Encoder | None:
    """The fast forward for `model` (cached on it), or None where its config is not supported."""
    cached = model.__dict__.get("_ragcomp_fast_encoder")
    if cached is None:
        config = getattr(model, "config", None)
        if config is None or unsupported_reason(config) is not None:
            return None
        cached = FastDebertaV2Encoder(model)
        model.__dict__["_ragcomp_fast_encoder"] = cached  # a plain attribute: not a submodule
    return cached
