"""Provence: the published checkpoint layout (tiny random DeBERTa-v2 saved by hand), our own
format (MiniLM backbone), windows over long passages, sentence rounding, reranking, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ragcomp import Passage  # noqa: E402
from ragcomp.compressors.provence import ProvenceCompressor  # noqa: E402
from ragcomp.compressors.provence.model import ProvenceModel  # noqa: E402
from ragcomp.models import minilm_path  # noqa: E402
from ragcomp.text import split_sentences  # noqa: E402

QUERY = "When did the Eiffel Tower open?"
PASSAGES = [
    Passage("eiffel", "The Eiffel Tower is in Paris. It opened in 1889. Gustave Eiffel's company built it."),
    Passage("everest", "Mount Everest is the highest mountain on Earth. It lies in the Himalayas."),
    Passage("cats", "Cats are small carnivorous mammals. They are popular pets. Many sleep most of the day."),
]
HIDDEN = 32
# Field for field the published config.json, shrunk (hidden 1024 -> 32, 24 layers -> 2, ...).
PUBLISHED_CONFIG = {
    "_name_or_path": "naver/provence-reranker-debertav3-v1",
    "architectures": ["Provence"],
    "auto_map": {"AutoConfig": "modeling_provence.ProvenceConfig", "AutoModel": "modeling_provence.Provence"},
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": HIDDEN, "id2label": {"0": "LABEL_0"}, "initializer_range": 0.02,
    "intermediate_size": 64, "label2id": {"LABEL_0": 0}, "layer_norm_eps": 1e-07,
    "max_position_embeddings": 64, "max_relative_positions": -1, "model_type": "Provence",
    "norm_rel_ebd": "layer_norm", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0,
    "pooler_dropout": 0, "pooler_hidden_act": "gelu", "pooler_hidden_size": HIDDEN,
    "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "position_buckets": 16,
    "relative_attention": True, "share_att_key": True, "torch_dtype": "float32",
    "transformers_version": "4.45.1", "type_vocab_size": 0, "vocab_size": 30522,
}
# Names from the published file (bergen's DebertaV2ForCompressionAndRanking, the candle port).
PUBLISHED_NAMES = {
    "deberta.embeddings.word_embeddings.weight", "deberta.embeddings.LayerNorm.weight",
    "deberta.encoder.layer.1.attention.self.query_proj.weight", "deberta.encoder.layer.0.output.dense.bias",
    "deberta.encoder.rel_embeddings.weight", "deberta.encoder.LayerNorm.bias",
    "pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias",
    "token_classifier.weight", "token_classifier.bias",
}


def _backbone_config() -> transformers.DebertaV2Config:
    skip = {"_name_or_path", "architectures", "auto_map", "model_type", "id2label", "label2id",
            "torch_dtype", "transformers_version"}
    return transformers.DebertaV2Config(**{k: v for k, v in PUBLISHED_CONFIG.items() if k not in skip})


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny random DeBERTa-v2 saved exactly as the published checkpoint is laid out."""
    folder = tmp_path_factory.mktemp("provence-published")
    torch.manual_seed(0)
    deberta = transformers.DebertaV2Model(_backbone_config())
    state = {f"deberta.{k}": v.clone() for k, v in deberta.state_dict().items()}
    state["pooler.dense.weight"] = torch.randn(HIDDEN, HIDDEN) * 0.3
    state["pooler.dense.bias"] = torch.randn(HIDDEN) * 0.1
    state["classifier.weight"] = torch.randn(1, HIDDEN)
    state["classifier.bias"] = torch.randn(1)
    state["token_classifier.weight"] = torch.randn(2, HIDDEN) * 0.5
    state["token_classifier.bias"] = torch.zeros(2)
    assert set(state) >= PUBLISHED_NAMES
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    transformers.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(folder))
    return folder, state


@pytest.fixture(scope="module")
def tok(published: tuple[Path, dict]) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()))  # the one saved in `published`


def _comp(folder: Path, **kw: object) -> ProvenceCompressor:
    return ProvenceCompressor(str(folder), device="cpu", **kw)


