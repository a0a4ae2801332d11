"""The compressor interface, registry, pipeline, budget and the first two methods."""

import asyncio
from pathlib import Path

import pytest

import ragcomp
from ragcomp import Passage, Pipeline, TokenBudget, load_compressor
from ragcomp.compressors.recomp_extractive import RecompExtractive
from ragcomp.embeddings import CachedEmbedder
from ragcomp.stores import MemoryStore
from ragcomp.tokens import get_counter

PASSAGES = [
    Passage("paris", "Paris is the capital of France. It has many museums. The Seine flows through it.",
            0.5, {"source": "a"}),
    Passage("cats", "Cats are small carnivorous mammals. They are popular pets.", 0.4, {"source": "b"}),
    Passage("berlin", "Berlin is the capital of Germany. It is known for its art scene.", 0.3,
            {"source": "c"}),
]


@pytest.fixture(scope="module")
def embedder() -> CachedEmbedder:
    return CachedEmbedder("minilm", device="cpu")


def test_unknown_method_names_close_match_and_list() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'recomp-extractve'.*Did you mean 'recomp-extr"):
        load_compressor("recomp-extractve")


def test_unknown_parameter_is_named() -> None:
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) 'topk' for method 'recomp-extractive'"):
        load_compressor("recomp-extractive", topk=3)


def test_unknown_model_name_is_a_clear_error() -> None:
    comp = load_compressor("rerank", model="no-such-org/no-such-model-xyz")
    with pytest.raises(OSError, match="could not load model 'no-such-org/no-such-model-xyz'"):
        comp.compress("q", ["text"])


def test_registry_lists_builtins_and_user_methods() -> None:
    @ragcomp.register("keep-first")
    class KeepFirst(ragcomp.Compressor):
        def _compress(self, query, passages):
            return [ragcomp.Compressed.whole(p) if i == 0 else ragcomp.Compressed.dropped(p)
                    for i, p in enumerate(passages)]

    assert {"rerank", "recomp-extractive", "budget", "keep-first"} <= set(ragcomp.available_methods())
    res = load_compressor("keep-first").compress("q", ["a b", "c d"])
    assert res.context == "a b" and [c.kept for c in res.items] == [True, False]


def test_extractive_keeps_relevant_sentences_in_document_order(embedder: CachedEmbedder) -> None:
    comp = RecompExtractive(embedder, top_k=2, threshold=0.0, passage_weight=0.0)
    res = comp.compress("What is the capital of France?", PASSAGES)
    kept = res.kept
    assert not res.empty
    assert "Paris is the capital of France." in res.context
    assert sum(len(c.spans) for c in kept) == 2
    for c in res.items:
        for a, b in c.spans:  # spans point into the ORIGINAL passage text
            assert c.passage.text[a:b] in c.text
        spans = c.spans
        assert spans == sorted(spans)
    # Passages keep their own metadata; dropped passages come back flagged, not merged.
    by_id = {c.passage.id: c for c in res.items}
    assert by_id["paris"].passage.metadata == {"source": "a"}
    assert len(res.items) == 3
    assert res.tokens_out < res.tokens_in


def test_threshold_above_every_score_gives_empty(embedder: CachedEmbedder) -> None:
    res = RecompExtractive(embedder, threshold=0.99).compress("capital of France", PASSAGES)
    assert res.empty and res.context == "" and res.kept == [] and res.tokens_out == 0


def test_empty_inputs_are_degenerate_not_errors(embedder: CachedEmbedder) -> None:
    comp = RecompExtractive(embedder)
    res = comp.compress("anything", [])
    assert res.empty and res.context == "" and res.items == []
    res = comp.compress("anything", ["", "   \n "])
    assert res.empty and res.context == "" and len(res.items) == 2
    res = comp.compress("", PASSAGES)  # empty query: still a valid (if weak) selection
    assert isinstance(res.context, str)


def test_bad_arguments_raise_clear_errors(embedder: CachedEmbedder) -> None:
    with pytest.raises(TypeError, match="query must be str"):
        RecompExtractive(embedder).compress(None, PASSAGES)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a single item"):
        RecompExtractive(embedder).compress("q", "one string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        RecompExtractive(embedder, top_k=-1)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 0"):
        TokenBudget(-5)


def test_long_passage_and_mixed_scripts(embedder: CachedEmbedder) -> None:
    long_text = ("The quick brown fox jumps over the lazy dog. " * 2300)[:100_000]
    mixed = "東京は日本の首都です。Tokyo is the capital of Japan. Токио — столица Японии."
    res = RecompExtractive(embedder, top_k=2, threshold=None, passage_weight=0.0).compress(
        "What is the capital of Japan?", [long_text, mixed]
    )
    assert len(long_text) == 100_000
    assert "Tokyo is the capital of Japan." in res.context
    assert res.tokens_out < 100


def test_embedding_cache_embeds_each_sentence_once_across_queries() -> None:
    emb = CachedEmbedder("minilm", store=MemoryStore(), device="cpu")
    comp = RecompExtractive(emb)
    comp.compress("capital of France?", PASSAGES)
    misses = emb.misses
    comp.compress("capital of Germany?", PASSAGES)
    assert emb.misses == misses + 1  # only the new query was embedded
    comp.compress("capital of France?", PASSAGES)
    assert emb.misses == misses + 1


def test_corrupt_cached_embedding_is_recomputed() -> None:
    store = MemoryStore()
    emb = CachedEmbedder("minilm", store=store, device="cpu")
    good = emb.embed(["hello world"])[0]
    key = next(store.keys())
    store.set(key, b"\x00\x01")  # truncated entry
    again = emb.embed(["hello world"])[0]
    assert (abs(good - again) < 1e-6).all()
    assert len(store.get(key)) == 4 * emb.dim


