"""lingua with the real SmolLM2-135M-Instruct (fp32, CPU): batched scores equal a plain forward,
windows for long passages, whole-word spans into the original text, the token target honoured in
a named tokenizer, force-kept digits and entities, question conditioning, bad input. Any causal
LM loads by path (a tiny random Llama saved in tmp_path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ragcomp.compressors.lingua import LinguaCompressor  # noqa: E402
from ragcomp.registry import load_compressor  # noqa: E402
from ragcomp.tokens import get_counter  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_summaries_en.json"
TITLES = ["Eiffel Tower", "Boxing", "Kazimir Malevich"]
QUERY = "When was the Eiffel Tower built, and by whose company?"


@pytest.fixture(scope="module")
def passages() -> list[Passage]:
    if not WIKI.exists():  # pragma: no cover
        pytest.skip(f"{WIKI} missing")
    data = json.loads(WIKI.read_text(encoding="utf-8"))
    return [Passage(t, data[t]["extract"], metadata={"title": t}) for t in TITLES]


def _reference(lm, prefix: list[int], ids: list[int]) -> np.ndarray:
    """-log p of each passage token from one plain forward over prefix + passage."""
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([prefix + ids])).logits[0].float()
    logp = torch.log_softmax(logits[len(prefix) - 1 : -1], dim=-1)
    return -logp.gather(1, torch.tensor(ids)[:, None])[:, 0].numpy()


def _ids(lm, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("condition", ["none", "question"])
def test_batched_scores_equal_a_plain_forward(lm, passages, condition) -> None:
    comp = LinguaCompressor(lm, condition=condition, batch_size=2)
    got = comp.token_scores(QUERY, passages)  # 3 rows of different lengths: padded batches
    prefix = comp._prefix(QUERY if condition == "question" else None)
    for p, (scores, offsets) in zip(passages, got, strict=True):
        ref = _reference(lm, prefix, _ids(lm, p.text))
        assert scores.shape == ref.shape and len(offsets) == len(ref)
        assert float(np.abs(scores - ref).max()) <= 1e-3


def test_contrastive_is_the_difference_and_question_lowers_its_own_terms(lm, passages) -> None:
    p = passages[:1]
    none = LinguaCompressor(lm, condition="none").token_scores(QUERY, p)[0][0]
    cond = LinguaCompressor(lm, condition="question").token_scores(QUERY, p)[0][0]
    contrast = LinguaCompressor(lm, condition="contrastive").token_scores(QUERY, p)[0][0]
    assert np.allclose(contrast, none - cond, atol=1e-4)
    # "Eiffel" is hard to guess at the start of the passage, easy after a question naming it.
    words = {w.start: w for w in LinguaCompressor(lm, condition="question").words(QUERY, p)[0]}
    plain = {w.start: w for w in LinguaCompressor(lm, condition="none").words(QUERY, p)[0]}
    at = p[0].text.index("Eiffel")
    assert words[at].score < plain[at].score - 1.0


def test_long_passage_is_scored_in_windows(lm) -> None:
    fact = "Fact {}: the river Loire crosses the old town of Orleans in France."
    text = " ".join(fact.format(i) for i in range(12))
    comp = LinguaCompressor(lm, condition="none", max_length=64)
    prefix = comp._prefix(None)
    ids = _ids(lm, text)
    rows = comp._rows(0, "self", prefix, ids)
    assert len(rows) > 2 and all(len(r.ids) <= 64 for r in rows)
    covered = [i for r in rows for i in range(r.lo, r.lo + r.n_scored)]
    assert covered == list(range(len(ids)))  # every token scored exactly once
    scores = comp.token_scores("", [Passage("loire", text)])[0][0]
    first = rows[0].n_scored  # the first window sees the same context as one long forward
    assert float(np.abs(scores[:first] - _reference(lm, prefix, ids)[:first]).max()) <= 1e-3
    res = comp.compress("Which river?", [Passage("loire", text)])
    assert res.tokens_out <= math.floor(0.5 * res.tokens_in)


def _at_word_edge(text: str, pos: int) -> bool:
    """A word boundary: text edge, whitespace on a side, or a CJK character (a word of its own)."""
    if pos in (0, len(text)):
        return True
    return any(c.isspace() or ord(c) >= 0x3000 for c in text[pos - 1 : pos + 1])


def _assert_whole_words(item) -> None:
    text = item.passage.text
    for a, b in item.spans:
        assert 0 <= a < b <= len(text) and text[a:b] == text[a:b].strip()
        assert _at_word_edge(text, a) and _at_word_edge(text, b)
    assert item.text == " ".join(text[a:b] for a, b in item.spans)


@pytest.mark.parametrize(("tokenizer", "rate"), [("smollm2-135m", 0.3), ("whitespace", 0.5), ("cl100k", 0.2)])
def test_rate_is_honoured_in_the_named_tokenizer(lm, passages, tokenizer, rate) -> None:
    res = LinguaCompressor(lm, rate=rate, tokenizer=tokenizer).compress(QUERY, passages)
    counter = get_counter(tokenizer)
    target = math.floor(rate * counter.count("\n\n".join(p.text for p in passages)))
    assert res.tokens_out == counter.count(res.context) <= target
    assert res.tokens_out >= 0.85 * target  # the budget is used, not just respected
    for item in res.kept:
        _assert_whole_words(item)


def test_target_tokens_and_extremes(lm, passages) -> None:
    res = LinguaCompressor(lm, target_tokens=40, tokenizer="smollm2-135m").compress(QUERY, passages)
    assert 34 <= res.tokens_out <= 40
    everything = LinguaCompressor(lm, rate=1.0).compress(QUERY, passages)
    assert [c.text for c in everything.items] == [p.text.strip() for p in passages]
    assert [c.spans for c in everything.items] == [[(0, len(p.text.strip()))] for p in passages]
    nothing = LinguaCompressor(lm, target_tokens=0).compress(QUERY, passages)
    assert nothing.empty and nothing.context == "" and not any(c.kept for c in nothing.items)


def test_keep_digits_and_entities(lm) -> None:
    text = ("The tower was finished in 1889 for the World's Fair. It was designed by the firm of "
            "Gustave Eiffel in Paris, and it is 330 metres tall. Visitors climb it every day.")
    p = [Passage("t", text)]
    res = LinguaCompressor(lm, rate=0.1, keep_entities=True).compress("How tall is it?", p)
    kept_words = res.items[0].text.split()
    for w in ("1889", "World's", "Gustave", "Eiffel", "Paris,", "330"):
        assert w in kept_words
    assert "The" not in kept_words and "Visitors" not in kept_words  # sentence starts are not entities
    digits = LinguaCompressor(lm, rate=0.05, keep_digits=True).compress("How tall is it?", p)
    assert math.floor(0.05 * len(text.split())) == 1
    assert digits.items[0].text.split() == ["1889", "330"]  # forced words win over the 1-word target


def test_mixed_language_and_blank_passages(lm) -> None:
    mixed = Passage("mix", "東京は日本の首都です。Paris est la capitale de la France. Berlin is in Germany.")
    res = LinguaCompressor(lm, rate=0.5, tokenizer="smollm2-135m").compress(
        "What is the capital of Japan?", [Passage("e", ""), Passage("b", "  \n "), mixed])
    assert [c.kept for c in res.items] == [False, False, True]
    assert res.tokens_out <= math.floor(0.5 * res.tokens_in)
    _assert_whole_words(res.items[2])  # CJK characters are words of their own; Latin words stay whole
    assert 0 < sum(ord(c) >= 0x3000 for c in res.context) < 11  # some, not all, Japanese characters
    assert LinguaCompressor(lm).compress("q", []).empty  # no passages: empty, no model call


def test_batch_equals_one_by_one(lm, passages) -> None:
    comp = LinguaCompressor(lm, rate=0.4, tokenizer="smollm2-135m")
    qs = [QUERY, "Who founded Suprematism?"]
    batch = comp.compress_batch(qs, [passages, passages[1:]])
    for q, ps, got in zip(qs, [passages, passages[1:]], batch, strict=True):
        assert got.context == comp.compress(q, ps).context


def test_any_causal_lm_by_path(lm, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(lm.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    comp = load_compressor("lingua", model=str(tmp_path), device="cpu", rate=0.5)
    p = Passage("p", "Paris is the capital of France. It lies on the Seine.")
    scores = comp.token_scores("Which river?", [p])[0][0]
    ref = _reference(comp.lm, comp._prefix("Which river?"), _ids(lm, p.text))
    assert float(np.abs(scores - ref).max()) <= 1e-4
    assert comp.limit == 256  # the model's own window
    assert comp.compress("Which river?", [p]).tokens_out <= 5


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_rate_outside_unit_interval_raises(bad) -> None:
    with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\]"):
        LinguaCompressor("smollm2-135m", rate=bad)


def test_other_bad_parameters_raise(lm) -> None:
    with pytest.raises(ValueError, match="either rate or target_tokens"):
        LinguaCompressor(lm, rate=0.5, target_tokens=10)
    with pytest.raises(ValueError, match="target_tokens must be an integer >= 0"):
        LinguaCompressor(lm, target_tokens=-1)
    with pytest.raises(ValueError, match="condition must be one of"):
        LinguaCompressor(lm, condition="perplexity")
    with pytest.raises(ValueError, match="batch_size"):
        LinguaCompressor(lm, batch_size=0)
    with pytest.raises(ValueError, match="max_length must be an integer >= 32"):
        LinguaCompressor(lm, max_length=16)
    huge = LinguaCompressor(lm, max_length=32, rate=0.5).compress("why " * 200, ["A passage of a few words."])
    assert huge.tokens_out <= 3  # a huge question is cut to a quarter of the window, no crash
    with pytest.raises(OSError, match="no-such-org/no-such-lm"):
        LinguaCompressor("no-such-org/no-such-lm", device="cpu").compress("q", ["A passage."])
