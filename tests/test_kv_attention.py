"""Folded-GQA attention and the growing cache layer give the stock path's logits (real SmolLM2, fp32)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ragcomp.hf_cache import cache_arg  # noqa: E402
from ragcomp.kv.attention import folded_attention, folded_sdpa, growing_layer_class  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Module:
    training = False
    is_causal = True
    num_key_value_groups = 3


def _reference(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("q_len", [1, 5])
def test_folded_sdpa_equals_repeated_kv(q_len: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, q_len, 16, generator=g)
    k, v = torch.randn(2, 2, 11, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g)
    causal = torch.arange(11)[None, :] <= torch.arange(q_len)[:, None] + (11 - q_len)
    mask = causal[None, None].repeat(2, 1, 1, 1)
    mask[0, :, :, :3] = False  # left padding in the first row of the batch
    out, _ = folded_sdpa(_Module(), q, k, v, mask)
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # Without a mask (transformers drops it only for one query token or no cache) it is SDPA's causal.
    square = q if q_len == 1 else q[:, :, :1].expand(2, 6, 11, 16).contiguous() + torch.randn(2, 6, 11, 16)
    want_mask = None if q_len == 1 else torch.ones(11, 11, dtype=torch.bool).tril()
    out, _ = folded_sdpa(_Module(), square, k, v, None)
    torch.testing.assert_close(out, _reference(square, k, v, want_mask), atol=1e-5, rtol=1e-5)


def _cache_after(lm, ids, layer=None, room=0):
    cache = transformers.DynamicCache()
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids]), **cache_arg(lm.model, cache), use_cache=True)
    if layer is None:
        return cache
    grown = transformers.DynamicCache()
    for i, lay in enumerate(cache.layers):  # the same KV, with room for `room` more tokens
        shape = list(lay.keys.shape)
        shape[2] += room
        kb, vb = torch.zeros(shape), torch.zeros(shape)
        kb[:, :, : len(ids)], vb[:, :, : len(ids)] = lay.keys, lay.values
        if i < len(grown.layers):
            grown.layers[i] = layer(kb, vb, len(ids))
        else:
            grown.layers.append(layer(kb, vb, len(ids)))
    return grown


def test_question_over_cached_context_same_logits(lm) -> None:
    tok = lm.tokenizer
    ctx = tok("The Eiffel Tower is in Paris. It opened in 1889 for the World's Fair.")["input_ids"]
    question = tok(" When did it open? It opened in")["input_ids"]
    steps = tok(" 1889 and")["input_ids"]
    n = len(ctx)
    assert lm.model.config._attn_implementation == "sdpa"
    positions = torch.arange(n, n + len(question))[None]
    with torch.inference_mode():
        stock = _cache_after(lm, ctx)
        q_ids = torch.tensor([question])
        want = lm.model(input_ids=q_ids, **cache_arg(lm.model, stock), position_ids=positions).logits
        want_steps = [lm.model(input_ids=torch.tensor([[t]]), **cache_arg(lm.model, stock)).logits
                      for t in steps]
        grown = _cache_after(lm, ctx, growing_layer_class(), room=len(question) + 1)
        buffer = grown.layers[0]._kbuf
        with folded_attention(lm.model):
            assert lm.model.config._attn_implementation != "sdpa"
            got = lm.model(input_ids=q_ids, **cache_arg(lm.model, grown), position_ids=positions).logits
            assert grown.layers[0].keys.data_ptr() == buffer.data_ptr()  # written into the room
            got_steps = [lm.model(input_ids=torch.tensor([[t]]), **cache_arg(lm.model, grown)).logits
                         for t in steps]
    assert lm.model.config._attn_implementation == "sdpa"  # switched back
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(got_steps, want_steps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The question and the first step fit the room; the next step fell back to concatenation.
    assert len(steps) >= 2
    total = n + len(question) + len(steps)
    lay = grown.layers[0]
    assert lay.keys.shape[2] == total and grown.get_seq_length() == total and lay._kbuf is None
    torch.testing.assert_close(lay.keys, stock.layers[0].keys, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def kv_parts(lm):
    from ragcomp.kv import KVCache
    from ragcomp.types import Passage

    kv = KVCache(lm, "memory")
    passages = [Passage("eiffel", "The Eiffel Tower is a lattice tower in Paris. It was completed in 1889."),
                Passage("nile", "The Nile is a major river in Africa. It flows into the Mediterranean.")]
    kv.add(passages)
    chunks = [kv.tiers.cpu.get(kv._key(kv._fp(c))) for p in passages for c in kv.passage_chunks(p)]
    return kv, kv.engine, kv.prefix_kv(), chunks


def test_cache_over_a_slice_never_writes_into_what_follows(kv_parts) -> None:
    kv, eng, prefix, chunks = kv_parts
    asm = eng.assemble(prefix, chunks, reserve=8)
    keys, values = asm.keys.clone(), asm.values.clone()
    plen = len(prefix)
    cache = eng.make_cache(asm.keys[:, :, :plen], asm.values[:, :, :plen])  # grow not asked for
    eng.prefill(cache, kv.question_ids("Where is the Nile?"), plen)
    assert torch.equal(asm.keys, keys) and torch.equal(asm.values, values)


def test_engine_streamed_folded_with_room_matches_stock_path(kv_parts) -> None:
    kv, eng, prefix, chunks = kv_parts
    q = kv.question_ids("When was the Eiffel Tower completed?")
    asm = eng.assemble(prefix, chunks)  # exact-size buffers, stock attention, concatenating cache
    total = len(asm.ids)
    stock = eng.make_cache(asm.keys, asm.values)
    ref = eng.prefill(stock, q, total)
    ref_tokens = eng.decode(stock, ref, total + len(q), 4, [])
    assert eng.fold is False  # off by default on a CPU
    eng.fold = True
    try:
        asm2, cache, got = eng.prefill_streamed(prefix, chunks, q, reserve=len(q) + 4)
        assert asm2.ids == asm.ids and isinstance(cache.layers[0], growing_layer_class())
        tokens = eng.decode(cache, got, total + len(q), 4, [])
    finally:
        eng.fold = False
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert tokens == ref_tokens
    lay = cache.layers[0]
    assert lay._kbuf is not None and lay.keys.data_ptr() == asm2.keys[0].data_ptr()  # never copied
    assert lay.keys.shape[2] == total + len(q) + 3  # the last greedy token is not fed back
