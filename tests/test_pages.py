"""KV page retrieval over long documents (ragcomp.kv.pages): paging, scoring maths, exactness of
the all-pages path against a plain prefill, retrieval of a planted fact, the store path (a second
cache reads only the kept pages), bad input, the CLI, and a tiny random Llama saved locally.
Documents are kept to ~1k tokens so the SmolLM2 part runs in well under a minute on 2 cores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ragcomp.kv import KVCache, KVEngine  # noqa: E402
from ragcomp.kv import pages as pages_mod  # noqa: E402
from ragcomp.kv.pages_score import (  # noqa: E402
    attention_page_scores,
    attention_token_mass,
    encode_document,
    page_bounds,
    question_queries,
    score_keys,
    select_pages,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_summaries_en.json"
NEEDLE = "The vault code of the Zorblat Museum in Quillmere is 7314."
QUESTION = "What is the vault code of the Zorblat Museum?"
NEW = 16


def _tiny_llama(vocab: int = 120, max_pos: int = 512) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_pos)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


# -- pieces without real weights -----------------------------------------------------------------


def test_page_bounds_and_selection() -> None:
    assert page_bounds(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert page_bounds(10, 64) == [(0, 10)]
    with pytest.raises(ValueError, match="page_tokens"):
        page_bounds(10, 0)
    lengths = [64, 64, 64, 64, 20]
    scores = [0.1, 0.9, 0.5, 0.8, -5.0]
    # last page always, then the best while they fit; document order
    assert select_pages(scores, lengths, 83) == [4]
    assert select_pages(scores, lengths, 84) == [1, 4]
    assert select_pages(scores, lengths, 147) == [1, 4]
    assert select_pages(scores, lengths, 148) == [1, 3, 4]
    assert select_pages(scores, lengths, None) == [0, 1, 2, 3, 4]
    assert select_pages(scores, lengths, 10_000) == [0, 1, 2, 3, 4]
    assert select_pages([], [], 100) == []
    with pytest.raises(ValueError, match="page scores"):
        select_pages([1.0], lengths, 100)


def test_attention_scores_follow_the_query_not_what_every_query_likes() -> None:
    g = torch.Generator().manual_seed(0)
    layers, heads, dim, page = 2, 2, 16, 8
    q = torch.randn(layers, 4, 3, dim, generator=g)  # 4 query heads over 2 KV heads
    doc = torch.randn(layers, heads, 5 * page, dim, generator=g) * 0.1
    prefix = torch.randn(layers, heads, 4, dim, generator=g) * 0.1
    # page 3 holds keys aligned with the question's queries
    doc[:, :, 3 * page : 3 * page + 2] = q.reshape(layers, heads, -1, dim).mean(2, keepdim=True) * 3
    # page 0 holds keys a content-free question attends to just as much (a sink-like token)
    null = torch.randn(layers, 4, 2, dim, generator=g)
    sink = (q.reshape(layers, heads, -1, dim).mean(2) + null.reshape(layers, heads, -1, dim).mean(2)) * 3
    doc[:, :, 0] = sink
    mass = attention_token_mass(q, prefix, doc)
    assert mass.shape == (5 * page,) and float(mass.sum()) <= 1.0 + 1e-5
    prior = attention_token_mass(null, prefix, doc)
    raw = attention_page_scores(mass, torch.zeros_like(mass), page)
    calibrated = attention_page_scores(mass, prior, page)
    assert calibrated.shape == (5,)
    assert int(calibrated.argmax()) == 3
    assert raw[0] > calibrated[0]  # the prior takes away what any question would draw


@pytest.fixture(scope="module")
def tiny_engine() -> KVEngine:
    return KVEngine(_tiny_llama(), "tiny-llama")


def test_chunked_prefill_equals_one_pass_and_unrotated_projections(tiny_engine: KVEngine) -> None:
    eng = tiny_engine
    prefix = eng.encode_prefix([1, 2, 3, 4, 5])
    doc = torch.randint(6, 120, (53,), generator=torch.Generator().manual_seed(1)).tolist()
    k1, v1 = encode_document(eng, prefix, doc, prefill_chunk=7)
    k2, v2 = encode_document(eng, prefix, doc, prefill_chunk=1000)
    assert k1.shape == (3, 2, 53, 16)
    assert (k1 - k2).abs().max() < 1e-5 and (v1 - v2).abs().max() < 1e-5
    cache, _ = eng.full_prefill(prefix.ids + doc)
    assert (cache.layers[2].keys[0, :, 5:] - k1[2]).abs().max() < 1e-5
    # Layer 0 sees no context: without RoPE its keys and queries are the plain projections.
    layer0 = eng.decoder.layers[0]
    with torch.inference_mode():
        h = layer0.input_layernorm(eng.decoder.embed_tokens(torch.tensor(doc)))
        want_k = layer0.self_attn.k_proj(h).view(53, 2, 16).transpose(0, 1)
        sk = score_keys(eng, k1, [0, 2], len(prefix))
        assert sk.dtype == torch.float16 and sk.shape == (2, 2, 53, 16)
        assert (sk[0].float() - want_k).abs().max() < 2e-3  # fp16 storage
        q = question_queries(eng, prefix, doc[:6], [0])
        want_q = layer0.self_attn.q_proj(h[:6]).view(6, 4, 16).transpose(0, 1)
        assert q.shape == (1, 4, 6, 16) and (q[0] - want_q).abs().max() < 1e-5


def test_document_longer_than_the_model_window_is_refused() -> None:
    eng = KVEngine(_tiny_llama(max_pos=40), "tiny-short")
    prefix = eng.encode_prefix([1, 2, 3])
    with pytest.raises(ValueError, match="trained for 40"):
        encode_document(eng, prefix, list(range(10, 60)))
    with pytest.raises(ValueError, match="empty"):
        encode_document(eng, prefix, [])


# -- SmolLM2 -------------------------------------------------------------------------------------


def _filler(n: int, seed: int = 0) -> list[str]:
    if not WIKI.exists():
        pytest.skip("../shared/data not present")
    data = json.loads(WIKI.read_text(encoding="utf-8"))
    titles = random.Random(seed).sample(sorted(data), n)
    return [f"{t}\n{data[t]['extract']}" for t in titles]


@pytest.fixture(scope="module")
def needle_doc() -> str:
    parts = _filler(6)
    parts.insert(3, NEEDLE)
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def kv(lm, needle_doc: str) -> KVCache:
    cache = KVCache(lm, "memory")
    cache.add_long("needle", needle_doc)
    return cache


def _reference(kv: KVCache, prompt_ids: list[int], new: int = NEW) -> list[int]:
    """Greedy tokens of a plain prefill of the same prompt ids."""
    cache, logits = kv.engine.full_prefill(prompt_ids)
    return kv.engine.decode(cache, logits, len(prompt_ids), new, kv.stop_ids)


@pytest.mark.slow
def test_all_pages_answer_equals_a_plain_prefill(kv: KVCache) -> None:
    doc = kv.long_documents().document("needle")
    assert doc.n_pages == -(-len(doc.ids) // 64) and 300 < len(doc.ids) < 1200
    full = kv.ask_long(QUESTION, "needle", None, max_new_tokens=NEW)
    s = full.stats
    assert full.prompt_ids == kv.prefix_ids + doc.ids + kv.question_ids(QUESTION)
    assert full.token_ids == _reference(kv, full.prompt_ids)
    assert s.pages_kept == s.pages_total == doc.n_pages and s.kept_tokens == len(doc.ids)
    assert s.bytes_pages == s.bytes_all_pages > 0 and s.bytes_score == 0
    # a budget covering the document is the same call
    same = kv.ask_long(QUESTION, "needle", len(doc.ids) + 1, max_new_tokens=NEW)
    assert same.token_ids == full.token_ids and same.stats.kept_pages == list(range(doc.n_pages))


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["attention", "embedding", "hybrid"])
def test_pages_holding_the_planted_fact_are_kept(kv: KVCache, scoring: str) -> None:
    docs = kv.long_documents()
    doc = docs.document("needle")
    ans = kv.ask_long(QUESTION, "needle", 192, scoring=scoring, max_new_tokens=NEW)
    s = ans.stats
    assert s.kept_tokens <= 192 and s.pages_kept == len(s.kept_pages) <= 3
    assert s.kept_pages[-1] == doc.n_pages - 1 and s.kept_pages == sorted(s.kept_pages)
    texts = docs.page_texts(doc)
    assert "7314" in "".join(texts[i] for i in s.kept_pages)
    assert "7314" in ans.text
    # kept pages were moved next to each other: the prompt is prefix + kept page ids + question
    kept_ids = [t for i in s.kept_pages for t in doc.ids[doc.bounds[i][0] : doc.bounds[i][1]]]
    assert ans.prompt_ids == kv.prefix_ids + kept_ids + kv.question_ids(QUESTION)
    assert 0 < s.bytes_pages < s.bytes_all_pages / 2 and s.bytes_score > 0
    assert s.seconds_score > 0 and s.ttft >= s.seconds_score


@pytest.mark.slow
def test_bad_input(kv: KVCache) -> None:
    with pytest.raises(KeyError, match="'nope' was never added"):
        kv.ask_long(QUESTION, "nope", 256)
    with pytest.raises(ValueError, match="smaller than one page"):
        kv.ask_long(QUESTION, "needle", 63)
    with pytest.raises(ValueError, match="scoring must be one of"):
        kv.ask_long(QUESTION, "needle", 256, scoring="bm25")
    with pytest.raises(TypeError, match="page_budget_tokens"):
        kv.ask_long(QUESTION, "needle", 256.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        kv.add_long("blank", "   ")
    with pytest.raises(ValueError, match="question"):
        kv.ask_long("  ", "needle", 256)
    # A question longer than the budget: the budget counts document tokens; the question is whole.
    long_q = "Please read everything carefully. " * 30 + QUESTION
    ans = kv.ask_long(long_q, "needle", 64, scoring="embedding", max_new_tokens=NEW)
    assert ans.stats.question_tokens > 64 and ans.stats.kept_tokens <= 64 and ans.stats.pages_kept == 1
    # A document shorter than one page: one (short) page, kept whole, same as a plain prefill.
    kv.add_long("short", NEEDLE)
    short = kv.ask_long(QUESTION, "short", 64, scoring="hybrid", max_new_tokens=NEW)
    assert short.stats.pages_total == 1 and short.stats.kept_pages == [0]
    assert short.token_ids == _reference(kv, short.prompt_ids)
    assert "7314" in short.text


@pytest.mark.slow
def test_store_path_reads_only_kept_pages_and_never_reencodes(lm, kv: KVCache, needle_doc: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    want = kv.ask_long(QUESTION, "needle", 192, scoring="attention", max_new_tokens=NEW)

    def no_encoding(*_: object, **__: object) -> None:
        raise AssertionError("the document was encoded again")

    monkeypatch.setattr(pages_mod, "encode_document", no_encoding)
    other = KVCache(lm, kv.store)  # another process: empty tiers, the same store
    got = other.ask_long(QUESTION, "needle", 192, scoring="attention", max_new_tokens=NEW)
    s = got.stats
    assert got.token_ids == want.token_ids and s.kept_pages == want.stats.kept_pages
    assert s.misses == 0 and s.hits["store"] == s.pages_kept + 1  # kept pages + the prefix
    assert 0 < s.bytes_loaded["store"] < s.bytes_all_pages / 2
    other.add_long("needle", needle_doc)  # already stored: nothing to encode


@pytest.mark.slow
def test_evicted_pages_are_encoded_again(lm) -> None:
    cache = KVCache(lm, None)  # tiers only, nothing to fall back on
    cache.add_long("small", "\n\n".join([*_filler(2, seed=1), NEEDLE]))
    want = cache.ask_long(QUESTION, "small", 128, scoring="embedding", max_new_tokens=NEW)
    cache.clear_tiers()
    got = cache.ask_long(QUESTION, "small", 128, scoring="embedding", max_new_tokens=NEW)
    assert got.stats.misses == got.stats.pages_kept > 0
    assert got.token_ids == want.token_ids


@pytest.mark.slow
def test_cli_ask_long(lm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ragcomp.cli import main

    path = tmp_path / "doc.txt"
    path.write_text("\n\n".join([NEEDLE, *_filler(2, seed=2)]), encoding="utf-8")
    rc = main(["kv", "ask", QUESTION, "--long", str(path), "--store", "memory", "--device", "cpu",
               "--dtype", "fp32", "--page-budget", "128", "--scoring", "embedding",
               "--max-new-tokens", str(NEW), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["document"] == "doc.txt" and "7314" in out["answer"]
    assert out["stats"]["pages_kept"] <= 2 and out["stats"]["bytes_touched"] > 0
    rc = main(["kv", "ask", QUESTION, "--long", str(tmp_path / "missing.txt"), "--store", "memory"])
    assert rc == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_llama_saved_locally(lm, tmp_path: Path) -> None:
    """Any Llama-family checkpoint directory works (here a random one with SmolLM2's tokenizer)."""
    model = _tiny_llama(vocab=len(lm.tokenizer), max_pos=2048)
    model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    kv = KVCache(str(tmp_path), "memory", device="cpu", dtype="fp32")
    text = " ".join(f"Fact {i}: the colour of box {i} is shade {i * 7}." for i in range(40))
    doc = kv.add_long("boxes", text, page_tokens=32)
    assert doc.n_pages > 6 and kv.long_documents().score_layers == [1, 2]
    full = kv.ask_long("What colour is box 3?", "boxes", None, max_new_tokens=4)
    assert full.token_ids == _reference(kv, full.prompt_ids, 4)
    for scoring in ("attention", "hybrid"):
        ans = kv.ask_long("What colour is box 3?", "boxes", 96, scoring=scoring, max_new_tokens=4)
        assert ans.stats.kept_tokens <= 96 and ans.stats.kept_pages[-1] == doc.n_pages - 1
        assert len(ans.token_ids) <= 4
