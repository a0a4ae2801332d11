"""recomp-abstractive: the causal path with the real SmolLM2-135M-Instruct (fp32, CPU, short
generations), RECOMP's T5 path with a tiny random T5 saved in tmp_path (its input format,
batched generation equal to one at a time, an empty generation becoming `empty`), the judge of
"nothing relevant"/garbage outputs, long passages and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ragcomp.base import Pipeline, TokenBudget  # noqa: E402
from ragcomp.compressors.recomp_abstractive import (  # noqa: E402
    RECOMP_FORMAT,
    RecompAbstractive,
    clean_summary,
    format_documents,
)
from ragcomp.registry import load_compressor  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_summaries_en.json"


@pytest.fixture(scope="module")
def wiki() -> dict[str, Passage]:
    if not WIKI.exists():  # pragma: no cover
        pytest.skip(f"{WIKI} missing")
    data = json.loads(WIKI.read_text(encoding="utf-8"))
    return {t: Passage(t, data[t]["extract"], metadata={"title": t}) for t in
            ("Eiffel Tower", "Boxing", "Orange (colour)")}


# -- the judge of generated text ------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "", "   ", ".", "-", "nothing relevant", "Nothing relevant.", "**Nothing relevant**",
    "Summary: nothing relevant", "The documents do not answer the question.",
    "This passage doesn't contain relevant information to the question.",  # RECOMP's placeholder
    "No relevant information.", "\ufffd\ufffd\ufffd ab \ufffd\ufffd", "the the the the the the the the the",
])
def test_nothing_relevant_empty_or_garbage_is_none(text) -> None:
    assert clean_summary(text) is None


@pytest.mark.parametrize(("text", "kept"), [
    ("The Eiffel Tower opened in 1889.", "The Eiffel Tower opened in 1889."),
    ("Summary: It opened in 1889.", "It opened in 1889."),
    ("東京は日本の首都です。", "東京は日本の首都です。"),  # other scripts are text, not garbage
    ("1889", "1889"),
    ("Nothing is known about relevant dates, but it opened in 1889.",
     "Nothing is known about relevant dates, but it opened in 1889."),
])
def test_real_summaries_are_kept(text, kept) -> None:
    assert clean_summary(text) == kept


# -- causal path (real SmolLM2) ----------------------------------------------------------------
def test_smollm2_writes_a_query_focused_summary_batched(lm, wiki) -> None:
    comp = RecompAbstractive(lm, max_new_tokens=16, tokenizer="smollm2-135m")
    qs = ["In which year did the Eiffel Tower open?", "What colour is between yellow and red?"]
    ps = [[wiki["Eiffel Tower"], wiki["Boxing"]], [wiki["Boxing"], wiki["Orange (colour)"]]]
    batch = comp.compress_batch(qs, ps)
    first = batch[0]
    assert not first.empty and "1889" in first.context
    assert [c.kept for c in first.items] == [True, False]  # the summary sits on the first passage
    assert first.items[0].spans == [] and first.items[0].passage is ps[0][0]
    assert first.context == first.items[0].text and first.tokens_out < first.tokens_in
    assert "orange" in batch[1].context.lower()
    # Batched (left-padded) generation gives the same summaries as one query at a time.
    assert [r.context for r in batch] == [comp.compress(q, p).context for q, p in zip(qs, ps, strict=True)]


def test_long_documents_are_cut_to_fit_the_window(lm, wiki) -> None:
    comp = RecompAbstractive(lm, max_length=200, max_new_tokens=16)
    long = Passage("long", " ".join([wiki["Boxing"].text] * 6))
    q = "Which sport uses a mouthguard?"
    ids = comp._causal_prompt(q, [long])
    assert len(ids) + 16 <= 200
    prompt = lm.tokenizer.decode(ids)
    assert q in prompt and "nothing relevant" in prompt  # question and instructions stay whole
    assert "Documents:\nBoxing is" in prompt
    with pytest.raises(ValueError, match="no room for the documents"):
        RecompAbstractive(lm, max_length=100, max_new_tokens=64)._causal_prompt(q, [long])


def test_in_a_pipeline_spans_stay_empty_and_budget_applies(lm, wiki) -> None:
    pipe = Pipeline([RecompAbstractive(lm, max_new_tokens=16), TokenBudget(5, truncate="tokens")])
    res = pipe.compress("In which year did the Eiffel Tower open?", [wiki["Eiffel Tower"]])
    assert not res.empty and len(res.context.split()) <= 5
    assert res.kept[0].spans == [] and res.kept[0].passage.id == "Eiffel Tower"


def test_empty_inputs_need_no_model() -> None:
    comp = RecompAbstractive("no-such-org/never-loaded")  # loading would fail: nothing is loaded
    assert comp.compress("q", []).empty
    res = comp.compress("q", [Passage("a", ""), Passage("b", " \n ")])
    assert res.empty and res.context == "" and not any(c.kept for c in res.items)


# -- RECOMP's T5 path (tiny random T5 in tmp_path) -----------------------------------------------
def _tiny_t5(path: Path, silent: bool = False) -> Path:
    """A 2-layer T5ForConditionalGeneration and a small unigram tokenizer, saved as a checkpoint."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing

    texts = ["Question: who built the tower?\n Document: The Eiffel Tower was built by Gustave Eiffel.\n"
             " Summary: Eiffel built it.",
             "Boxing is a combat sport. Orange is a colour between yellow and red."]
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts * 20, vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                           unk_token="<unk>", show_progress=False)
    raw = sp._tokenizer
    eos = raw.token_to_id("</s>")
    raw.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])  # T5 adds </s>
    tok = transformers.T5TokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
                                       unk_token="<unk>", extra_ids=0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.lm_head.weight[[0, 1]] = 0  # never pad/eos: the random model writes real tokens
        if silent:
            model.lm_head.weight.zero_()  # all logits 0: argmax is <pad>, decoded as ""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return _tiny_t5(tmp_path_factory.mktemp("t5"))