def test_batch_equals_single_and_async(embedder: CachedEmbedder) -> None:
    comp = RecompExtractive(embedder)
    queries = ["capital of France?", "what pets are popular?"]
    batch = comp.compress_batch(queries, [PASSAGES, PASSAGES])
    single = [comp.compress(q, PASSAGES) for q in queries]
    assert [r.context for r in batch] == [r.context for r in single]
    res = asyncio.run(comp.acompress(queries[1], PASSAGES))
    assert res.context == single[1].context
    with pytest.raises(ValueError, match="2 queries but 1 passage lists"):
        comp.compress_batch(queries, [PASSAGES])


def test_rerank_orders_and_cuts(embedder: CachedEmbedder) -> None:
    comp = load_compressor("rerank", model=embedder, top_n=1)
    res = comp.compress("Which city is Germany's capital?", PASSAGES)
    assert [c.passage.id for c in res.kept] == ["berlin"]
    assert res.items[0].passage.id == "berlin"
    assert res.items[0].score >= res.items[1].score >= res.items[2].score


@pytest.mark.parametrize("tokenizer", ["whitespace", "cl100k"])
@pytest.mark.parametrize("budget", [0, 1, 7, 15, 40, 1000])
def test_budget_guarantees_fit(tokenizer: str, budget: int) -> None:
    counter = get_counter(tokenizer)
    for truncate in ("sentences", "tokens", "none"):
        res = TokenBudget(budget, tokenizer=tokenizer, truncate=truncate).compress("q", PASSAGES)
        assert counter.count(res.context) <= budget
        assert res.tokens_out <= budget
        if budget == 0:
            assert res.empty and res.context == ""
        if budget == 1000:
            assert len(res.kept) == 3


def test_budget_sentence_truncation_keeps_whole_sentences() -> None:
    res = TokenBudget(20, truncate="sentences").compress("q", PASSAGES)
    assert res.context.startswith(PASSAGES[0].text)
    last = res.kept[-1]
    assert last.passage.id == "cats" and last.text == "Cats are small carnivorous mammals."
    assert last.spans == [(0, len(last.text))]


def test_pipeline_composes_spans_to_original(embedder: CachedEmbedder) -> None:
    pipe = Pipeline([
        load_compressor("rerank", model=embedder, top_n=2),
        RecompExtractive(embedder, top_k=3, threshold=None),
        TokenBudget(12),
    ])
    res = pipe.compress("What is the capital of France and its river?", PASSAGES)
    assert get_counter("whitespace").count(res.context) <= 12
    assert [s.name for s in res.steps] == ["rerank", "recomp-extractive", "budget"]
    for c in res.kept:
        original = next(p for p in PASSAGES if p.id == c.passage.id)
        assert c.passage is original
        assert " ".join(original.text[a:b] for a, b in c.spans) == c.text
    assert len(res.items) == 3  # dropped passages still reported once


def test_rerank_loads_a_cross_encoder_checkpoint(tmp_path) -> None:
    """A tiny random BERT cross-encoder saved in the sentence-transformers layout loads by
    path; its scores (not the embedder's) decide the order."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ragcomp.models import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    expected = CrossEncoder(str(tmp_path), device="cpu").predict(
        [("capital of France?", p.text) for p in PASSAGES])
    res = load_compressor("rerank", cross_encoder=str(tmp_path), top_n=2, device="cpu").compress(
        "capital of France?", PASSAGES)
    order = sorted(range(3), key=lambda i: -expected[i])
    assert [c.passage.id for c in res.items] == [PASSAGES[i].id for i in order]
    assert [c.kept for c in res.items] == [True, True, False]
    assert abs(res.items[0].score - float(expected[order[0]])) < 1e-5


def test_every_subpackage_is_listed_for_non_editable_installs() -> None:
    # `pip install .` copies only the packages pyproject lists; a missing one breaks the CLI there.
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("ragcomp", *p.parent.relative_to(root / "ragcomp").parts)).rstrip(".")
             for p in (root / "ragcomp").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


def test_input_tokens_are_counted_once_and_can_run_while_a_step_waits() -> None:
    """A step may run the caller's input token count while its device computes
    (`run_while_waiting`); the count is the same, taken once, and a step that never asks
    still gets it afterwards."""
    from ragcomp.base import Compressor, run_while_waiting
    from ragcomp.types import Compressed

    calls: list[str] = []

    class Counter:
        name = "words"

        def count(self, text: str) -> int:
            calls.append("count")
            return len(text.split())

        def truncate(self, text: str, max_tokens: int) -> str:
            return text

    class Waiting(Compressor):
        name = "waiting"

        def __init__(self, waits: bool) -> None:
            super().__init__(tokenizer=Counter())
            self.waits = waits

        def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
            if self.waits:
                run_while_waiting()
                run_while_waiting()  # a second call does not count again
            calls.append("step done")
            return [Compressed(p, p.text, [(0, len(p.text))], p.score, True) for p in passages[:1]]

    words_in = sum(len(p.text.split()) for p in PASSAGES)
    for waits, order in ((True, ["count", "step done"]), (False, ["step done", "count"])):
        calls.clear()
        (res,) = Waiting(waits).compress_batch(["q"], [PASSAGES])
        assert calls[:2] == order and calls.count("count") == 2  # input once, output once
        assert res.tokens_in == words_in
        assert res.tokens_out == len(PASSAGES[0].text.split())
    calls.clear()
    empty = Waiting(True).compress_batch(["q", "q"], [[], PASSAGES])
    assert [r.tokens_in for r in empty] == [0, words_in]