def _reference(state: dict, ids: list[int]) -> tuple[float, np.ndarray]:
    """Ranking logit and keep probabilities as the published model computes them, by hand."""
    deberta = transformers.DebertaV2Model(_backbone_config()).eval()
    deberta.load_state_dict({k[len("deberta."):]: v for k, v in state.items() if k.startswith("deberta.")})
    with torch.no_grad():
        h = deberta(torch.tensor([ids])).last_hidden_state[0]
        pooled = torch.nn.functional.gelu(h[0] @ state["pooler.dense.weight"].T + state["pooler.dense.bias"])
        rank = pooled @ state["classifier.weight"].T + state["classifier.bias"]
        token_logits = h @ state["token_classifier.weight"].T + state["token_classifier.bias"]
        keep = torch.softmax(token_logits, -1)[:, 1]
    return float(rank[0]), keep.numpy()


def test_published_layout_loads_exactly(published: tuple[Path, dict]) -> None:
    folder, state = published
    model = ProvenceModel.from_pretrained(folder)
    assert model.backbone_config.model_type == "deberta-v2" and model.token_labels == 2
    ours = model.state_dict()
    mapped = {k.replace("deberta.", "backbone.", 1) if k.startswith("deberta.") else k: v
              for k, v in state.items()}
    assert set(ours) == set(mapped)
    assert all(torch.equal(ours[k], v) for k, v in mapped.items())
    assert not model.training


def test_heads_compute_what_the_published_model_computes(published: tuple[Path, dict], tok) -> None:
    folder, state = published
    ids = tok(QUERY, PASSAGES[0].text)["input_ids"]
    rank, keep = _reference(state, ids)
    model = ProvenceModel.from_pretrained(folder)
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.ranking_logits.shape == (1,) and out.token_logits.shape == (1, len(ids), 2)
    assert math.isclose(float(out.ranking_logits[0]), rank, abs_tol=1e-5)
    np.testing.assert_allclose(model.keep_probs(out.token_logits)[0].numpy(), keep, atol=1e-5)


def test_input_is_cls_query_sep_passage_sep(published: tuple[Path, dict], tok) -> None:
    comp = _comp(published[0])
    q = tok(QUERY, add_special_tokens=False)["input_ids"]
    p = tok(PASSAGES[0].text, add_special_tokens=False)["input_ids"]
    (w,) = comp.encode_windows(q, p, tok, 64)
    assert w.input_ids == tok(QUERY, PASSAGES[0].text)["input_ids"]
    assert (w.lo, w.hi, w.offset) == (0, len(p), len(q) + 2)


def test_deterministic_and_independent_of_batch(published: tuple[Path, dict]) -> None:
    comp = _comp(published[0], threshold=0.5)
    a, b = comp.compress(QUERY, PASSAGES), comp.compress(QUERY, PASSAGES)
    assert [(c.passage.id, c.text, c.spans, c.score) for c in a.items] == \
           [(c.passage.id, c.text, c.spans, c.score) for c in b.items]
    together = comp.score(QUERY, PASSAGES)
    for i, p in enumerate(PASSAGES):  # padding next to longer passages must not change a passage's scores
        (alone,) = comp.score(QUERY, [p])
        assert math.isclose(alone.ranking, together[i].ranking, abs_tol=1e-5)
        np.testing.assert_allclose(alone.sentence_scores, together[i].sentence_scores, atol=1e-5)


def test_threshold_zero_keeps_everything_one_keeps_nothing(published: tuple[Path, dict]) -> None:
    everything = _comp(published[0], threshold=0.0).compress(QUERY, PASSAGES)
    assert not everything.empty and all(c.kept for c in everything.items)
    assert {c.passage.id: c.text for c in everything.items} == {p.id: p.text for p in PASSAGES}
    nothing = _comp(published[0], threshold=1.0).compress(QUERY, PASSAGES)
    assert nothing.empty and nothing.context == "" and nothing.tokens_out == 0
    assert len(nothing.items) == 3 and not any(c.kept for c in nothing.items)
    assert all(isinstance(c.score, float) for c in nothing.items)  # still ranked


