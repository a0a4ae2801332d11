"""KV layer pieces that need no real weights: entry bytes, checksums, quantisation, RoPE
rotation maths against transformers' own implementation, refusals, tiers and fingerprints
on a tiny random Llama."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ragcomp.kv import (  # noqa: E402
    ChunkKV,
    CorruptEntryError,
    KVEngine,
    Repair,
    UnsupportedModelError,
    check_movable,
    decode_entry,
    encode_entry,
)
from ragcomp.kv.codec import quantize  # noqa: E402
from ragcomp.kv.rope import rotate_keys  # noqa: E402
from ragcomp.kv.tiers import TensorLRU  # noqa: E402

G = torch.Generator().manual_seed(0)


def _chunk(n: int = 5, storage: str = "native") -> ChunkKV:
    k = torch.randn(2, 3, n, 8, generator=G)
    v = torch.randn(2, 3, n, 8, generator=G)
    qk, qv, ks, vs = quantize(k, v, storage)
    return ChunkKV(list(range(100, 100 + n)), qk, qv, 7, "fp-x", storage, ks, vs)


@pytest.mark.parametrize("storage", ["native", "bf16", "fp16", "fp8", "int8"])
def test_entry_roundtrip(storage: str) -> None:
    c = _chunk(storage=storage)
    back = decode_entry(encode_entry(c))
    assert back.ids == c.ids and back.base == 7 and back.fingerprint == "fp-x" and back.storage == storage
    assert torch.equal(back.keys.view(torch.uint8), c.keys.view(torch.uint8))
    assert torch.equal(back.values.view(torch.uint8), c.values.view(torch.uint8))
    if storage in ("fp8", "int8"):
        k, _ = back.dequantized(torch.float32)
        assert torch.equal(k, c.keys.to(torch.float32) * c.k_scale)


def test_quantised_sizes_and_error() -> None:
    k = torch.randn(4, 2, 64, 64, generator=G)
    v = torch.randn(4, 2, 64, 64, generator=G)
    sizes = {}
    for storage in ("bf16", "fp8", "int8"):
        qk, qv, ks, vs = quantize(k, v, storage)
        c = ChunkKV(list(range(64)), qk, qv, 0, "f", storage, ks, vs)
        sizes[storage] = c.nbytes
        dk, _ = c.dequantized(torch.float32)
        rel = ((dk - k).norm() / k.norm()).item()
        assert rel < {"bf16": 0.01, "fp8": 0.05, "int8": 0.01}[storage]
    # fp8 and int8 keep one float32 scale per 64 values: 1/16 more than half of bf16
    assert sizes["fp8"] == sizes["int8"] == pytest.approx(sizes["bf16"] * (0.5 + 1 / 32))


def test_corrupt_truncated_foreign_entries_are_detected() -> None:
    raw = bytearray(encode_entry(_chunk()))
    for bad in (
        bytes(raw[: len(raw) // 2]),  # truncated
        bytes(raw[:10]),
        b"",
        b"not a kv entry at all, just some bytes",
    ):
        with pytest.raises(CorruptEntryError):
            decode_entry(bad)
    flipped = bytearray(raw)
    flipped[-3] ^= 0x40  # one bit inside the tensor data
    with pytest.raises(CorruptEntryError, match="checksum"):
        decode_entry(bytes(flipped))


def test_rotation_matches_transformers_rope() -> None:
    """Rotating keys encoded at B by (P - B) equals applying RoPE at P directly."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = LlamaRotaryEmbedding(cfg)
    raw = torch.randn(1, 2, 6, 32, generator=G, dtype=torch.float64).float()
    for base, target in ((0, 5), (13, 4000), (900, 3)):
        pos_b = torch.arange(base, base + 6)[None]
        pos_p = torch.arange(target, target + 6)[None]
        cb, sb = rope(raw, pos_b)
        cp, sp = rope(raw, pos_p)
        _, kb = apply_rotary_pos_emb(raw, raw, cb, sb)
        _, kp = apply_rotary_pos_emb(raw, raw, cp, sp)
        moved = rotate_keys(kb, target - base, rope.inv_freq)
        # fp32 RoPE at position ~4000 is itself only good to ~1e-4 in the angle
        assert (moved - kp).abs().max().item() < 2e-3 * max(1, target / 1000)


