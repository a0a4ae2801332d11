"""A faster inference forward for transformers' `DebertaV2Model`, on the model's own parameters.

Same math as `transformers.models.deberta_v2.modeling_deberta_v2` (checked against 5.17-5.23), with
the host-side work taken out of the per-layer loop:

- the bucketed relative positions (`build_relative_position`, HF's own function) are built once per
  sequence length and device and cached, as one embedding row per distance for c2p and p2c;
- the relative embeddings are LayerNorm'd and projected by each layer's key and query projections
  (divided by the scale) once for all 2 * span rows, and kept until a weight changes
  (`position_projections`; HF: every layer of every forward), so a forward only gathers the rows
  its columns use, for all layers in one step;
- the bucketed position of query i and key j depends on i - j only, so the c2p and p2c scores are
  computed once per distance ([heads, batch, length, width >= 2 * length - 1], one embedding row
  per distance, picked once per forward) and read through a strided view: no [batch, heads, length,
  length] gather and no index tensor of that size (HF gathers twice per layer);
- the per-distance scores are one batched matmul per term over the heads ([heads, batch * length,
  head_dim] x [heads, head_dim, width], views of the projections: no broadcast copy), the width
  2 * length - 1 rounded up to a multiple of 8 so that the rows stay 16-byte aligned (odd widths
  push cuBLAS onto old unaligned kernels; the extra columns are never read);
- attention (`attention="sdpa"`, the default) is `scaled_dot_product_attention` with one additive
  float bias per layer: (c2p + p2c) / scale plus the key padding mask, scale = sqrt(head_dim *
  (1 + len(pos_att_type))) rounded to the model dtype as HF rounds it; the padding mask enters
  through one extra column of the p2c product, so the bias is written in one pass;
- `attention="sdpa-compiled"`: the same math with each whole layer compiled by inductor
  (`_layer_forward`; one compilation shared by all layers, per shape): query, key and value in one
  GEMM (`fused_qkv`), the bias written by one tiled kernel (its two terms are strided views in
  transposed layouts, which eager's elementwise kernel reads column-wise) with the key padding in
  it, and the scaling, residual adds and LayerNorms fused (eager runs them as separate kernels);
  in bf16/fp16 on CUDA the feed-forward's GELU runs in its first GEMM's epilogue (cuBLASLt,
  `linear_gelu`: the tanh form of GELU, within 5e-4 of the exact one, far below the rounding
  of those dtypes), saving a pass over the [tokens, 4 * hidden] activations;
- `attention="flex"` (CUDA or CPU, through torch.compile) never writes the [batch, heads, length,
  length] bias: FlexAttention's score_mod reads the two per-distance scores and the key padding
  for each score it computes (see `deberta_flex.py`).

Outputs equal HF's last hidden state at every non-padding position (padding rows differ: HF masks
padding queries too, which only changes rows nobody reads). Inference only: dropout is not applied,
so `ProvenceModel` uses this path in eval mode only. Configs outside what is written here (the
published DeBERTa-v3 options) are refused with the reason, and callers keep HF's forward.
"""

from __future__ import annotations

from typing import Any

from ragcomp._optional import require
from ragcomp.accel.graphed import round_up

torch = require("torch", "models")
_deberta = require("transformers.models.deberta_v2.modeling_deberta_v2", "models")
F = torch.nn.functional

_POS_TYPES = {"c2p", "p2c"}
ATTENTION_IMPLS = ("sdpa", "sdpa-compiled", "flex")