def test_kept_text_is_whole_sentences_verbatim_in_order(published: tuple[Path, dict]) -> None:
    scored = _comp(published[0]).score(QUERY, PASSAGES)
    all_scores = np.concatenate([s.sentence_scores for s in scored])
    threshold = float(np.median(all_scores))
    assert all_scores.min() < threshold < all_scores.max()  # a real cut: some kept, some not
    res = _comp(published[0], threshold=threshold).compress(QUERY, PASSAGES)
    by_id = {s.passage.id: s for s in scored}
    for item in res.items:
        s = by_id[item.passage.id]
        pairs = zip(s.sentences, s.sentence_scores, strict=True)
        expected = [(x.start, x.end) for x, sc in pairs if sc > threshold]
        assert item.spans == expected and item.kept == bool(expected)
        assert item.spans == sorted(item.spans)
        whole = {(x.start, x.end) for x in split_sentences(item.passage.text)}
        assert set(item.spans) <= whole
        assert item.text == " ".join(item.passage.text[a:b] for a, b in item.spans)
    assert 0 < sum(len(c.spans) for c in res.items) < len(all_scores)  # some sentences kept, some cut
    titled = _comp(published[0], threshold=threshold, always_select_title=True).compress(QUERY, PASSAGES)
    for item, plain in zip(titled.items, res.items, strict=True):
        first = split_sentences(item.passage.text)[0]
        assert item.spans == sorted({*plain.spans, (first.start, first.end)} if plain.kept else [])


def test_min_and_max_sentences_pick_best_scores_over_all_passages(published: tuple[Path, dict]) -> None:
    scored = _comp(published[0]).score(QUERY, PASSAGES)
    ranked = sorted(((s.sentence_scores[j], s.passage.id, j) for s in scored
                     for j in range(len(s.sentences))), reverse=True)
    spans = {s.passage.id: [(x.start, x.end) for x in s.sentences] for s in scored}

    def kept(res) -> set[tuple[str, tuple[int, int]]]:
        return {(c.passage.id, sp) for c in res.items for sp in c.spans}

    def best(n: int) -> set[tuple[str, tuple[int, int]]]:
        return {(pid, spans[pid][j]) for _, pid, j in ranked[:n]}

    floor = _comp(published[0], threshold=1.0, min_sentences=2).compress(QUERY, PASSAGES)
    assert not floor.empty and kept(floor) == best(2)  # threshold 1 keeps nothing; the floor adds 2
    cap = _comp(published[0], threshold=0.0, max_sentences=3).compress(QUERY, PASSAGES)
    assert kept(cap) == best(3)
    both = _comp(published[0], threshold=0.0, min_sentences=1, max_sentences=len(ranked) + 5)
    assert len(kept(both.compress(QUERY, PASSAGES))) == len(ranked)  # neither bound binds
    with pytest.raises(ValueError, match="min_sentences \\(4\\) is above max_sentences \\(2\\)"):
        ProvenceCompressor(str(published[0]), min_sentences=4, max_sentences=2)
    with pytest.raises(ValueError, match="max_sentences must be an integer >= 1"):
        ProvenceCompressor(str(published[0]), max_sentences=0)


def test_rerank_follows_ranking_logits(published: tuple[Path, dict], tok) -> None:
    folder, state = published
    logits = {p.id: _reference(state, tok(QUERY, p.text)["input_ids"])[0] for p in PASSAGES}
    assert len({round(v, 6) for v in logits.values()}) == 3
    expected = sorted(logits, key=logits.get, reverse=True)
    res = _comp(folder, threshold=0.0).compress(QUERY, PASSAGES)
    assert [c.passage.id for c in res.items] == expected
    for c in res.items:
        assert math.isclose(c.score, logits[c.passage.id], abs_tol=1e-5)
    plain = _comp(folder, threshold=0.0, rerank=False).compress(QUERY, PASSAGES)
    assert [c.passage.id for c in plain.items] == [p.id for p in PASSAGES]
    top1 = _comp(folder, threshold=0.0, top_k=1).compress(QUERY, PASSAGES)
    assert [c.passage.id for c in top1.kept] == [expected[0]] and len(top1.items) == 3


