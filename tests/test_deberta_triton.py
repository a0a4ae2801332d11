"""The fused Triton kernel for DeBERTa's disentangled attention (`attention="triton"`): the same
last hidden state as HF's forward. On CPU it runs under Triton's interpreter (in a subprocess:
the interpreter is chosen when the kernel is defined); on CUDA, compiled, and replayed from a graph."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from test_provence_fast import _padded_batch, _v3_config  # noqa: E402

from ragcomp.compressors.deberta_fast import FastDebertaV2Encoder  # noqa: E402
from ragcomp.compressors.graphed import GraphedForward  # noqa: E402
from ragcomp.compressors.provence_model import ProvenceModel  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
# "triton": the kernel computes the position terms; "triton-scores": it reads the batched matmuls'.
ATTENTIONS = ("triton", "triton-scores")
CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a GPU and Triton")

# Each case: config overrides, then (lengths, width) of a padded batch.
CASES = {
    "published options, log buckets, padding": (
        {"position_buckets": 256, "max_position_embeddings": 512}, [260, 141, 7], 260),
    "c2p only, unshared keys, no bucketing": (
        {"share_att_key": False, "pos_att_type": ["c2p"], "norm_rel_ebd": "none", "position_buckets": -1},
        [40, 3], 40),
    "p2c only, head size 24 (not a power of two)": (
        {"pos_att_type": ["p2c"], "hidden_size": 48, "num_attention_heads": 2, "pooler_hidden_size": 48},
        [33, 17, 1], 35),
}

_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers
    sys.path.insert(0, {tests!r})
    from test_provence_fast import _padded_batch, _v3_config
    from ragcomp.compressors.deberta_fast import FastDebertaV2Encoder
    out = {{}}
    for name, (overrides, lengths, width) in json.loads({cases!r}).items():
        torch.manual_seed(0)
        model = transformers.DebertaV2Model(_v3_config(**overrides)).eval()
        ids, mask = _padded_batch(lengths, width)
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).last_hidden_state
            for attention in ("triton", "triton-scores"):
                ours = FastDebertaV2Encoder(model, attention=attention)(ids, mask, None)
                out[name + " / " + attention] = float(((ref - ours).abs() * mask[..., None]).max())
    print(json.dumps(out))
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (the test extra installs it)")
def test_kernel_equals_hf_under_the_interpreter() -> None:
    script = _SCRIPT.format(tests=str(Path(__file__).parent), cases=json.dumps(CASES))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(diffs) == {f"{c} / {a}" for c in CASES for a in ATTENTIONS}
    for name, diff in diffs.items():
        assert diff <= 1e-5, (name, diff)


def test_triton_is_refused_with_the_reason_where_it_cannot_run() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernel on CPU")
    model = transformers.DebertaV2Model(_v3_config()).eval()
    expected = "Triton is not installed" if not HAS_TRITON else "runs on CUDA"
    for attention in ATTENTIONS:
        with pytest.raises(ValueError, match=f"attention '{attention}' not available: .*{expected}"):
            FastDebertaV2Encoder(model, attention=attention)


@CUDA
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_hf_on_cuda(case: str, attention: str) -> None:
    overrides, lengths, width = CASES[case]
    torch.manual_seed(0)
    model = transformers.DebertaV2Model(_v3_config(**overrides)).to("cuda").eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ids, mask = (x.cuda() for x in _padded_batch(lengths, width))
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).last_hidden_state
            ours = FastDebertaV2Encoder(model, attention=attention)(ids, mask, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert float(((ref - ours).abs() * mask[..., None]).max()) <= 1e-4


@CUDA
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_kernel_in_bf16_stays_close_to_sdpa_and_replays_from_a_graph(attention: str) -> None:
    torch.manual_seed(0)
    config = _v3_config(hidden_size=256, num_attention_heads=4, intermediate_size=512,
                        pooler_hidden_size=256, position_buckets=256, max_position_embeddings=512,
                        initializer_range=0.02)
    net = ProvenceModel(config).to("cuda", torch.bfloat16).eval()
    run = GraphedForward(lambda i, m, t: net.predict(i, m, t, fast=attention), (0, 0, 0), "cuda", max_batch=8)
    for lengths, width in (([230, 200, 12], 230), ([64, 63], 64)):
        ids, mask = _padded_batch(lengths, width)
        types = torch.zeros_like(ids)
        with torch.inference_mode():
            probs = run(ids, mask, types)[0].clone()
            eager_probs, _ = net.predict(ids.cuda(), mask.cuda(), types.cuda(), fast=attention)
            sdpa_probs, _ = net.predict(ids.cuda(), mask.cuda(), types.cuda(), fast=True)
        rows = mask.bool().cuda()
        assert run.enabled and run.graphs
        assert float((probs - eager_probs)[rows].abs().max()) <= 1e-6  # the replay is the same forward
        assert float((probs - sdpa_probs)[rows].abs().max()) <= 2e-2  # bf16: another summation order