@torch.library.custom_op("ragcomp::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T + bias) by `_addmm_activation`: on CUDA one cuBLASLt GEMM with a bias + GELU
    epilogue (GELU's tanh form), on CPU exact GELU after the GEMM. A custom op so that inductor
    calls it as it is instead of splitting it back into a GEMM and a GELU kernel."""
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _linear_gelu_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


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
    `attention`: "sdpa" (a materialised bias, no compilation) or "flex" (see the module docstring).
    """

    def __init__(self, model: Any, attention: str = "sdpa") -> None:
        reason = unsupported_reason(model.config)
        if reason is not None:
            raise ValueError(f"fast DeBERTa forward not available: {reason}")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention {attention!r} (supported: {', '.join(ATTENTION_IMPLS)})")
        self.attention = attention
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
        self._positions: dict[tuple[int, str], tuple[Any, Any]] = {}
        self._fused_qkv: dict[int, tuple[tuple[int, ...], Any, Any]] = {}
        self._projected: tuple[tuple[Any, ...], Any, Any] | None = None
        # The GELU epilogue replaces exact GELU only (HF's "gelu") on a dense layer with a bias.
        self._gelu_model = config.hidden_act == "gelu" and all(
            layer.intermediate.dense.bias is not None for layer in model.encoder.layer)

    def scale(self, dtype: Any) -> float:
        # HF divides by sqrt(head_dim * factor) cast to the model dtype (bf16 rounds 13.86 to 13.88).
        exact = torch.sqrt(torch.tensor(self.head_dim, dtype=torch.float) * self.scale_factor)
        return float(exact.to(dtype))

    def positions(self, length: int, device: Any) -> tuple[Any, Any]:
        """(c2p rows, p2c rows) for a sequence of `length`: which relative-embedding row each of the
        2 * length - 1 columns of the position scores uses, built once per length and device (HF
        rebuilds its [length, length] indices every layer).

        DeBERTa's bucketed relative position of query i and key j depends on i - j only, so every
        position bias is a Toeplitz matrix: a column per distance, then a strided view (`_skew`) in
        place of HF's gather over [batch, heads, length, length] indices. Columns, with
        n = length - 1: c2p column c holds distance n - c (query i reads columns n - i .. 2n - i);
        p2c column c holds distance c - n."""
        key = (length, str(device))
        cached = self._positions.get(key)
        if cached is None:
            probe = torch.empty(length, 0)  # build_relative_position reads only sizes and device
            rel = _deberta.build_relative_position(probe, probe, bucket_size=self.position_buckets,
                                                   max_position=self.max_relative_positions)[0]
            # bucket[d + n] = rel[i, j] for any i - j = d (HF's buckets are a function of i - j).
            bucket = torch.cat([rel[0, 1:].flip(0), rel[:, 0]])
            i = torch.arange(length)
            if not torch.equal(bucket[length - 1 + i[:, None] - i[None, :]], rel):  # once per length
                raise RuntimeError("transformers' DeBERTa relative positions no longer depend on i - j "
                                   "only; deberta_fast.positions must be rewritten for them")
            top = self.span * 2 - 1
            c2p = torch.clamp(bucket.flip(0) + self.span, 0, top)  # HF: clamp(rel[i, j] + span)
            # HF indexes p2c [key, query]: clamp(-rel[j, i] + span), and rel[j, i] is bucket[n - d].
            p2c = torch.clamp(-bucket.flip(0) + self.span, 0, top)
            cached = (c2p.to(device), p2c.to(device))
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
        width = round_up(2 * length - 1, 8)  # aligned score rows (see the module docstring)
        c2p_rows, p2c_rows = (F.pad(r, (0, width - r.shape[0])) for r in self.positions(length, h.device))
        encoder = model.encoder
        scale = self.scale(h.dtype)
        # Each score column's projected position row for every layer, picked in one gather per forward.
        proj_k, proj_q = self.position_projections(scale)
        pos_k = proj_k[:, c2p_rows] if proj_k is not None else [None] * len(encoder.layer)
        pos_q = proj_q[:, p2c_rows] if proj_q is not None else [None] * len(encoder.layer)
        # Key padding as an additive bias; the most negative finite value keeps fully padded rows finite.
        key_bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        padding = None
        # Eager SDPA takes the key padding through an extra p2c column; the compiled layer and flex add it.
        if "p2c" in self.pos_types and self.attention == "sdpa":
            padding = _padding_columns(key_bias, width)
        if self.attention == "sdpa-compiled":
            from ragcomp.accel.deberta_flex import compiled_layer

            forward = compiled_layer(_layer_forward)
            epilogue = self._gelu_model and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16)
            for n, layer in enumerate(encoder.layer):
                qkv = self.fused_qkv(layer.attention.self)
                h = forward(layer, *qkv, h, pos_k[n], pos_q[n], key_bias, scale, self.heads, epilogue)
            return h
        for n, layer in enumerate(encoder.layer):
            attention = layer.attention
            context = self._attention(h, attention.self, pos_k[n], pos_q[n], key_bias, padding, scale)
            a = attention.output(context, h)  # dense + residual LayerNorm (HF modules, no copy)
            h = layer.output(layer.intermediate(a), a)
        return h

    def position_projections(self, scale: float) -> tuple[Any, Any]:
        """([layers, 2 * span, hidden] c2p key projections, p2c query projections) of every
        relative-embedding row, divided by `scale` (None for a term the config leaves out).

        A layer's position rows depend on its weights only, not on the input: computed once for all
        rows (HF: every forward, every layer), then each forward gathers its columns' rows for all
        layers at once. Rebuilt when a parameter they read changes (storage or in-place version).
        A detached copy (inference only): 2 x layers x 2 * span x hidden values, 50 MB in bf16 for
        DeBERTa-v3-large."""
        encoder = self.model.encoder
        atts = [layer.attention.self for layer in encoder.layer]
        key_mods = [a.key_proj if self.share_att_key else a.pos_key_proj for a in atts] \
            if "c2p" in self.pos_types else []
        query_mods = [a.query_proj if self.share_att_key else a.pos_query_proj for a in atts] \
            if "p2c" in self.pos_types else []
        norm = getattr(encoder, "LayerNorm", None)
        params = [encoder.rel_embeddings.weight, *(norm.parameters() if norm is not None else ())]
        params += [t for m in key_mods + query_mods for t in (m.weight, m.bias) if t is not None]
        key = (scale, *_version_key(params))
        if self._projected is None or self._projected[0] != key:
            # Normal tensors even when called under inference_mode (the cache outlives the call).
            with torch.inference_mode(False), torch.no_grad():
                rel = encoder.get_rel_embedding()  # LayerNorm'd as HF does
                stacked = [torch.stack([m(rel) / scale for m in mods]) if mods else None
                           for mods in (key_mods, query_mods)]
            self._projected = (key, *stacked)
        return self._projected[1], self._projected[2]

    def fused_qkv(self, att: Any) -> tuple[Any, Any]:
        """(weight [3 * hidden, hidden], bias) of the query, key and value projections stacked, so
        that one GEMM computes all three (about 20% less time than three at these sizes). Built once
        per layer and rebuilt when a projection's parameters change (storage or in-place version);
        a detached copy (inference only), costing a third of the attention weights' memory."""
        projections = (att.query_proj, att.key_proj, att.value_proj)
        key = _version_key([t for m in projections for t in (m.weight, m.bias) if t is not None])
        cached = self._fused_qkv.get(id(att))
        if cached is None or cached[0] != key:
            # Normal tensors even when called under inference_mode (the cache outlives the call).
            with torch.inference_mode(False), torch.no_grad():
                weight = torch.cat([m.weight for m in projections])
                biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in projections]
                cached = self._fused_qkv[id(att)] = (key, weight, torch.cat(biases))
        return cached[1], cached[2]

    def _attention(self, h: Any, att: Any, pos_k: Any, pos_q: Any, key_bias: Any,
                   padding: tuple[Any, Any] | None, scale: float) -> Any:
        batch, length, _ = h.shape
        q_rows, k_rows = att.query_proj(h), att.key_proj(h)  # [batch, length, heads * head_dim]
        c2p, p2c = _relative_scores(q_rows, k_rows, pos_k, pos_q, self.heads, padding)
        q, k, v = (_split_heads(x, self.heads) for x in (q_rows, k_rows, att.value_proj(h)))
        if self.attention == "flex":
            from ragcomp.accel.deberta_flex import relative_flex_attention

            context = relative_flex_attention(q, k, v, c2p, p2c, key_bias[:, 0, 0], scale)
        else:
            bias = _bias(c2p, p2c, key_bias, padding is not None)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / scale)
        return context.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)