def test_refuses_rope_that_cannot_move() -> None:
    ok = [
        {"rope_type": "default", "rope_theta": 1e4},
        {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
        {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4096},
    ]
    for params in ok:
        check_movable(transformers.LlamaConfig(rope_parameters=params, max_position_embeddings=32768))
    with pytest.raises(UnsupportedModelError, match="dynamic NTK"):
        check_movable(transformers.LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                "factor": 2.0}))
    with pytest.raises(UnsupportedModelError, match="model types"):
        check_movable(transformers.GPT2Config())
    phi3 = transformers.Phi3Config(rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 48, "long_factor": [2.0] * 48,
        "original_max_position_embeddings": 4096}, max_position_embeddings=131072)
    with pytest.raises(UnsupportedModelError):
        check_movable(phi3)


def test_tensor_lru_is_bounded_in_bytes() -> None:
    one = _chunk(4)
    lru = TensorLRU("cpu", max_bytes=one.nbytes * 2)
    for i in range(3):
        lru.put(str(i), _chunk(4))
    assert len(lru) == 2 and "0" not in lru and lru.nbytes == one.nbytes * 2
    lru.get("1")  # 1 becomes most recent, so 2 goes next
    lru.put("3", _chunk(4))
    assert "1" in lru and "2" not in lru
    big = _chunk(40)
    assert lru.put("big", big) is big and "big" not in lru  # larger than the tier: not kept


def test_repair_spec_parsing() -> None:
    assert Repair.parse(None) is None and Repair.parse("none") is None
    assert Repair.parse("first:8") == Repair("first", tokens=8)
    assert Repair.parse("deviation:0.2") == Repair("deviation", share=0.2)
    assert Repair.parse("attention:0.3") == Repair("attention", share=0.3)
    assert str(Repair.parse("attention")) == "attention:0.15" and str(Repair.parse("first:4")) == "first:4"
    with pytest.raises(ValueError, match="unknown repair 'sometimes'"):
        Repair.parse("sometimes")
    with pytest.raises(ValueError, match="'lots' is not a number"):
        Repair.parse("attention:lots")
    with pytest.raises(ValueError, match="share within"):
        Repair.parse("deviation:1.5")


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, cfg


def test_tiny_model_assembly_and_full_repair_match_full_prefill(tiny: tuple[object, object]) -> None:
    model, _ = tiny
    eng = KVEngine(model, "tiny")
    prefix = eng.encode_prefix([1, 5, 9, 11])
    texts = [[20, 21, 22, 23, 24], [30, 31, 32], [40, 41, 42, 43]]
    chunks = eng.encode_chunks(prefix, texts, batch_size=2)
    one_by_one = eng.encode_chunks(prefix, texts, batch_size=1)
    for a, b in zip(chunks, one_by_one, strict=True):
        assert (a.keys - b.keys).abs().max() < 1e-5  # right padding does not leak into real tokens
    q = [7, 8, 9]
    asm = eng.assemble(prefix, chunks)
    _, ref = eng.full_prefill(asm.ids + q)
    # exact for prefix + first chunk
    asm1 = eng.assemble(prefix, chunks[:1])
    got1 = eng.prefill(eng.make_cache(asm1.keys, asm1.values), q, len(asm1.ids))
    _, ref1 = eng.full_prefill(asm1.ids + q)
    assert (got1 - ref1).abs().max() < 1e-4
    # recomputing every later chunk token restores full attention exactly
    chosen = eng.select_for_repair(asm, Repair("deviation", share=1.0))
    assert chosen == list(range(9, 16))
    eng.repair(asm, chosen)
    got = eng.prefill(eng.make_cache(asm.keys, asm.values), q, len(asm.ids))
    assert (got - ref).abs().max() < 1e-4
    first = eng.select_for_repair(eng.assemble(prefix, chunks), Repair("first", tokens=2))
    assert first == [9, 10, 12, 13]


