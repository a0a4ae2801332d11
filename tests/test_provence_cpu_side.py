"""The Provence compressor's CPU side: tokenizer passes, passage cache, launch groups, window folding,
and scores equal with and without the fast encoder."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deberta_configs import QUERY, SENTENCES, _v3_config  # noqa: E402

from ragcomp import Passage  # noqa: E402
from ragcomp.compressors.provence import ProvenceCompressor  # noqa: E402
from ragcomp.compressors.provence import compressor as provence_module  # noqa: E402
from ragcomp.compressors.provence.inputs import (  # noqa: E402
    PassageWork,
    Window,
    WindowFold,
    add_offsets,
    encode_ids,
    encode_texts,
    launch_groups,
    mean_by_sentence,
    sentence_means,
)
from ragcomp.compressors.provence.model import ProvenceModel  # noqa: E402
from ragcomp.models import minilm_path  # noqa: E402
from ragcomp.text import Sentence, split_sentences  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()))


def _tiny_provence() -> ProvenceModel:
    """A DeBERTa-v3-style Provence with BERT's vocabulary (the MiniLM tokenizer's ids fit)."""
    torch.manual_seed(0)
    config = _v3_config(vocab_size=30522, max_position_embeddings=128, position_buckets=16)
    return ProvenceModel(config).eval()


def test_compressor_scores_equal_with_and_without_fast_encoder(tok) -> None:
    net = _tiny_provence()
    passages = [Passage(str(i), " ".join(SENTENCES[i:] + SENTENCES[:i] * (i % 3))) for i in range(6)]
    kwargs = dict(encoder_tokenizer=tok, threshold=0.3, window=48, batch_size=4)
    fast = ProvenceCompressor(net, **kwargs).score(QUERY, passages)
    slow = ProvenceCompressor(net, fast_encoder=False, **kwargs).score(QUERY, passages)
    assert any(len(s.windows) > 1 for s in fast)  # long passages are read in several windows
    for a, b in zip(fast, slow, strict=True):
        assert abs(a.ranking - b.ranking) <= 1e-5 and a.windows == b.windows
        np.testing.assert_allclose(a.token_probs, b.token_probs, atol=1e-5)
        np.testing.assert_allclose(a.sentence_scores, b.sentence_scores, atol=1e-5)


def test_shipped_minilm_default_is_unchanged_by_the_fast_flag() -> None:
    passages = [Passage("a", " ".join(SENTENCES[:3])), Passage("b", " ".join(SENTENCES[3:]))]
    comp = ProvenceCompressor(device="cpu")
    on = comp.score(QUERY, passages)
    off = ProvenceCompressor(device="cpu", fast_encoder=False, cuda_graphs=False).score(QUERY, passages)
    assert [x.ranking for x in on] == [x.ranking for x in off]
    assert all(np.array_equal(a.token_probs, b.token_probs) for a, b in zip(on, off, strict=True))
    net, bert_tok, _ = comp.load()  # batched scores equal one plain call with BERT's segment ids
    with torch.no_grad():
        ref = net(**bert_tok(QUERY, passages[1].text, return_tensors="pt"))
    assert abs(on[1].ranking - float(ref.ranking_logits[0])) <= 1e-5


def _sentence_means_loop(sents: list[Sentence], offsets: list[tuple[int, int]],
                         probs: np.ndarray) -> np.ndarray:
    """The rule written out token by token (the former implementation)."""
    total, count = np.zeros(len(sents)), np.zeros(len(sents))
    for (a, b), p in zip(offsets, probs, strict=True):
        k = max((i for i, s in enumerate(sents) if s.start <= b - 1), default=-1)
        if b > a and k >= 0 and b - 1 < sents[k].end:
            total[k] += p
            count[k] += 1
    return np.where(count > 0, total / np.maximum(count, 1), probs.mean() if len(probs) else 0.0)


def test_vectorised_sentence_means_follow_the_token_rule(tok) -> None:
    text = "  Paris is big.   It opened in 1889!\n\nWhy? " + "Numbers like 3.5 stay. " * 3 + "Tail"
    sents = split_sentences(text)
    offsets = [*encode_texts(tok, [text])[1][0], (len(text), len(text))]  # an empty span: no sentence
    probs = np.random.default_rng(0).random(len(offsets)).astype(np.float32)
    gap = [Sentence(text[:5], 0, 5), Sentence(text[40:45], 40, 45)]  # tokens between sentences: none
    for sentences in (sents, gap):
        np.testing.assert_allclose(sentence_means(sentences, offsets, probs),
                                   _sentence_means_loop(sentences, offsets, probs), rtol=1e-6)


def test_direct_tokenizer_call_equals_the_wrapper(tok) -> None:
    texts = ["Héllo wörld, it's 1889.", "", "A  longer   passage with   spaces and ÜNICODE."]
    ids, offsets = encode_texts(tok, texts)
    ref = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == ref["input_ids"] and [list(map(tuple, o)) for o in offsets] == ref["offset_mapping"]
    tok.backend_tokenizer.enable_truncation(max_length=3)  # a leftover setting: the wrapper path is used
    try:
        assert encode_texts(tok, texts)[0] == ref["input_ids"]
    finally:
        tok.backend_tokenizer.no_truncation()
    assert encode_texts(tok, []) == ([], [])


def test_passage_cache_reuses_text_work_and_changes_no_score(tok) -> None:
    net = _tiny_provence()
    passages = [Passage(str(i), " ".join(SENTENCES[i:] + SENTENCES[:i])) for i in range(3)]
    cold = ProvenceCompressor(net, encoder_tokenizer=tok, window=48, passage_cache=0)
    warm = ProvenceCompressor(net, encoder_tokenizer=tok, window=48, passage_cache=2)
    ref = cold.score(QUERY, passages)
    first = warm.score(QUERY, passages)
    first[0].sentences.clear()  # a caller editing its result must not reach the cache
    second = warm.score("Who built the tower?", passages[1:])  # another question, same texts
    third = warm.score(QUERY, passages)
    assert len(cold.passage_cache) == 0 and len(warm.passage_cache) == 2  # bounded, least recent out
    assert (warm.passage_cache.hits, warm.passage_cache.misses) == (2 + 2, 3 + 1)
    assert [s.text for s in second[0].sentences] == [s.text for s in ref[1].sentences]
    for a, b in zip(ref, third, strict=True):
        assert a.ranking == b.ranking and a.windows == b.windows and a.sentences == b.sentences
        assert np.array_equal(a.token_probs, b.token_probs)
        assert np.array_equal(a.sentence_scores, b.sentence_scores)
    warm._encoder_tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    warm.score(QUERY, passages[:1])  # another tokenizer object: the cache starts again
    assert len(warm.passage_cache) == 1


def test_prepared_passages_skip_tokenising_and_change_no_score(tok) -> None:
    net = _tiny_provence()
    passages = [Passage(str(i), " ".join(SENTENCES[i:] + SENTENCES[:i])) for i in range(3)]
    cold = ProvenceCompressor(net, encoder_tokenizer=tok, window=48, passage_cache=0)
    prepared = ProvenceCompressor(net, encoder_tokenizer=tok, window=48, passage_cache=4)
    # A duplicate (here as a plain string) counts once, an empty text is fine; 2 texts per tokenizer call.
    assert prepared.prepare([*passages, passages[0].text, ""], batch_size=2) == 4
    assert prepared.prepare(p for p in passages[:1]) == 1  # any iterable
    assert (prepared.passage_cache.hits, prepared.passage_cache.misses) == (0, 0)
    ref, got = cold.score(QUERY, passages), prepared.score(QUERY, passages)
    assert (prepared.passage_cache.hits, prepared.passage_cache.misses) == (3, 0)
    for a, b in zip(ref, got, strict=True):
        assert a.ranking == b.ranking and a.windows == b.windows and a.sentences == b.sentences
        assert np.array_equal(a.token_probs, b.token_probs)
        assert np.array_equal(a.sentence_scores, b.sentence_scores)
    assert prepared.prepare([]) == 0


def test_prepare_refuses_what_the_cache_cannot_hold_and_single_items(tok) -> None:
    net = _tiny_provence()
    comp = ProvenceCompressor(net, encoder_tokenizer=tok, window=48, passage_cache=2)
    with pytest.raises(ValueError, match=r"3 distinct passages do not fit passage_cache=2"):
        comp.prepare(SENTENCES[:3])
    with pytest.raises(ValueError, match=r"passage_cache=0"):
        ProvenceCompressor(net, encoder_tokenizer=tok, passage_cache=0).prepare(["one passage"])
    with pytest.raises(TypeError, match="not a single item"):
        comp.prepare("a passage, not a list")
    with pytest.raises(ValueError, match="batch_size"):
        comp.prepare(["x"], batch_size=0)
    assert len(comp.passage_cache) == 0  # nothing half-done


def test_launch_groups_are_balanced_and_cover_every_passage_once() -> None:
    assert launch_groups(0, 16) == []
    assert [len(g) for g in launch_groups(20, 16)] == [10, 10]
    assert [len(g) for g in launch_groups(33, 16)] == [11, 11, 11]
    assert [len(g) for g in launch_groups(7, 2)] == [2, 2, 2, 1]
    assert launch_groups(5, 32) == [[0, 1, 2, 3, 4]]
    for n, size in ((1, 1), (17, 4), (100, 7)):
        groups = launch_groups(n, size)
        assert [j for g in groups for j in g] == list(range(n)) and max(map(len, groups)) <= size


def test_launch_groups_give_the_scores_of_one_call_per_question(tok) -> None:
    net = _tiny_provence()
    questions = [QUERY, "Who built it?", "", "Are cats pets?"]
    passages = [[Passage(f"{q}-{i}", " ".join(SENTENCES[i:] + SENTENCES[:i] * (i % 3))) for i in range(n)]
                for q, n in zip(range(4), (3, 0, 2, 4), strict=True)]
    comp = ProvenceCompressor(net, encoder_tokenizer=tok, window=48, batch_size=2, passage_cache=0)
    assert launch_groups(9, 2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]  # questions split across groups
    together = comp.score_batch(questions, passages)
    for q, ps, got in zip(questions, passages, together, strict=True):
        alone = comp.score(q, ps)
        assert [s.passage.id for s in got] == [p.id for p in ps]
        for a, b in zip(alone, got, strict=True):
            assert a.windows == b.windows and abs(a.ranking - b.ranking) <= 1e-6
            np.testing.assert_allclose(a.token_probs, b.token_probs, atol=1e-6)


def test_ids_only_pass_gives_the_ids_of_the_full_pass(tok) -> None:
    texts = [QUERY, " ".join(SENTENCES), "", "Ünïcödé naïve café — 1889 年", "a" * 600]
    assert encode_ids(tok, texts) == encode_texts(tok, texts)[0]
    assert encode_ids(tok, []) == []


def test_deferred_offsets_give_the_same_scores(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    # On CUDA the launch waits for ids only and offsets come from a second pass; forced here on CPU.
    net = _tiny_provence()
    passages = [Passage(str(i), " ".join(SENTENCES[i:] + SENTENCES[:i])) for i in range(4)]
    comp = ProvenceCompressor(net, encoder_tokenizer=tok, window=48, batch_size=2, passage_cache=0)
    plain = comp.score(QUERY, passages)
    monkeypatch.setattr(ProvenceCompressor, "_defers_offsets", staticmethod(lambda net: True))
    calls: list[int] = []
    original = provence_module.add_offsets

    def counting(*args: object) -> None:
        calls.append(1)
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(provence_module, "add_offsets", counting)
    deferred = comp.score(QUERY, passages)
    assert calls == [1]
    for a, b in zip(plain, deferred, strict=True):
        assert [x.text for x in a.sentences] == [x.text for x in b.sentences]
        np.testing.assert_array_equal(a.sentence_scores, b.sentence_scores)
        np.testing.assert_array_equal(a.token_probs, b.token_probs)


def test_a_second_pass_with_other_ids_is_refused(tok) -> None:
    fresh = {0: ([1, 2, 3], None)}
    with pytest.raises(RuntimeError, match="different ids in its second pass"):
        add_offsets(tok, threading.Lock(), ["Paris is big."], fresh)
    ids = encode_ids(tok, ["Paris is big."])[0]
    fresh = {0: (ids, None)}
    add_offsets(tok, threading.Lock(), ["Paris is big."], fresh)
    assert fresh[0] == (ids, encode_texts(tok, ["Paris is big."])[1][0])


def _fold_per_passage(work: list[PassageWork], windows: list[Window], owner: list[int],
                      ranks: list[float], probs: list[np.ndarray]) -> tuple[list, list, list]:
    """The fold written passage by passage (the compressor's code before WindowFold)."""
    sums = [np.zeros(len(w.ids), np.float64) for w in work]
    counts = [np.zeros(len(w.ids), np.float64) for w in work]
    best: list = [None] * len(work)
    for w, j, r, pr in zip(windows, owner, ranks, probs, strict=True):
        sums[j][w.lo : w.hi] += pr
        counts[j][w.lo : w.hi] += 1
        best[j] = r if best[j] is None else max(best[j], r)
    token_probs = [(s / np.maximum(c, 1)).astype(np.float32) for s, c in zip(sums, counts, strict=True)]
    scores = [mean_by_sentence(w.token_sentence, len(w.sentences), t)
              for w, t in zip(work, token_probs, strict=True)]
    return best, token_probs, scores


def test_window_fold_equals_folding_each_passage_alone() -> None:
    rng = np.random.default_rng(3)
    sent = Sentence("x", 0, 1)
    # Passages: overlapping windows, one window, no tokens (no window), a tokenless sentence, none.
    token_sentence = [np.repeat([0, 1, 2], [5, 7, 8]), np.array([-1, 0, 0, 1, -1]), np.zeros(0, np.int64),
                      np.array([0, 0, 2, 2]), np.array([-1, -1, -1])]
    n_sentences = [3, 2, 1, 3, 0]
    work = [PassageWork(list(range(len(t))), [sent] * n, t)
            for t, n in zip(token_sentence, n_sentences, strict=True)]
    spans = [(0, 0, 12), (0, 8, 20), (1, 0, 5), (3, 0, 4), (0, 10, 20), (4, 0, 3)]
    windows = [Window([], [], lo, hi, 2) for _, lo, hi in spans]
    owner = [j for j, _, _ in spans]
    ranks = [float(x) for x in rng.normal(size=len(spans))]
    probs = [rng.random(hi - lo).astype(np.float32) for _, lo, hi in spans]
    fold = WindowFold(work, windows, owner)
    got = fold.apply(ranks, probs)
    want = _fold_per_passage(work, windows, owner, ranks, probs)
    assert got[0] == want[0] and got[0][2] is None  # a passage with no window has no ranking
    for a, b in zip(got[1] + got[2], want[1] + want[2], strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert got[2][3][1] == np.float32(probs[3].mean())  # sentence 1 of passage 3 has no token
    assert got[2][2].tolist() == [0.0]  # no tokens at all: sentences score 0
    assert fold.spans == [[(0, 12), (8, 20), (10, 20)], [(0, 5)], [], [(0, 4)], [(0, 3)]]
    assert [len(x) for x in WindowFold([], [], []).apply([], [])] == [0, 0, 0]
