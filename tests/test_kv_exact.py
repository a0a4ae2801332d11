"""Exact prefix reuse (`KVCache.generate`, reuse="exact", `ragcomp.kv.chain`) with the real
SmolLM2-135M-Instruct weights in fp32 on CPU: answers equal a full prefill token for token, a
second call loads the cached blocks, a broken chain is recomputed with a warning, the key
covers the system prompt, and a too-long prompt is refused before any work. Short passages
and few new tokens keep it fast on two cores."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ragcomp.kv import KVCache  # noqa: E402
from ragcomp.stores import MemoryStore  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TEXTS = {
    "moon": "The Moon is Earth's only natural satellite. It orbits at about 384,400 km.",
    "amazon": "The Amazon river in South America carries more water than any other river.",
    "wall": "The Great Wall of China was built over many centuries to protect northern borders.",
}
PASSAGES = [Passage(i, t) for i, t in TEXTS.items()]
QUESTIONS = ["How far away is the Moon?", "Which river carries the most water?",
             "Why was the Great Wall built?", "Where is the Amazon river?"]
NEW = 6


@pytest.fixture()
def kv(lm) -> KVCache:
    cache = KVCache(lm, MemoryStore())
    yield cache
    cache.close()


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2]])
def test_exact_equals_full_prefill(kv: KVCache, order: list[int]) -> None:
    ps = [PASSAGES[i] for i in order]
    for q in QUESTIONS:
        a = kv.generate(q, ps, max_new_tokens=NEW)
        b = kv.generate_full(q, ps, max_new_tokens=NEW)
        assert a.prompt_ids == b.prompt_ids == kv.prompt_ids(q, ps)
        assert a.token_ids == b.token_ids, q


def test_second_call_loads_blocks(kv: KVCache) -> None:
    first = kv.generate(QUESTIONS[0], PASSAGES, max_new_tokens=NEW)
    q_len = len(kv.question_ids(QUESTIONS[1]))
    assert first.stats.blocks_prefilled == 3 and first.stats.tokens_loaded == len(kv.prefix_ids)
    second = kv.generate(QUESTIONS[1], PASSAGES, max_new_tokens=NEW)
    s = second.stats
    assert s.blocks_loaded == 4 and s.blocks_prefilled == 0
    assert s.tokens_loaded == len(second.prompt_ids) - q_len > 0
    assert s.tokens_prefilled == q_len
    assert second.token_ids == kv.generate_full(QUESTIONS[1], PASSAGES, max_new_tokens=NEW).token_ids
    # a shared leading run is reused when later passages differ
    third = kv.generate(QUESTIONS[2], [*PASSAGES[:2], Passage("x", "Something else entirely.")],
                        max_new_tokens=NEW)
    assert third.stats.blocks_loaded == 3 and third.stats.blocks_prefilled == 1
    # from the store alone (tiers emptied)
    kv.clear_tiers()
    fourth = kv.generate(QUESTIONS[1], PASSAGES, max_new_tokens=NEW)
    assert fourth.stats.hits["store"] == 3 and fourth.token_ids == second.token_ids


def test_corrupt_middle_block_recomputed(kv: KVCache) -> None:
    ref = kv.generate_full(QUESTIONS[0], PASSAGES, max_new_tokens=NEW)
    kv.generate(QUESTIONS[0], PASSAGES, max_new_tokens=NEW)
    chunks = [c for cs in kv.layout.resolve(PASSAGES) for c in cs]
    middle = kv.chain.key(kv.chain.fingerprints(chunks)[1])
    raw = bytearray(kv.store.get(middle))
    raw[len(raw) // 2] ^= 0xFF
    kv.store.set(middle, bytes(raw))
    kv.clear_tiers()
    with pytest.warns(RuntimeWarning, match="chain broken at block 2 of 3"), \
            pytest.warns(RuntimeWarning, match="dropped 1 corrupt KV entr"):
        got = kv.generate(QUESTIONS[0], PASSAGES, max_new_tokens=NEW)
    assert got.token_ids == ref.token_ids
    assert got.stats.chain_breaks == 1 and got.stats.corrupt_entries == 1
    assert got.stats.blocks_loaded == 2 and got.stats.blocks_prefilled == 2
    # repaired: the next call loads the whole chain again
    again = kv.generate(QUESTIONS[0], PASSAGES, max_new_tokens=NEW)
    assert again.stats.blocks_prefilled == 0 and again.stats.chain_breaks == 0
    # a block missing (deleted) in the middle: the same, without a corrupt entry
    kv.store.delete(middle)
    kv.clear_tiers()
    with pytest.warns(RuntimeWarning, match="chain broken at block 2 of 3"):
        gone = kv.generate(QUESTIONS[0], PASSAGES, max_new_tokens=NEW)
    assert gone.token_ids == ref.token_ids and gone.stats.corrupt_entries == 0
    assert gone.stats.chain_breaks == 1 and gone.stats.tokens_loaded == got.stats.tokens_loaded


def test_other_system_prompt_or_model_no_reuse(lm) -> None:
    store = MemoryStore()
    with KVCache(lm, store) as a:
        a.generate(QUESTIONS[0], PASSAGES, max_new_tokens=1)
        keys_a = {a.chain.key(fp) for fp in a.chain.fingerprints(
            [c for cs in a.layout.resolve(PASSAGES) for c in cs])}
    with KVCache(lm, store, system_prompt="You answer in French.") as b:
        got = b.generate(QUESTIONS[0], PASSAGES, max_new_tokens=NEW)
        assert got.stats.blocks_prefilled == 3 and got.stats.tokens_loaded == len(b.prefix_ids)
        assert got.token_ids == b.generate_full(QUESTIONS[0], PASSAGES, max_new_tokens=NEW).token_ids
        keys_b = {b.chain.key(fp) for fp in b.chain.fingerprints(
            [c for cs in b.layout.resolve(PASSAGES) for c in cs])}
    assert not keys_a & keys_b
    # another model fingerprint (e.g. another dtype) gives other keys for the same ids
    with KVCache(lm, store) as c:
        c.engine.model_fp = "another-model"
        fps = c.chain.fingerprints([c.layout.resolve(PASSAGES)[0][0]])
        assert c.chain.key(fps[0]) not in keys_a


def test_too_long_prompt_refused(kv: KVCache) -> None:
    limit = kv.engine.config.max_position_embeddings
    long = Passage("long", "word " * (limit + 10))
    calls = []
    kv.engine.prefill = lambda *a, **k: calls.append(a)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="exceeds the model's window"):
        kv.generate(QUESTIONS[0], [long], max_new_tokens=NEW)
    with pytest.raises(ValueError, match="exceeds the model's window"):
        kv.generate_full(QUESTIONS[0], [long], max_new_tokens=NEW)
    assert not calls and not list(kv.store.keys(kv.namespace + ":chain:"))


def test_reuse_choices(kv: KVCache) -> None:
    with pytest.raises(ValueError, match="'exact', 'chunks'"):
        kv.generate(QUESTIONS[0], PASSAGES, reuse="rotate")
    with pytest.raises(ValueError, match="reuse='chunks'"):
        kv.generate(QUESTIONS[0], PASSAGES, repair="first:4")
    a = kv.generate(QUESTIONS[0], PASSAGES, max_new_tokens=2, reuse="chunks", repair="first:4")
    assert a.stats.repaired_tokens > 0 and a.stats.blocks_loaded == 0