def test_long_passage_is_read_in_overlapping_windows(published: tuple[Path, dict], tok) -> None:
    folder, state = published
    text = " ".join(f"Sentence number {i} talks about topic {i * 7} in some detail." for i in range(30))
    p_ids = tok(text, add_special_tokens=False)["input_ids"]
    q_ids = tok(QUERY, add_special_tokens=False)["input_ids"]
    window, stride = 48, 8
    room = window - len(q_ids) - 3
    assert len(p_ids) > 4 * room
    comp = _comp(folder, threshold=0.0, window=window, stride=stride)
    (s,) = comp.score(QUERY, [text])
    n_windows = 1 + math.ceil((len(p_ids) - room) / (room - stride))
    assert len(s.windows) == n_windows
    assert s.windows[0][0] == 0 and s.windows[-1][1] == len(p_ids)
    for (_, b0), (a1, _) in zip(s.windows, s.windows[1:], strict=False):
        assert b0 - a1 == stride  # consecutive windows share `stride` tokens
    # Each token's probability is the mean over the windows that read it (computed by hand here).
    sums, counts, ranks = np.zeros(len(p_ids)), np.zeros(len(p_ids)), []
    for w in comp.encode_windows(q_ids, p_ids, tok, window):
        assert len(w.input_ids) <= window
        rank, keep = _reference(state, w.input_ids)
        sums[w.lo : w.hi] += keep[w.offset : w.offset + w.hi - w.lo]
        counts[w.lo : w.hi] += 1
        ranks.append(rank)
    assert counts.min() >= 1 and counts.max() == 2
    np.testing.assert_allclose(s.token_probs, sums / counts, atol=1e-5)
    assert math.isclose(s.ranking, max(ranks), abs_tol=1e-5)
    assert len(s.sentences) == 30 and np.isfinite(s.sentence_scores).all()
    assert len(set(np.round(s.sentence_scores[-5:], 6))) > 1  # the tail has its own scores
    res = comp.compress(QUERY, [text])
    assert res.items[0].text == text  # threshold 0: nothing lost at the end, nothing truncated
    tail = _comp(folder, threshold=float(np.median(s.sentence_scores)), window=window, stride=stride)
    assert any(span[0] >= s.sentences[-8].start for span in tail.compress(QUERY, [text]).items[0].spans)


def test_mixed_language_text_keeps_verbatim_sentences(published: tuple[Path, dict]) -> None:
    text = ("Paris est la capitale de la France. 東京は日本の首都です。Москва — столица России. "
            "Emoji 🙂 and accents: café, naïve, Ærø.")
    for window in (None, 16):
        res = _comp(published[0], threshold=0.0, window=window).compress(QUERY, ["", text])
        kept = res.kept[0]
        assert kept.spans == [(x.start, x.end) for x in split_sentences(text)] and len(kept.spans) == 4
        assert [text[a:b] for a, b in kept.spans][1] == "東京は日本の首都です。"
        assert kept.text == " ".join(text[a:b] for a, b in kept.spans)


def test_bad_input(published: tuple[Path, dict]) -> None:
    folder, _ = published
    for bad in (-0.1, 1.1, float("nan"), "0.5", True, None):
        with pytest.raises(ValueError, match="threshold must be a number in"):
            ProvenceCompressor(str(folder), threshold=bad)  # type: ignore[arg-type]
    for kw in ({"top_k": -1}, {"window": 4}, {"stride": -1}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            ProvenceCompressor(str(folder), **kw)  # type: ignore[arg-type]
    comp = _comp(folder, threshold=0.0)
    empty = comp.compress(QUERY, [])
    assert empty.empty and empty.items == [] and empty.context == ""
    res = comp.compress(QUERY, [Passage("blank", "   "), Passage("none", ""), PASSAGES[1]])
    by_id = {c.passage.id: c for c in res.items}
    assert not by_id["blank"].kept and by_id["blank"].score is None and not by_id["none"].kept
    assert by_id["everest"].kept and res.items[0].passage.id == "everest"  # unscored passages go last
    assert res.context == PASSAGES[1].text
    with pytest.raises(TypeError):
        comp.compress(None, PASSAGES)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="could not load Provence model 'no-such-org/no-such-provence'"):
        ProvenceCompressor("no-such-org/no-such-provence", device="cpu").compress(QUERY, PASSAGES)
    with pytest.raises(ValueError, match="encoder_tokenizer"):
        ProvenceCompressor(ProvenceModel.from_pretrained(folder)).compress(QUERY, PASSAGES)
    not_provence = folder.parent / "not-provence"
    not_provence.mkdir(exist_ok=True)
    (not_provence / "config.json").write_text(json.dumps({"model_type": "bert"}))
    safetensors_torch.save_file({"x": torch.zeros(1)}, str(not_provence / "model.safetensors"))
    with pytest.raises(ValueError, match="not a Provence checkpoint"):
        ProvenceModel.from_pretrained(not_provence)