def test_tiny_model_question_attention_repair(tiny: tuple[object, object]) -> None:
    model, _ = tiny
    eng = KVEngine(model, "tiny")
    prefix = eng.encode_prefix([1, 5, 9, 11])
    chunks = eng.encode_chunks(prefix, [[20, 21, 22, 23, 24], [30, 31, 32], [40, 41, 42, 43]])
    q = [7, 8, 9]
    asm = eng.assemble(prefix, chunks)
    _, ref = eng.full_prefill(asm.ids + q)
    half = eng.select_for_repair(asm, Repair("attention", share=0.5), q)
    assert len(half) == 4 and half == sorted(half) and set(half) <= set(range(9, 16))  # later chunks only
    with pytest.raises(ValueError, match="question_ids"):
        eng.select_for_repair(asm, Repair("attention", share=0.5))
    everything = eng.select_for_repair(asm, Repair("attention", share=1.0), q)
    assert everything == list(range(9, 16))
    eng.repair(asm, everything)
    assert (eng.prefill(eng.make_cache(asm.keys, asm.values), q, len(asm.ids)) - ref).abs().max() < 1e-4
    with pytest.raises(ValueError, match="within the 16 context tokens"):
        eng.repair(asm, [3, 16])
    # one chunk only: nothing to repair
    assert eng.select_for_repair(eng.assemble(prefix, chunks[:1]), Repair("attention", share=1.0), q) == []


def test_fingerprints_separate_model_dtype_prefix_text(tiny: tuple[object, object]) -> None:
    model, cfg = tiny
    eng = KVEngine(model, "tiny")
    base = eng.fingerprint([1, 2], [3, 4])
    assert base == KVEngine(model, "tiny").fingerprint([1, 2], [3, 4])  # stable
    assert base != eng.fingerprint([1, 2, 0], [3, 4])  # prefix
    assert base != eng.fingerprint([1, 2], [3, 5])  # text
    assert base != KVEngine(model, "tiny", storage="fp8").fingerprint([1, 2], [3, 4])  # storage
    assert base != KVEngine(model, "other-name").fingerprint([1, 2], [3, 4])  # name
    other = transformers.LlamaForCausalLM(cfg).eval()  # same config, other weights
    assert base != KVEngine(other, "tiny").fingerprint([1, 2], [3, 4])
    half = transformers.LlamaForCausalLM(cfg).eval()
    half.load_state_dict(model.state_dict())
    assert base == KVEngine(half, "tiny").fingerprint([1, 2], [3, 4])  # same weights: same KV
    half = half.to(torch.bfloat16)
    assert base != KVEngine(half, "tiny").fingerprint([1, 2], [3, 4])  # dtype


@pytest.mark.parametrize(("storage", "packed"), [("native", False), ("native", True), ("fp8", True)])
def test_streamed_assembly_equals_chunk_by_chunk(tiny: tuple[object, object], storage: str,
                                                 packed: bool) -> None:
    """The GPU path (layer groups, gather, per-token rotation) computes what `assemble` does."""
    from ragcomp.kv.codec import pack

    model, _ = tiny
    eng = KVEngine(model, "tiny", storage=storage)
    prefix = eng.encode_prefix([1, 5, 9])
    chunks = eng.encode_chunks(prefix, [[20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43]])
    if packed:
        chunks = [pack(c, "cpu") for c in chunks[:2]] + chunks[2:]  # mixed on purpose
        assert chunks[0].packed is not None and not chunks[0].keys.is_contiguous()
    q = [7, 8]
    ref = eng.assemble(prefix, chunks)
    ref_logits = eng.prefill(eng.make_cache(ref.keys, ref.values), q, len(ref.ids))
    asm, _, logits = eng.prefill_streamed(prefix, chunks, q, groups=2)  # 3 layers: groups of 2 and 1
    assert asm.ids == ref.ids and asm.spans == ref.spans
    # same operations in the same order: identical bits, not just close
    assert torch.equal(asm.keys, ref.keys) and torch.equal(asm.values, ref.values)
    assert torch.equal(logits, ref_logits)