def test_t5_checkpoint_gets_recomp_input_format(t5_dir) -> None:
    comp = load_compressor("recomp-abstractive", model=str(t5_dir), device="cpu", max_new_tokens=6)
    ps = [Passage("a", "The Eiffel Tower is in Paris.", metadata={"title": "Eiffel Tower"}),
          Passage("b", "Boxing is a combat sport.")]
    assert comp.is_seq2seq and comp.limit == 1024
    expected = "Question: Who built it?\n Document: Eiffel Tower\nThe Eiffel Tower is in Paris.\n" \
               "Boxing is a combat sport.\n Summary: "
    assert comp.inputs("Who built it?", ps) == expected == RECOMP_FORMAT.format(
        question="Who built it?", docs=format_documents(ps))
    # Our batched generation is exactly HF generate on that text, one query at a time.
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    tok = transformers.AutoTokenizer.from_pretrained(t5_dir)
    qs = ["Who built it?", "Which sport is a combat sport and what colour is orange?"]
    got = comp.generate(qs, [ps, ps[1:]])
    for q, p, text in zip(qs, [ps, ps[1:]], got, strict=True):
        enc = tok(comp.inputs(q, p), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        assert text == tok.decode(out[0], skip_special_tokens=True).strip()
    assert all(t.strip() for t in got)


def test_t5_truncates_like_recomp(t5_dir) -> None:
    comp = RecompAbstractive(str(t5_dir), device="cpu", max_length=40, max_new_tokens=4)
    seen = {}
    comp._load()
    model, tok, _ = comp._seq2seq  # type: ignore[misc]
    orig = model.generate

    def spy(**kw):  # record what reaches the real model, then run it
        seen["ids"] = kw["input_ids"]
        return orig(**kw)

    model.generate = spy
    try:
        comp.compress("who built the tower?", [Passage("a", "word " * 200)])
    finally:
        model.generate = orig
    assert seen["ids"].shape[1] == 40  # max_source_length applies to the whole input
    assert tok.decode(seen["ids"][0]).startswith("Question: who built the tower?")


def test_t5_empty_generation_is_an_empty_result(tmp_path) -> None:
    comp = RecompAbstractive(str(_tiny_t5(tmp_path, silent=True)), device="cpu", max_new_tokens=4)
    ps = [Passage("a", "Boxing is a combat sport."), Passage("b", "Orange is a colour.")]
    assert comp.generate(["q"], [ps]) == [""]
    res = comp.compress("Which sport?", ps)
    assert res.empty and res.context == "" and res.tokens_out == 0
    assert not any(c.kept for c in res.items) and len(res.items) == 2


def test_bad_parameters_and_unknown_model() -> None:
    for key, value in (("max_new_tokens", 0), ("max_length", 8), ("batch_size", 0), ("max_new_tokens", True)):
        with pytest.raises(ValueError, match=key):
            RecompAbstractive(**{key: value})
    with pytest.raises(TypeError, match="unknown parameter"):
        load_compressor("recomp-abstractive", threshold=0.5)
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        RecompAbstractive("no-such-org/no-such-model").compress("q", ["A passage."])