def _layer_forward(layer: Any, qkv_weight: Any, qkv_bias: Any, h: Any, pos_k: Any, pos_q: Any,
                   key_bias: Any, scale: float, heads: int, gelu_epilogue: bool = False) -> Any:
    """One encoder layer as `FastDebertaV2Encoder` computes it (per-distance scores, skewed views,
    one bias, SDPA, HF's output modules), written to compile whole (`attention="sdpa-compiled"`):
    query, key and value in one GEMM (`fused_qkv`); inductor writes the bias in one kernel and fuses
    the scaling, residual adds and LayerNorms that eager runs as separate kernels; `gelu_epilogue`:
    the feed-forward's first GEMM applies GELU itself (`linear_gelu`)."""
    batch, length, hidden = h.shape
    q_rows, k_rows, v_rows = F.linear(h, qkv_weight, qkv_bias).split(hidden, dim=-1)
    c2p, p2c = _relative_scores(q_rows, k_rows, pos_k, pos_q, heads, None)
    terms = [_skew(x, query_stride_first=first, offset=0).transpose(0, 1)
             for x, first in ((c2p, True), (p2c, False)) if x is not None]
    bias = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    split = [_split_heads(x, heads) for x in (q_rows, k_rows, v_rows)]
    context = F.scaled_dot_product_attention(*split, attn_mask=bias + key_bias, scale=1.0 / scale)
    a = layer.attention.output(context.transpose(1, 2).reshape(batch, length, hidden), h)
    if gelu_epilogue:
        dense = layer.intermediate.dense
        return layer.output(linear_gelu(a, dense.weight, dense.bias), a)
    return layer.output(layer.intermediate(a), a)


def _version_key(tensors: list[Any]) -> tuple[int, ...]:
    """Storage address and in-place version of each tensor: changes whenever one of them does."""
    return tuple(x for t in tensors for x in (t.data_ptr(), t._version))


def _split_heads(x: Any, heads: int) -> Any:
    """[batch, length, heads * head_dim] -> [batch, heads, length, head_dim] (a view)."""
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(-3, -2)


