"""KV reuse with the real SmolLM2-135M-Instruct weights in fp32: exactness of reuse and of
moving, fingerprints, and faults (store down, corrupt or truncated entries). Chunks are
kept short so the whole file runs in well under a minute on two CPU cores."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ragcomp.hf_cache import cache_arg  # noqa: E402
from ragcomp.kv import KVCache, KVEngine  # noqa: E402
from ragcomp.stores import MemoryStore  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


PASSAGES = [
    Passage("eiffel", "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889."),
    Passage("nile", "The Nile is a major north-flowing river in Africa. It flows into the Mediterranean."),
    Passage("everest", "Mount Everest is the highest mountain above sea level, in the Himalayas of Nepal."),
]
QUESTION = "When was the Eiffel Tower completed?"
NEW = 3


@pytest.fixture(scope="module")
def kv(lm) -> KVCache:
    cache = KVCache(lm, "memory")
    cache.add(PASSAGES)
    return cache


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = p_logits.double().log_softmax(-1)
    q = q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def test_exact_prefix_reuse_matches_full_prefill(kv: KVCache) -> None:
    eng = kv.engine
    prefix = kv.prefix_kv()
    chunk = kv.tiers.cpu.get(kv._key(kv._fp(kv.passage_chunks(PASSAGES[0])[0])))
    assert chunk is not None and chunk.base == len(prefix)
    asm = eng.assemble(prefix, [chunk])
    q = kv.question_ids(QUESTION)
    got = eng.prefill(eng.make_cache(asm.keys, asm.values), q, len(asm.ids))
    _, ref = eng.full_prefill(asm.ids + q)
    assert (got - ref).abs().max().item() <= 1e-4
    # and through the public API: same prompt ids, same greedy answer
    a = kv.generate(QUESTION, ["eiffel"], max_new_tokens=NEW, reuse="chunks")
    b = kv.generate_full(QUESTION, ["eiffel"], max_new_tokens=NEW)
    assert a.prompt_ids == b.prompt_ids and a.token_ids == b.token_ids
    assert a.stats.hits["cpu"] == 2 and a.stats.misses == 0  # prefix + chunk


@pytest.mark.parametrize("shift", [45, 1500])
def test_moved_chunk_matches_direct_encoding_at_that_offset(kv: KVCache, shift: int) -> None:
    """Prefix + chunk precomputed at the start, moved by `shift`, against the same prefix and
    chunk encoded directly `shift` positions later: next-token KL <= 1e-6."""
    eng = kv.engine
    prefix = kv.prefix_kv()
    ids = kv.passage_chunks(PASSAGES[1])[0]
    chunk = eng.encode_chunks(prefix, [ids])[0]
    n_p, n = len(prefix), len(ids)
    q = kv.question_ids("Where does the Nile flow?")
    # direct: the same tokens encoded from position `shift`
    direct = eng.make_cache()
    with torch.inference_mode():
        eng.decoder(input_ids=torch.tensor([prefix.ids + ids]),
                    position_ids=torch.arange(shift, shift + n_p + n)[None], **cache_arg(eng.decoder, direct),
                    use_cache=True)
    ref = eng.prefill(direct, q, shift + n_p + n)
    # moved: stored KV rotated by `shift`
    keys, values = eng.new_buffers(shift + n_p + n)
    eng.place(keys, values, prefix, shift)
    eng.place(keys, values, chunk, shift + n_p)
    moved = eng.make_cache(keys[:, :, shift:].contiguous(), values[:, :, shift:].contiguous())
    got = eng.prefill(moved, q, shift + n_p + n)
    assert _kl(ref, got) <= 1e-6
    # without the rotation the logits are clearly off: the test can tell
    unrotated = eng.make_cache(torch.cat([prefix.keys, chunk.keys], 2),
                               torch.cat([prefix.values, chunk.values], 2))
    assert _kl(ref, eng.prefill(unrotated, q, shift + n_p + n)) > 1e-3


def test_fingerprint_never_returns_kv_for_other_prefix_text_or_entry(lm) -> None:
    # Other model weights, names, dtypes and storage kinds: test_kv_units (tiny random Llama).
    store = MemoryStore()
    a = KVCache(lm, store)
    a.add(PASSAGES[:2])
    n_entries = len(store)
    # same everything: served from the store
    b = KVCache(lm, store)
    ans = b.generate(QUESTION, ["eiffel", "nile"], max_new_tokens=1, reuse="chunks")
    assert ans.stats.hits["store"] == 3 and ans.stats.misses == 0
    # other prefix (system prompt) -> other keys; nothing reused
    c = KVCache(lm, store, system_prompt="You are a terse assistant.")
    assert c.generate(QUESTION, PASSAGES[:2], max_new_tokens=1, reuse="chunks").stats.hits["store"] == 0
    # other text under the same passage id -> recomputed, never the old KV
    edited = Passage("eiffel", PASSAGES[0].text.replace("1889", "1887"))
    s = b.generate(QUESTION, [edited], max_new_tokens=1, reuse="chunks").stats
    assert s.hits["store"] + s.hits["cpu"] == 1 and s.misses == 1  # only the prefix was reused
    # a foreign entry planted under the right key is refused (fingerprint inside the entry)
    e = KVCache(lm, MemoryStore())
    e.add(PASSAGES[:1])
    good_key = e._key(e._fp(e.passage_chunks(PASSAGES[0])[0]))
    other_key = e._key(e._fp(e.passage_chunks(PASSAGES[2])[0]))
    e.store.set(other_key, e.store.get(good_key))
    e.clear_tiers()
    s = e.generate("Which is the highest mountain?", [PASSAGES[2]], max_new_tokens=1, reuse="chunks").stats
    assert s.hits["store"] == 0 and s.misses == 1
    assert n_entries > 0


def test_store_tiers_disk_and_repeat(lm, tmp_path: Path) -> None:
    kv = KVCache(lm, f"disk:{tmp_path / 'kv'}")
    kv.add(PASSAGES)
    kv.clear_tiers()
    first = kv.generate(QUESTION, ["nile", "eiffel", "everest"], max_new_tokens=NEW, reuse="chunks")
    assert first.stats.hits["store"] == 3 and first.stats.bytes_loaded["store"] > 0
    again = kv.generate(QUESTION, ["nile", "eiffel", "everest"], max_new_tokens=NEW, reuse="chunks")
    assert again.stats.hits["cpu"] == 4 and again.stats.hits["store"] == 0
    assert first.token_ids == again.token_ids
    # a new process finds the passages by id through the store's index
    other = KVCache(lm, f"disk:{tmp_path / 'kv'}")
    third = other.generate(QUESTION, ["nile", "eiffel", "everest"], max_new_tokens=NEW, reuse="chunks")
    assert third.token_ids == first.token_ids and third.stats.misses == 0
    with pytest.raises(KeyError, match="never added"):
        other.generate(QUESTION, ["no-such-id"])


def test_corrupt_and_truncated_entries_are_dropped_and_recomputed(lm) -> None:
    store = MemoryStore()
    kv = KVCache(lm, store)
    kv.add(PASSAGES[:2])
    ref = kv.generate(QUESTION, ["eiffel", "nile"], max_new_tokens=NEW, reuse="chunks")
    key0 = kv._key(kv._fp(kv.passage_chunks(PASSAGES[0])[0]))
    key1 = kv._key(kv._fp(kv.passage_chunks(PASSAGES[1])[0]))
    raw = store.get(key0)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    store.set(key0, bytes(flipped))
    store.set(key1, store.get(key1)[:1000])  # half-written
    kv.clear_tiers()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        ans = kv.generate(QUESTION, ["eiffel", "nile"], max_new_tokens=NEW, reuse="chunks")
    assert ans.stats.corrupt_entries == 2 and ans.stats.misses == 2
    assert ans.token_ids == ref.token_ids
    # recomputed entries were written back and read cleanly next time
    kv.clear_tiers()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = kv.generate(QUESTION, ["eiffel", "nile"], max_new_tokens=NEW, reuse="chunks")
    assert again.stats.hits["store"] == 2 and again.token_ids == ref.token_ids


@pytest.mark.redis
def test_redis_tier_and_redis_side_corruption(lm, redis_url: str) -> None:
    redis = pytest.importorskip("redis")
    from ragcomp.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix="test-kv-smollm2:")
    store.clear()
    kv = KVCache(lm, store, storage="fp8")
    kv.add(PASSAGES)
    kv.clear_tiers()
    ans = kv.generate(QUESTION, ["eiffel", "nile", "everest"], max_new_tokens=NEW, reuse="chunks")
    assert ans.stats.hits["store"] == 3
    assert ans.prompt_ids == kv.prompt_ids(QUESTION, ["eiffel", "nile", "everest"])
    # damage the bytes inside Redis behind the store's back: its checksum catches it
    key = kv._key(kv._fp(kv.passage_chunks(PASSAGES[0])[0]))
    raw = redis.Redis.from_url(redis_url)
    names = [n for n in raw.scan_iter(match="test-kv-smollm2:*") if key.encode() in n]
    biggest = max(names, key=lambda n: raw.strlen(n))
    raw.setrange(biggest, raw.strlen(biggest) // 2, b"\xff\x00\xff")
    kv.clear_tiers()
    again = kv.generate(QUESTION, ["eiffel", "nile", "everest"], max_new_tokens=NEW, reuse="chunks")
    assert again.stats.misses == 1 and again.stats.hits["store"] == 2
    assert again.token_ids == ans.token_ids
    store.clear()
    raw.close()


@pytest.mark.redis
def test_redis_down_answers_still_come_with_a_warning(lm, tmp_path: Path) -> None:
    pytest.importorskip("redis")
    from ragcomp.stores.redis import local_redis_server

    with local_redis_server(tmp_path / "redis") as url:
        kv = KVCache(lm, url, retry_after=0.0)
        kv.add(PASSAGES[:2])
        ref = kv.generate(QUESTION, ["eiffel", "nile"], max_new_tokens=NEW)
    # the server is gone now
    kv.clear_tiers()
    with pytest.warns(RuntimeWarning, match="unavailable"):
        ans = kv.generate(QUESTION, ["eiffel", "nile"], max_new_tokens=NEW)
    assert ans.token_ids == ref.token_ids and ans.stats.misses == 2 and ans.stats.store_errors >= 1
    # down from the start: construction warns, answers are computed
    with pytest.warns(RuntimeWarning, match="unavailable"):
        cold = KVCache(lm, url)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        ans = cold.generate(QUESTION, PASSAGES[:2], max_new_tokens=NEW)
    assert ans.token_ids == ref.token_ids


@pytest.mark.redis
def test_redis_cluster_store(lm, redis_cluster_urls: list[str]) -> None:
    pytest.importorskip("redis")
    url = redis_cluster_urls[0].replace("redis://", "redis+cluster://")
    kv = KVCache(lm, url, namespace="test-kv-cluster")
    kv.add(PASSAGES)
    kv.clear_tiers()
    other = KVCache(lm, url, namespace="test-kv-cluster")
    ans = other.generate(QUESTION, ["eiffel", "nile", "everest"], max_new_tokens=2, reuse="chunks")
    assert ans.stats.hits["store"] == 4 and ans.stats.misses == 0  # prefix + 3 chunks


def test_repair_options_and_refusal(kv: KVCache) -> None:
    full = kv.generate_full(QUESTION, ["nile", "everest", "eiffel"], max_new_tokens=NEW)
    exact = kv.generate(QUESTION, ["nile", "everest", "eiffel"], max_new_tokens=NEW,
                        repair="deviation:1.0", reuse="chunks")
    assert exact.token_ids == full.token_ids  # recomputing every later-chunk token is a full prefill
    later = [PASSAGES[2], PASSAGES[0]]  # every chunk after the first one in the prompt
    n_later = sum(len(c) for p in later for c in kv.passage_chunks(p))
    assert exact.stats.repaired_tokens == n_later
    first = kv.generate(QUESTION, ["nile", "everest", "eiffel"], max_new_tokens=NEW,
                        repair="first:4", reuse="chunks")
    assert first.stats.repaired_tokens == 8 and first.text
    assert isinstance(kv.engine, KVEngine)
    # the question-attention selection gets the question's ids through generate()
    by_question = kv.generate(QUESTION, ["nile", "everest", "eiffel"], max_new_tokens=NEW,
                              repair="attention:1.0", reuse="chunks")
    assert by_question.token_ids == full.token_ids and by_question.stats.repaired_tokens == n_later


ORDERS = [(QUESTION, ["nile", "everest", "eiffel"]),
          ("Where does the Nile flow?", ["everest", "eiffel", "nile"]),
          ("Which is the highest mountain?", ["eiffel", "nile", "everest"])]


@pytest.mark.parametrize(("question", "order"), ORDERS)
def test_repair_logits_full_recompute_exact_and_partial_closer(kv: KVCache, question: str,
                                                               order: list[str]) -> None:
    """Next-token logits on the same prompt ids: assembled KV differs from a full prefill
    (chunks never saw each other); recomputing every later token gives the full prefill
    back; recomputing the 30% of tokens whose keys deviate most brings it closer."""
    from ragcomp.bench.kv_quality import first_token_logits, kl_divergence

    _, ref = kv.engine.full_prefill(kv.prompt_ids(question, order))
    kl = {r: kl_divergence(ref, first_token_logits(kv, question, order, r))
          for r in ("none", "deviation:1.0", "attention:1.0", "deviation:0.3")}
    assert kl["none"] > 1e-2  # the test can tell assembled KV from a full prefill
    assert kl["deviation:1.0"] <= 1e-8 and kl["attention:1.0"] <= 1e-8
    assert kl["deviation:0.3"] < 0.75 * kl["none"]
