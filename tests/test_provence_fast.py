"""The fast DeBERTa-v2 forward (same outputs as HF's) and the CUDA-graph runner (eager off CUDA; a GPU
test compares replayed and eager outputs). The compressor's CPU side: test_provence_cpu_side.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ragcomp.accel.deberta_fast import (  # noqa: E402
    FastDebertaV2Encoder,
    _skew,
    fast_encoder_for,
    unsupported_reason,
)
from ragcomp.accel.graphed import (  # noqa: E402
    GraphedForward,
    _pad_into,
    bucket_shape,
    pad_inputs,
)
from ragcomp.compressors.provence.model import ProvenceModel  # noqa: E402

build_relative_position = pytest.importorskip(
    "transformers.models.deberta_v2.modeling_deberta_v2").build_relative_position

from deberta_configs import _v3_config  # noqa: E402


def _padded_batch(lengths: list[int], width: int, vocab: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("overrides", [
    {},  # the published options
    {"share_att_key": False, "pos_att_type": ["c2p"], "norm_rel_ebd": "none", "position_buckets": -1},
    {"pos_att_type": ["p2c"], "position_biased_input": True, "type_vocab_size": 2},
])
# sdpa-compiled, flex: compiled by inductor (its C++ backend on CPU); flex with one head of 32, since
# smaller CPU heads run unfused (test_small_cpu_heads_run_flex_unfused)
@pytest.mark.parametrize("attention", ["sdpa", "sdpa-compiled", "flex"])
def test_fast_encoder_equals_hf_at_unpadded_positions(overrides: dict, attention: str) -> None:
    torch.manual_seed(0)
    heads = {"num_attention_heads": 1} if attention == "flex" else {}
    model = transformers.DebertaV2Model(_v3_config(**overrides, **heads)).eval()
    fast = FastDebertaV2Encoder(model, attention=attention)
    for lengths, width in (([40, 25, 3], 40), ([7], 7), ([60, 33], 64)):
        ids, mask = _padded_batch(lengths, width)
        types = (torch.arange(width) >= 5).long().expand(len(lengths), width).contiguous()
        with torch.no_grad():
            ref = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            ours = fast(ids, mask, types)
        gap = ((ref - ours).abs() * mask[..., None]).max()
        assert float(gap) <= 1e-5, (lengths, float(gap))


@pytest.mark.parametrize("buckets", [256, 8, -1])
def test_position_columns_equal_hf_indices_for_every_query_and_key(buckets: int) -> None:
    model = transformers.DebertaV2Model(_v3_config(position_buckets=buckets, max_position_embeddings=512))
    fast = FastDebertaV2Encoder(model)
    att = model.encoder.layer[0].attention.self
    span = att.pos_ebd_size
    for length in (1, 10, 200):
        c2p, p2c = fast.positions(length, "cpu")
        assert fast.positions(length, "cpu")[0] is c2p  # built once per length and device
        assert c2p.shape == p2c.shape == (2 * length - 1,)
        probe = torch.empty(length, 0)
        rel = build_relative_position(probe, probe, bucket_size=att.position_buckets,
                                      max_position=att.max_relative_positions)[0]
        hf_c2p = torch.clamp(rel + span, 0, 2 * span - 1)  # HF's [query, key] and [key, query] indices
        hf_p2c = torch.clamp(-rel + span, 0, 2 * span - 1)
        i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        n = length - 1
        assert torch.equal(c2p[n - i + j], hf_c2p)  # the columns that the skewed views read
        assert torch.equal(p2c[n + i - j], hf_p2c.T)
    if buckets == 256:  # distances above 128 are log-bucketed: 199 maps below 199, symmetric rows
        reach = int(c2p.max()) - span
        assert 128 < reach < 199 and int(c2p.min()) == span - reach


@pytest.mark.parametrize("width", [9, 16])  # 2 * length - 1, and rounded up to aligned rows
def test_skewed_views_read_the_toeplitz_scores(width: int) -> None:
    # Head-major scores, as the encoder computes them, read through a batch-major view.
    scores = torch.arange(3 * 2 * 5 * width, dtype=torch.float).reshape(3, 2, 5, width).transpose(0, 1)
    n = 4
    c2p, p2c = _skew(scores, query_stride_first=True), _skew(scores, query_stride_first=False)
    assert c2p.shape == p2c.shape == (2, 3, 5, 5)
    for i in range(5):
        for j in range(5):
            assert torch.equal(c2p[..., i, j], scores[..., i, n - i + j])
            assert torch.equal(p2c[..., i, j], scores[..., j, n + i - j])
    with pytest.raises(ValueError, match="unit column stride"):
        _skew(scores.transpose(-1, -2), query_stride_first=True)


def test_unsupported_configs_are_refused_and_fall_back_to_hf() -> None:
    assert unsupported_reason(_v3_config()) is None
    conv = _v3_config(conv_kernel_size=3)
    assert "conv_kernel_size" in unsupported_reason(conv)
    assert "pos_att_type" in unsupported_reason(_v3_config(pos_att_type=["p2p"]))
    assert "relative_attention" in unsupported_reason(_v3_config(relative_attention=False))
    with pytest.raises(ValueError, match="fast DeBERTa forward not available: conv_kernel_size"):
        FastDebertaV2Encoder(transformers.DebertaV2Model(conv))
    torch.manual_seed(0)
    net = ProvenceModel(conv).eval()
    assert fast_encoder_for(net.backbone) is None
    ids, mask = _padded_batch([12, 9], 12)
    with torch.no_grad():  # fast=True on an unsupported backbone is HF's forward, bit for bit
        assert torch.equal(net.encode(ids, mask, fast=True), net.encode(ids, mask, fast=False))
    bert = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64)
    assert "not 'deberta-v2'" in unsupported_reason(bert)


def test_provence_model_outputs_equal_with_fast_encoder() -> None:
    torch.manual_seed(0)
    net = ProvenceModel(_v3_config()).eval()
    ids, mask = _padded_batch([30, 17, 5], 30)
    with torch.no_grad():
        ref = net(ids, mask)
        ours = net(ids, mask, fast=True)
        probs, ranks = net.predict(ids, mask, fast=True)
    rows = mask.bool()
    assert float((ref.token_logits - ours.token_logits)[rows].abs().max()) <= 1e-5
    assert float((ref.ranking_logits - ours.ranking_logits).abs().max()) <= 1e-5
    assert float((probs - net.keep_probs(ref.token_logits))[rows].abs().max()) <= 1e-6
    assert probs.dtype == ranks.dtype == torch.float32 and ranks.shape == (3,)
    assert "_ragcomp_fast_encoder" not in dict(net.named_modules())  # no submodule, no parameter copy
    assert len(net.state_dict()) == len(ProvenceModel(_v3_config()).state_dict())


def test_bucket_shapes_and_padding() -> None:
    assert bucket_shape(20, 230, 4, 32) == (20, 256)
    assert bucket_shape(21, 256, 4, 32) == (24, 256)
    assert bucket_shape(30, 1, 8, 64, max_batch=30) == (30, 64)  # never above max_batch ...
    assert bucket_shape(33, 65, 8, 64, max_batch=30) == (33, 128)  # ... nor below the batch itself
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    p_ids, p_mask = pad_inputs([ids, mask], [0, 0], (4, 5))
    assert p_ids.tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [5, 6, 7, 0, 0], [5, 6, 7, 0, 0]]
    assert p_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]


def test_inputs_pad_the_same_through_numpy_and_torch() -> None:
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    staged = torch.stack(pad_inputs([ids, mask], [3, 0], (4, 5)))
    assert staged.shape == (2, 4, 5)
    assert staged[0].tolist() == [[5, 6, 7, 3, 3], [8, 9, 0, 3, 3], [5, 6, 7, 3, 3], [5, 6, 7, 3, 3]]
    as_numpy = np.full((2, 4, 5), -1, np.int64)  # stale contents must not survive
    for row, x, pad in zip(as_numpy, [ids, mask], [3, 0], strict=True):
        _pad_into(row, x.numpy(), pad)
    assert as_numpy.tolist() == staged.tolist()


def test_graph_runner_refuses_inputs_of_mixed_shape_or_dtype() -> None:
    run = GraphedForward(lambda *xs: xs, (0, 0), "cpu")
    run.enabled = True  # the check runs before anything is staged for a graph
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="share one dtype and one"):
        run(ids, torch.tensor([[1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="share one dtype and one"):
        run(ids, torch.tensor([[1, 1]]))
    assert not run.graphs


def test_graph_runner_is_eager_off_cuda() -> None:
    torch.manual_seed(0)
    net = ProvenceModel(_v3_config()).eval()
    run = net.runner(fast=True, cuda_graphs=True, pad_id=0, max_batch=8)
    assert not run.enabled and run is net.runner(fast=True, cuda_graphs=True, pad_id=0, max_batch=8)
    ids, mask = _padded_batch([11, 6], 11)
    with torch.inference_mode():
        probs, ranks = run(ids, mask, torch.zeros_like(ids))
        ref_probs, ref_ranks = net.predict(ids, mask, fast=True)
    assert probs.shape == (2, 11) and not run.graphs
    assert torch.equal(probs, ref_probs) and torch.equal(ranks, ref_ranks)


def test_failed_capture_warns_and_runs_eagerly() -> None:
    calls: list[tuple[int, ...]] = []

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(ids.shape))
        return ids * mask, (ids * mask).sum(-1)

    run = GraphedForward(fn, (0, 0), "cpu")
    run.enabled = True  # pretend to be on CUDA: the capture itself then fails here
    ids, mask = torch.tensor([[3, 4, 5]]), torch.tensor([[1, 1, 0]])
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed, running eagerly"):
        tokens, total = run(ids, mask)
    assert tokens.tolist() == [[3, 4, 0]] and total.tolist() == [7]
    assert not run.enabled and not run.graphs and calls[-1] == (1, 3)  # the unpadded inputs
    assert run(ids, mask)[1].tolist() == [7]  # no second attempt, no second warning


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("attention", ["sdpa", "sdpa-compiled", "flex"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_fast_encoder_equals_hf_with_log_buckets_and_padding(device: str, attention: str) -> None:
    # 256 buckets as published, lengths past the 128-wide linear zone, padded rows; on CUDA the
    # strided views and the padding column run through CUDA kernels (fp32 without TF32). flex:
    # compiled FlexAttention (inductor's C++ backend on CPU, Triton on CUDA), no materialised bias.
    torch.manual_seed(0)
    # flex: Triton needs heads of >= 16, the compiled CPU kernel >= 24 (else it runs unfused)
    heads = {"cuda": 2, "cpu": 1}[device] if attention == "flex" else 4
    model = transformers.DebertaV2Model(_v3_config(position_buckets=256, max_position_embeddings=512,
                                                   num_attention_heads=heads))
    model = model.to(device).eval()
    fast = FastDebertaV2Encoder(model, attention=attention)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ids, mask = _padded_batch([300, 141, 7], 320)
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).last_hidden_state
            ours = fast(ids, mask, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    # CUDA: SDPA's kernel sums in another order than HF's matmul + softmax.
    assert float(((ref - ours).abs() * mask[..., None]).max()) <= (1e-5 if device == "cpu" else 1e-4)


@CUDA
# Compiled ones compile in the warm-up, then are captured.
@pytest.mark.parametrize("fast", [True, "sdpa-compiled", "flex"])
def test_graph_replay_equals_eager_on_cuda(fast: bool | str) -> None:
    torch.manual_seed(0)
    net = ProvenceModel(_v3_config(num_attention_heads=2 if fast == "flex" else 4)).to("cuda").eval()
    run = GraphedForward(lambda i, m, t: net.predict(i, m, t, fast=fast), (0, 0, 0), "cuda", max_batch=8)
    for lengths, width in (([40, 25, 3], 40), ([9, 9, 2, 8, 7], 9), ([38, 1], 38)):
        ids, mask = _padded_batch(lengths, width)
        types = torch.zeros_like(ids)
        with torch.inference_mode():
            probs, ranks = (x.clone() for x in run(ids, mask, types))
            ref_probs, ref_ranks = net.predict(ids.cuda(), mask.cuda(), types.cuda(), fast=fast)
        rows = mask.bool().cuda()
        assert run.enabled and probs.shape == (len(lengths), width)
        assert float((probs - ref_probs)[rows].abs().max()) <= 1e-5
        assert float((ranks - ref_ranks).abs().max()) <= 1e-4
    assert set(run.graphs) == {(4, 64), (8, 32)}  # ([40,25,3], 40) and ([38,1], 38) share one graph


def test_small_cpu_heads_run_flex_unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Heads of 8: torch's compiled CPU flex kernel gives wrong values or NaN now and then; the
    # unfused path must warn once and equal the materialised-bias SDPA path.
    from ragcomp.accel import deberta_flex

    def no_compiled_kernel() -> None:
        raise AssertionError("the compiled kernel must not run for heads of 8 on CPU")

    monkeypatch.setattr(deberta_flex, "_warned_small_cpu_heads", False)
    monkeypatch.setattr(deberta_flex, "compiled_flex_attention", no_compiled_kernel)
    torch.manual_seed(0)
    model = transformers.DebertaV2Model(_v3_config()).eval()  # 4 heads of 8
    ids, mask = _padded_batch([40, 25, 3], 40)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="head size of 8 .below 24. runs unfused"):
        flex = FastDebertaV2Encoder(model, attention="flex")(ids, mask, None)
    with torch.no_grad():
        sdpa = FastDebertaV2Encoder(model, attention="sdpa")(ids, mask, None)
    assert float(((flex - sdpa).abs() * mask[..., None]).max()) <= 1e-5
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # once per process, not per call
        FastDebertaV2Encoder(model, attention="flex")(ids, mask, None)


def test_attention_choice_reaches_the_provence_model() -> None:
    torch.manual_seed(0)
    net = ProvenceModel(_v3_config(num_attention_heads=1)).eval()  # a head of 32: the compiled kernel
    ids, mask = _padded_batch([24, 11], 24)
    with torch.no_grad():
        flex, sdpa = net.encode(ids, mask, fast="flex"), net.encode(ids, mask, fast=True)
    assert float(((flex - sdpa).abs() * mask[..., None]).max()) <= 1e-5
    encoders = net.backbone.__dict__["_ragcomp_fast_encoders"]
    assert {k: e.attention for k, e in encoders.items()} == {"flex": "flex", "sdpa": "sdpa"}
    with pytest.raises(ValueError, match="attention 'xformers'"):
        net.encode(ids, mask, fast="xformers")
    with pytest.raises(ValueError, match="attention 'xformers'"):
        FastDebertaV2Encoder(net.backbone, attention="xformers")


def test_fused_qkv_follows_the_projections_and_is_built_once() -> None:
    torch.manual_seed(0)
    model = transformers.DebertaV2Model(_v3_config()).eval()
    fast = FastDebertaV2Encoder(model, attention="sdpa-compiled")
    att = model.encoder.layer[0].attention.self
    weight, bias = fast.fused_qkv(att)
    assert fast.fused_qkv(att)[0] is weight  # cached while the parameters stay as they are
    assert torch.equal(weight, torch.cat([att.query_proj.weight, att.key_proj.weight, att.value_proj.weight]))
    assert torch.equal(bias, torch.cat([att.query_proj.bias, att.key_proj.bias, att.value_proj.bias]))
    ids, mask = _padded_batch([20, 9], 20)
    with torch.no_grad():
        att.value_proj.weight.mul_(-2.0)  # an in-place change: the fused copy must follow it
        ref = model(ids, attention_mask=mask).last_hidden_state
        ours = fast(ids, mask)
    assert not torch.equal(fast.fused_qkv(att)[0], weight)
    assert float(((ref - ours).abs() * mask[..., None]).max()) <= 1e-5
    # The projected position rows follow the key projection and the relative embeddings the same way.
    projected = fast.position_projections(fast.scale(torch.float32))[0]
    with torch.no_grad():
        model.encoder.layer[1].attention.self.key_proj.bias.add_(0.5)
        model.encoder.rel_embeddings.weight.mul_(1.5)
        ref = model(ids, attention_mask=mask).last_hidden_state
        ours = fast(ids, mask)
    assert fast.position_projections(fast.scale(torch.float32))[0] is not projected
    assert float(((ref - ours).abs() * mask[..., None]).max()) <= 1e-5


def test_gelu_epilogue_layer_equals_the_plain_layer_and_is_gated_to_exact_gelu() -> None:
    # On CPU `linear_gelu` is exact GELU after the GEMM, so the epilogue layer must equal the plain
    # one: it reads the FFN's own dense weight and bias and feeds HF's output module.
    from ragcomp.accel.deberta_fast import _layer_forward, linear_gelu

    F = torch.nn.functional
    torch.manual_seed(0)
    model = transformers.DebertaV2Model(_v3_config()).eval()
    fast = FastDebertaV2Encoder(model, attention="sdpa-compiled")
    x, w, b = torch.randn(3, 5, 8), torch.randn(16, 8), torch.randn(16)
    torch.testing.assert_close(linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
    h = torch.randn(2, 12, 32)
    key_bias = torch.zeros(2, 1, 1, 12)
    key_bias[1, ..., 9:] = torch.finfo(h.dtype).min
    c2p_rows, p2c_rows = (F.pad(r, (0, 24 - r.shape[0])) for r in fast.positions(12, "cpu"))
    proj_k, proj_q = fast.position_projections(fast.scale(h.dtype))
    layer = model.encoder.layer[1]
    qkv = fast.fused_qkv(layer.attention.self)
    scale = fast.scale(h.dtype)
    args = (layer, *qkv, h, proj_k[1, c2p_rows], proj_q[1, p2c_rows], key_bias, scale, fast.heads)
    with torch.no_grad():
        with_epilogue, plain = _layer_forward(*args, True), _layer_forward(*args, False)
    torch.testing.assert_close(with_epilogue, plain, rtol=0, atol=1e-6)
    assert fast._gelu_model
    relu = FastDebertaV2Encoder(transformers.DebertaV2Model(_v3_config(hidden_act="relu")), "sdpa-compiled")
    assert not relu._gelu_model  # only exact GELU is swapped for the epilogue's


@CUDA
def test_bf16_compiled_layers_with_the_gelu_epilogue_stay_as_close_to_fp32_as_eager_bf16() -> None:
    torch.manual_seed(0)
    config = _v3_config(hidden_size=128, num_attention_heads=2, intermediate_size=512, position_buckets=256,
                        max_position_embeddings=512)
    model = transformers.DebertaV2Model(config)
    model = model.to("cuda").eval()
    ids, mask = (t.cuda() for t in _padded_batch([200, 141, 7], 208))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        model.to(torch.bfloat16)
        eager = FastDebertaV2Encoder(model, attention="sdpa")(ids, mask).float()
        compiled = FastDebertaV2Encoder(model, attention="sdpa-compiled")
        assert compiled._gelu_model
        ours = compiled(ids, mask).float()
    rows = mask.bool()
    eager_gap = float((eager - ref)[rows].abs().max())
    assert float((ours - ref)[rows].abs().max()) <= 1.5 * eager_gap + 1e-2