def _relative_scores(q_rows: Any, k_rows: Any, pos_k: Any, pos_q: Any, heads: int,
                     padding: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """(c2p, p2c) per-distance scores of one layer from its projected position rows ([width, hidden],
    1/scale applied; None for a term the config leaves out); `padding` rides on p2c."""
    c2p = _position_scores(q_rows, pos_k, heads, None) if pos_k is not None else None
    p2c = _position_scores(k_rows, pos_q, heads, padding) if pos_q is not None else None
    return c2p, p2c


def _position_scores(x: Any, rows: Any, heads: int, padding: tuple[Any, Any] | None) -> Any:
    """Per-distance scores [heads, batch, length, width] of projections `x` [batch, length, hidden]
    against position rows `rows` [width, hidden]: one batched matmul over the heads on views (the
    batch folds into the rows of each head's product, so nothing is broadcast or copied). With
    `padding` (see `_padding_columns`), each key's padding bias rides along in the product."""
    batch, length, hidden = x.shape
    width, head_dim = rows.shape[0], hidden // heads
    xs = x.view(batch * length, heads, head_dim).transpose(0, 1)  # [heads, batch * length, head_dim]
    pos = rows.view(width, heads, head_dim).transpose(0, 1)  # [heads, width, head_dim]
    if padding is not None:
        key_columns, unit_columns = padding
        xs = torch.cat([xs, key_columns.expand(heads, -1, -1)], -1)
        pos = torch.cat([pos, unit_columns.expand(heads, -1, -1)], -1)
    return torch.bmm(xs, pos.transpose(1, 2)).view(heads, batch, length, width)


def _bias(c2p: Any, p2c: Any, key_bias: Any, padded_p2c: bool) -> Any:
    """SDPA's additive bias [batch, heads, query, key] from the per-distance scores: each term is a
    strided view (no gather, no index tensor); one add writes the row-major bias."""
    views = []
    if c2p is not None:
        views.append(_skew(c2p, query_stride_first=True).transpose(0, 1))
    if p2c is not None:
        views.append(_skew(p2c, query_stride_first=False).transpose(0, 1))
    if len(views) == 2:  # into a row-major bias (the views' own layouts differ)
        return torch.add(*views, out=views[0].new_empty(views[0].shape))
    return views[0].contiguous() if padded_p2c else views[0] + key_bias


_EXTRA_COLUMNS = 8  # keeps head_dim + extra a multiple of 8 (tensor-core friendly matmul shapes)


def _padding_columns(key_bias: Any, width: int) -> tuple[Any, Any]:
    """Columns appended to the keys ([batch * length, 8]: each key's padding bias, then zeros) and
    to the p2c position rows ([width, 8]: 1, then zeros): their product adds the key's padding bias
    to every p2c score of that key, inside the matmul, instead of one more pass over the full bias.
    Exact: an unpadded key adds 0 * 1."""
    key_columns = key_bias.new_zeros(key_bias.shape[0] * key_bias.shape[-1], _EXTRA_COLUMNS)
    key_columns[:, 0] = key_bias.reshape(-1)
    unit_columns = key_bias.new_zeros(width, _EXTRA_COLUMNS)
    unit_columns[:, 0] = 1.0
    return key_columns, unit_columns


def _skew(scores: Any, query_stride_first: bool, offset: int | None = None) -> Any:
    """[..., query, key] view of `scores` [..., length, row] (rows of width >= 2 * length - 1 and
    unit column stride; n = length - 1). c2p (`query_stride_first`, rows are queries): bias[i, j] =
    scores[i, n - i + j]. p2c (rows are keys): bias[i, j] = scores[j, n + i - j]. Both are fixed
    strides from offset n; leading dimensions keep their strides."""
    *lead, length, _ = scores.shape
    row = scores.stride(-2)
    if scores.stride(-1) != 1:
        raise ValueError("position scores need unit column stride")
    strides = (row - 1, 1) if query_stride_first else (1, row - 1)
    base = scores.storage_offset() if offset is None else offset  # given under torch.compile
    return scores.as_strided((*lead, length, length), (*scores.stride()[:-2], *strides), base + length - 1)


def fast_encoder_for(model: Any, attention: str = "sdpa") -> FastDebertaV2Encoder | None:
    """The fast forward for `model` with this attention (cached on it), or None where its config is
    not supported. Raises ValueError for an unknown attention, whatever the model."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention {attention!r} (supported: {', '.join(ATTENTION_IMPLS)})")
    encoders = model.__dict__.setdefault("_ragcomp_fast_encoders", {})  # plain attribute: no submodule
    cached = encoders.get(attention)
    if cached is None:
        config = getattr(model, "config", None)
        if config is None or unsupported_reason(config) is not None:
            return None
        cached = encoders[attention] = FastDebertaV2Encoder(model, attention)
    return cached
