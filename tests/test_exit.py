"""EXIT with the real SmolLM2-135M-Instruct weights in fp32 on CPU: batched shared-prefix and
single-pass (block-masked) scoring against one forward per sentence (same scores, same
decisions), verbatim spans in document order, thresholds, the zero-shot default, windows for
long passages, bad input. Passages are short so the file runs in about a minute on one core."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import ragcomp.compressors.exit.compressor as exit_mod  # noqa: E402
from ragcomp.compressors.exit import ExitCompressor  # noqa: E402
from ragcomp.text import split_sentences  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_summaries_en.json"
TITLES = ["Boxing", "Orange (colour)", "Kazimir Malevich"]
QUERY = "Besides protective gloves and hand wraps, what protective equipment is usually worn in boxing?"


METHODS = ("batched", "per_sentence", "single_pass")


class _Memo(ExitCompressor):
    """Scores each (queries, passages, method) once per module: `compress` with any method
    then runs its selection on exactly the scores the equality tests compared."""

    seen: dict = {}  # noqa: RUF012

    def score_batch(self, queries, passages_per_query, method=None):  # type: ignore[no-untyped-def]
        key = (tuple(queries), tuple(tuple(p.text for p in ps) for ps in passages_per_query),
               self.resolve_method(method or self.method), self.max_length)
        if key not in self.seen:
            self.seen[key] = super().score_batch(queries, passages_per_query, method)
        return self.seen[key]


def _forwards(lm) -> tuple[list[int], object]:  # type: ignore[no-untyped-def]
    """A counter of decoder forwards and its hook handle (remove it when done)."""
    calls = [0]
    hook = lm.model.get_decoder().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, hook


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def passages() -> list[Passage]:
    if not WIKI.exists():  # pragma: no cover
        pytest.skip(f"{WIKI} missing")
    data = json.loads(WIKI.read_text(encoding="utf-8"))
    return [Passage(t, data[t]["extract"], metadata={"title": t}) for t in TITLES]


@pytest.fixture(scope="module")
def scores(lm, passages) -> dict[str, list[np.ndarray]]:
    comp = _Memo(lm)
    return {m: comp.score(QUERY, passages, method=m) for m in METHODS}


def _midpoint(flat: np.ndarray) -> float:
    """A threshold between two distinct scores, far (> 1e-4) from every score."""
    vals = np.unique(np.round(flat, 6))
    gaps = np.diff(vals)
    i = int(np.argmax(gaps))
    assert gaps[i] > 1e-3, "scores too close together to test decisions"
    return float((vals[i] + vals[i + 1]) / 2)


@pytest.mark.parametrize("method", ["batched", "single_pass"])
def test_fast_paths_match_per_sentence(scores, passages, method) -> None:
    a, b = scores[method], scores["per_sentence"]
    assert [len(x) for x in a] == [len(split_sentences(p.text)) for p in passages]
    assert len({len(p.text) for p in passages}) == len(passages)  # passages of different lengths
    assert _max_diff(a, b) <= 1e-4
    flat = np.concatenate(a)
    assert ((flat > 0) & (flat < 1)).all()


def test_single_pass_runs_a_padded_batch_of_questions_in_one_forward(lm, passages, scores) -> None:
    # Two questions of different lengths share one right-padded forward; each question's
    # scores equal its per-sentence scores, padding and the other question change nothing.
    other_q, other_ps = "What colour is between red and yellow?", passages[1:2]
    comp = _Memo(lm)
    calls, hook = _forwards(lm)
    try:
        both = ExitCompressor(lm).score_batch([QUERY, other_q], [passages, other_ps], "single_pass")
    finally:
        hook.remove()
    assert calls[0] == 1
    assert _max_diff(both[0], scores["per_sentence"]) <= 1e-4
    assert _max_diff(both[1], comp.score(other_q, other_ps, "per_sentence")) <= 1e-4


def test_single_pass_splits_packs_over_a_small_mask_budget(lm, passages, scores, monkeypatch) -> None:
    # A budget below one question's pack: each question spans several packs (the shared part
    # repeated), packs are grouped into several forwards; scores do not change.
    monkeypatch.setitem(exit_mod._MAX_PACKED, "cpu", 300**2)
    calls, hook = _forwards(lm)
    try:
        got = ExitCompressor(lm).score(QUERY, passages, "single_pass")
    finally:
        hook.remove()
    assert calls[0] > 1
    assert _max_diff(got, scores["per_sentence"]) <= 1e-4


def test_auto_picks_single_pass_on_cuda_and_batched_elsewhere(lm, monkeypatch) -> None:
    assert ExitCompressor(lm).resolve_method("auto") == "batched"  # CPU: fewest tokens wins
    on_cuda = ExitCompressor(dataclasses.replace(lm, device="cuda:0"))
    assert on_cuda.resolve_method("auto") == "single_pass"  # GPU: fewest forwards wins
    assert on_cuda.resolve_method("per_sentence") == "per_sentence"
    monkeypatch.setattr(exit_mod, "custom_masks", lambda model: False)  # e.g. flash attention
    assert on_cuda.resolve_method("auto") == "batched"
    assert on_cuda.resolve_method("single_pass") == "batched"


@pytest.fixture(scope="module")
def kept(lm, passages, scores) -> tuple[float, dict]:
    """Both methods through `compress`, at a threshold that splits the scores."""
    thr = _midpoint(np.concatenate(scores["batched"]))
    return thr, {m: _Memo(lm, threshold=thr, method=m).compress(QUERY, passages) for m in METHODS}


def test_same_kept_sentences_all_methods(kept, scores) -> None:
    spans = {m: [c.spans for c in r.items] for m, r in kept[1].items()}
    assert spans["batched"] == spans["per_sentence"] == spans["single_pass"]
    n_kept = sum(len(s) for s in spans["batched"])
    assert 0 < n_kept < sum(len(x) for x in scores["batched"])  # a real keep/drop mix


def test_kept_text_is_verbatim_in_document_order(kept, scores) -> None:
    thr, res = kept[0], kept[1]["batched"]
    assert [c.passage.id for c in res.items] == TITLES  # passages keep their order
    for item, per_p in zip(res.items, scores["batched"], strict=True):
        sents = split_sentences(item.passage.text)
        expect = [(s.start, s.end) for s, sc in zip(sents, per_p, strict=True) if sc >= thr]
        assert item.spans == expect  # document order, exactly the passing sentences
        assert item.text == " ".join(item.passage.text[a:b] for a, b in item.spans)
        assert item.kept == bool(expect)
        assert item.score == pytest.approx(float(per_p.max()), abs=1e-6)
    assert res.context == "\n\n".join(c.text for c in res.items if c.kept)


def test_threshold_zero_keeps_all_one_keeps_none(lm, passages) -> None:
    everything = ExitCompressor(lm, threshold=0.0).compress(QUERY, passages[:1])
    p = passages[0]
    assert everything.items[0].spans == [(s.start, s.end) for s in split_sentences(p.text)]
    assert not everything.empty
    nothing = ExitCompressor(lm, threshold=1.0).compress(QUERY, passages[:1])
    assert nothing.empty and nothing.context == "" and nothing.tokens_out == 0
    assert not nothing.items[0].kept and nothing.items[0].score is not None


def test_zero_shot_default_keeps_the_top_share(lm, passages, scores) -> None:
    # No adapter, no threshold: untrained P(Yes) sits below 0.5, so EXIT's 0.5 would keep
    # nothing; the default keeps the best ceil(0.6 * n) sentences of the query instead.
    comp = _Memo(lm)
    assert comp.threshold is None and comp.top_share == exit_mod.ZERO_SHOT_TOP_SHARE == 0.6
    flat = np.concatenate(scores["batched"])
    assert (flat < 0.5).all()  # the premise: 0.5 keeps nothing here
    res = comp.compress(QUERY, passages)
    n_keep = int(np.ceil(0.6 * len(flat) - 1e-9))
    assert not res.empty
    assert sum(len(c.spans) for c in res.items) == n_keep
    cut = np.sort(flat)[::-1][n_keep - 1]
    for item, per_p in zip(res.items, scores["batched"], strict=True):
        sents = split_sentences(item.passage.text)
        assert item.spans == [(s.start, s.end) for s, sc in zip(sents, per_p, strict=True) if sc >= cut]


def test_explicit_threshold_is_honoured_exactly(lm, passages, scores) -> None:
    flat = np.concatenate(scores["batched"])
    comp = _Memo(lm, threshold=0.5)
    assert comp.top_share is None  # no zero-shot cap once a threshold is given
    assert comp.compress(QUERY, passages).empty == bool((flat < 0.5).all())
    thr = float(np.sort(flat)[-2])  # keeps exactly the two best, whatever the default share
    res = _Memo(lm, threshold=thr).compress(QUERY, passages)
    assert sum(len(c.spans) for c in res.items) == int((flat >= thr).sum()) == 2
    both = _Memo(lm, threshold=thr, top_share=0.01).compress(QUERY, passages)  # both rules apply
    assert sum(len(c.spans) for c in both.items) == 1


def test_max_sentences_keeps_the_best_in_document_order(lm, passages, scores) -> None:
    res = _Memo(lm, threshold=0.0, max_sentences=2).compress(QUERY, passages)
    flat = [(float(s), pi, si) for pi, per in enumerate(scores["batched"]) for si, s in enumerate(per)]
    best = {(pi, si) for _, pi, si in sorted(flat, reverse=True)[:2]}
    got = {(pi, [(x.start, x.end) for x in split_sentences(passages[pi].text)].index(sp))
           for pi, item in enumerate(res.items) for sp in item.spans}
    assert got == best


def test_long_passage_is_scored_in_windows(lm) -> None:
    fact = "Fact number {} says that the river Loire crosses the old town of Orleans in the middle of France."
    long = Passage("long", " ".join(fact.format(i) for i in range(8)), metadata={"title": "Loire"})
    q = "Which river crosses Orleans?"
    comp = ExitCompressor(lm, max_length=256, batch_size=4)
    units, _ = comp.units(q, [long])
    assert len(units) > 1  # did not fit one prompt
    assert all(len(u.prefix) + len(r) <= 256 for u in units for r in u.rows)
    assert sorted(i for u in units for i in u.sentences) == list(range(8))  # every sentence once
    a = comp.score(q, [long], "batched")[0]
    b = comp.score(q, [long], "per_sentence")[0]
    assert len(a) == 8 and float(np.abs(a - b).max()) <= 1e-4
    res = ExitCompressor(lm, max_length=256, threshold=0.0).compress(q, [long])
    assert res.items[0].text == long.text  # every sentence, verbatim, joined by the original spaces


def test_huge_query_and_unpunctuated_text_do_not_crash(lm) -> None:
    comp = ExitCompressor(lm, max_length=300, threshold=0.0)
    blob = Passage("blob", " ".join(["word"] * 260))  # no punctuation: cut at word boundaries
    res = comp.compress("what " * 400, [blob])
    assert all(len(u.prefix) + len(r) <= 300 for u in comp.units("what " * 400, [blob])[0] for r in u.rows)
    item = res.items[0]
    assert item.kept and item.text == " ".join(blob.text[a:b] for a, b in item.spans)


def test_padded_fallback_matches(lm, passages, scores, monkeypatch) -> None:
    # Attention kernels without custom masks (flash attention) take the padded-batch path.
    monkeypatch.setattr(exit_mod, "custom_masks", lambda model: False)
    got = ExitCompressor(lm, batch_size=2).score(QUERY, passages, "batched")
    diff = max(float(np.abs(x - y).max()) for x, y in zip(got, scores["per_sentence"], strict=True))
    assert diff <= 1e-4


def test_empty_and_mixed_language_input(lm) -> None:
    comp = ExitCompressor(lm, threshold=0.0)
    assert comp.compress(QUERY, []).empty  # no passages: an empty result, no model call
    mixed = Passage("mix", "東京は日本の首都です。Paris est la capitale de la France. "
                           "Berlin is the capital of Germany.")
    res = comp.compress("What is the capital of Japan?", [Passage("e", ""), Passage("b", "  \n "), mixed])
    assert [c.kept for c in res.items] == [False, False, True]
    assert res.items[0].score is None and res.items[1].score is None
    item = res.items[2]
    assert len(item.spans) == 3 and item.spans[0] == (0, 11)
    assert item.text == " ".join(mixed.text[a:b] for a, b in item.spans)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_threshold_outside_unit_interval_raises(bad) -> None:
    with pytest.raises(ValueError, match="threshold"):
        ExitCompressor("smollm2-135m", threshold=bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, "0.3", True])
def test_top_share_outside_half_open_interval_raises(bad) -> None:
    with pytest.raises(ValueError, match=r"top_share must be a number in \(0, 1\]"):
        ExitCompressor("smollm2-135m", top_share=bad)


def test_other_bad_parameters_raise(lm) -> None:
    with pytest.raises(ValueError, match="method"):
        ExitCompressor(lm, method="fast")
    with pytest.raises(ValueError, match="batch_size"):
        ExitCompressor(lm, batch_size=0)
    with pytest.raises(ValueError, match="max_sentences"):
        ExitCompressor(lm, max_sentences=-1)
    with pytest.raises(ValueError, match="max_length"):
        ExitCompressor(lm, max_length=10)
    with pytest.raises(ValueError, match="too small"):
        ExitCompressor(lm, max_length=64).compress(QUERY, ["A sentence."])
    with pytest.raises(ValueError, match="non-empty query"):
        ExitCompressor(lm).compress("   ", ["A sentence."])
    with pytest.raises(ValueError, match="adapter"):
        ExitCompressor(lm, adapter="/nowhere")
    with pytest.raises(TypeError):
        ExitCompressor(lm).compress(QUERY, "not a list")


def test_adapter_without_peft_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    trained = ExitCompressor(adapter="/some/adapter", device="cpu")
    assert (trained.threshold, trained.top_share) == (0.5, None)  # a trained classifier: EXIT's 0.5
    with pytest.raises(ImportError, match="pip install peft"):
        _ = ExitCompressor(adapter="/some/adapter", device="cpu").lm


def test_lora_adapter_is_merged_into_a_private_copy(lm, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    cfg = LlamaConfig(vocab_size=len(lm.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    lm.tokenizer.save_pretrained(base_dir)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    lora.save_pretrained(adapter_dir)
    with_adapter = ExitCompressor(str(base_dir), adapter=str(adapter_dir), device="cpu", threshold=0.0)
    plain = ExitCompressor(str(base_dir), device="cpu")
    q, ps = "Which city?", [Passage("p", "Paris is in France. It is big.")]
    a = with_adapter.score(q, ps)[0]
    assert float(np.abs(a - with_adapter.score(q, ps, "per_sentence")[0]).max()) <= 1e-4
    assert float(np.abs(a - plain.score(q, ps)[0]).max()) > 0  # the adapter changed the model
    assert with_adapter.compress(q, ps).items[0].text == ps[0].text
    from_config = ExitCompressor(adapter=str(adapter_dir), device="cpu")  # base named by the adapter
    assert float(np.abs(a - from_config.score(q, ps)[0]).max()) <= 1e-6
    # A trained classifier keeps EXIT's threshold by default, not the zero-shot share.
    assert (from_config.threshold, from_config.top_share) == (0.5, None)