def test_runtime_settings_as_one_object_or_as_keywords() -> None:
    from ragcomp import load_compressor
    from ragcomp.compressors.provence import ProvenceRuntime

    keywords = {"device": "cpu", "batch_size": 8, "window": 128, "stride": 16, "fast_encoder": "flex",
                "cuda_graphs": False, "graph_width_multiple": 8, "passage_cache": 0}
    plain = ProvenceCompressor(**keywords)  # type: ignore[arg-type]
    grouped = ProvenceCompressor(runtime=ProvenceRuntime(**keywords))
    assert plain.runtime == grouped.runtime == ProvenceRuntime(**keywords)
    assert plain.params() == grouped.params() and grouped.passage_cache.size == 0
    assert ProvenceCompressor().runtime == ProvenceRuntime()  # the defaults are the runtime's
    # A keyword away from its default overrides that field; a mapping works like the object.
    mixed = load_compressor("provence", runtime={"device": "cpu", "batch_size": 32}, batch_size=4)
    assert mixed.runtime == ProvenceRuntime(device="cpu", batch_size=4)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ProvenceCompressor(runtime=ProvenceRuntime(batch_size=4), batch_size=0)
    with pytest.raises(ValueError, match="window must be an integer >= 8"):
        ProvenceRuntime(window=4)
    with pytest.raises(TypeError, match=r"unknown runtime setting.*'bogus'"):
        ProvenceCompressor(runtime={"bogus": 1})
    with pytest.raises(TypeError, match=r"unknown parameter.*'bogus'.*runtime"):
        load_compressor("provence", bogus=1)


def test_unknown_published_key_is_an_error(published: tuple[Path, dict], tmp_path: Path) -> None:
    folder, state = published
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    extra = {**state, "extra_head.weight": torch.zeros(2)}
    safetensors_torch.save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"extra_head\.weight"):
        ProvenceModel.from_pretrained(tmp_path)


def test_own_format_roundtrip_with_minilm_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ProvenceModel.from_backbone(str(minilm_path())).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ragcomp-provence"
    loaded = ProvenceModel.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.uses_token_types and loaded.backbone_config.model_type == "bert"
    enc = tok(QUERY, PASSAGES[0].text, return_tensors="pt")
    with torch.no_grad():
        x = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        y = loaded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert torch.equal(x.ranking_logits, y.ranking_logits) and torch.equal(x.token_logits, y.token_logits)
    res = ProvenceCompressor(str(tmp_path), device="cpu", threshold=0.0).compress(QUERY, PASSAGES)
    assert len(res.kept) == 3


def test_training_signature_and_one_logit_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for labels_n in (2, 1):
        model = ProvenceModel(_backbone_config(), token_labels=labels_n)
        ids = torch.randint(5, 1000, (2, 12))
        labels = torch.randint(0, 2, (2, 12))
        labels[:, :4] = -100  # query and special tokens are not scored
        out = model(ids, torch.ones_like(ids), labels=labels, ranking_labels=torch.tensor([2.0, -1.0]))
        assert out.loss is not None and torch.isfinite(out.loss)
        assert torch.allclose(out.loss, out.token_loss + out.ranking_loss)
        out.loss.backward()
        assert model.token_classifier.weight.grad is not None and model.classifier.weight.grad is not None
        probs = model.keep_probs(out.token_logits)
        assert probs.shape == (2, 12) and bool(((probs > 0) & (probs < 1)).all())
        model.save_pretrained(tmp_path / str(labels_n))
        assert ProvenceModel.from_pretrained(tmp_path / str(labels_n)).token_labels == labels_n


def test_model_object_lent_in_training_mode() -> None:
    torch.manual_seed(0)
    model = ProvenceModel(_backbone_config()).train()
    comp = ProvenceCompressor(model, encoder_tokenizer=str(minilm_path()), threshold=0.0)
    a, b = comp.score(QUERY, PASSAGES), comp.score(QUERY, PASSAGES)
    assert model.training  # mode restored, and no dropout while scoring
    assert [x.ranking for x in a] == [x.ranking for x in b]
    assert comp.compress(QUERY, PASSAGES).context
