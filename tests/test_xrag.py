"""xrag: projector formats, the placeholder bridge on real SmolLM2, embedding reuse, fallback,
training, eval rows and the framework wrappers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from ragcomp.base import TokenBudget  # noqa: E402
from ragcomp.compressors.xrag import XragCompressor  # noqa: E402
from ragcomp.compressors.xrag.context import EmbeddingContext  # noqa: E402
from ragcomp.compressors.xrag.model import (  # noqa: E402
    Projector,
    generate_with_embeddings,
    load_projector,
    placeholder_id,
    reader_prompt_ids,
    splice,
)
from ragcomp.embeddings import text_key  # noqa: E402
from ragcomp.llm import Reader  # noqa: E402
from ragcomp.stores.memory import MemoryStore  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def projector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random MiniLM (384) -> SmolLM2 (576) projector in our format."""
    torch.manual_seed(0)
    proj = Projector(384, 576)
    proj.info = {"embedder": "minilm", "lm": "smollm2-135m"}
    return proj.save(tmp_path_factory.mktemp("xrag") / "proj")


def _index(ids: list[str], dim: int = 384, seed: int = 0):
    from ragcomp.stores.faiss import FaissIndex

    pytest.importorskip("faiss")
    vecs = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    index = FaissIndex(dim, info={"embedder": "minilm"})
    index.add(ids, vecs)
    return index


# -- projector formats --------------------------------------------------------------------------
def test_published_sharded_layout_loads_only_projector_keys(tmp_path: Path) -> None:
    """A tiny Mistral saved like xrag-7b: LLM keys in one shard, projector.projector.* in another."""
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    llm = MistralForCausalLM(cfg)
    torch.manual_seed(1)
    proj = Projector(8, 16)
    save_file({k: v.contiguous() for k, v in llm.state_dict().items()},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({f"projector.{k}": v for k, v in proj.state_dict().items()},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in llm.state_dict()}
    weight_map.update({f"projector.{k}": "model-00002-of-00002.safetensors" for k in proj.state_dict()})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "retriever_hidden_size": 8,
                                                      "projector_type": "mlp2x_gelu"}))
    loaded = load_projector(tmp_path)
    x = torch.randn(3, 8)
    assert sorted(loaded.state_dict()) == ["projector.0.bias", "projector.0.weight",
                                           "projector.2.bias", "projector.2.weight"]
    assert torch.allclose(loaded(x), proj(x), atol=1e-6)


def test_our_format_roundtrip_and_bad_files(tmp_path: Path, projector_dir: Path) -> None:
    proj = load_projector(projector_dir)
    assert (proj.retriever_hidden_size, proj.hidden_size) == (384, 576)
    assert proj.info == {"embedder": "minilm", "lm": "smollm2-135m"}
    assert sum(p.numel() for p in proj.parameters()) == 384 * 576 + 576 + 576 * 576 + 576
    # The .safetensors file itself works too.
    same = load_projector(projector_dir / "projector.safetensors")
    x = torch.randn(2, 384)
    assert torch.equal(same(x), proj(x))
    with pytest.raises(ValueError, match="has size 100 but the xrag projector takes 384"):
        proj(torch.randn(1, 100))
    with pytest.raises(FileNotFoundError, match=r"xrag projector not found at .*nowhere"):
        load_projector(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"retriever_hidden_size": 384, "hidden_size": 600}))
    (bad / "projector.safetensors").write_bytes((projector_dir / "projector.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"0.weight has shape \(576, 384\), config.json implies \(600"):
        load_projector(bad)
    (bad / "config.json").write_text(json.dumps({"hidden_size": 576}))
    with pytest.raises(ValueError, match="lacks retriever_hidden_size"):
        load_projector(bad)


# -- the bridge on the real SmolLM2 ---------------------------------------------------------------
def test_placeholder_takes_exactly_the_given_embedding(lm) -> None:
    """A placeholder whose embedding is a real token's row reads exactly like that token."""
    tok = lm.tokenizer
    pid = placeholder_id(tok)
    ids = reader_prompt_ids(tok, "Which city is the Eiffel Tower in?", 1, pid)
    assert ids.count(pid) == 1
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    row = lm.model.get_input_embeddings().weight[paris].detach()[None]
    as_text = [paris if t == pid else t for t in ids]
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([as_text])).logits
        ids_t = torch.tensor([ids])
        got = lm.model(inputs_embeds=splice(lm.model, ids_t, row, pid)).logits
    assert torch.allclose(got, ref, atol=1e-4)
    text = generate_with_embeddings(lm, [ids], [row.numpy()], pid, max_new_tokens=8)
    assert text == lm.generate_batch([as_text], max_new_tokens=8)


def test_bridge_errors_name_the_mismatch(lm) -> None:
    pid = placeholder_id(lm.tokenizer)
    ids = torch.tensor([reader_prompt_ids(lm.tokenizer, "Who?", 2, pid)])
    with pytest.raises(ValueError, match=r"prompt has 2 xrag placeholder token\(s\) but 1 document"):
        splice(lm.model, ids, torch.zeros(1, 576), pid)
    with pytest.raises(ValueError, match="hidden size is 576: projector and LLM do not match"):
        splice(lm.model, ids, torch.zeros(2, 384), pid)

    class NoHook(torch.nn.Module):
        def get_input_embeddings(self):
            return None

    with pytest.raises(TypeError, match=r"NoHook has no input embedding matrix \(get_input_embeddings\(\)\)"):
        splice(NoHook(), ids, torch.zeros(2, 576), pid)


def test_local_reader_mixes_text_and_embedding_contexts(lm) -> None:
    from ragcomp.llm.local import LocalReader

    reader = LocalReader(lm, max_new_tokens=8)
    paris = lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    row = lm.model.get_input_embeddings().weight[paris].detach().numpy()[None]
    q = "Which city is the Eiffel Tower in?"
    text_ctx = "The Eiffel Tower is a tower in Paris, France."
    mixed = reader.answer_batch([(q, EmbeddingContext(text_ctx, row)), (q, text_ctx), (q, None)])
    assert mixed[1:] == reader.answer_batch([(q, text_ctx), (q, None)])
    assert "Paris" in mixed[0]  # the one-token context carries the city
    # Left-padded batches of one-token contexts answer as one at a time.
    rome = lm.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    rows = lm.model.get_input_embeddings().weight[[paris, rome]].detach().numpy()
    items = [(q, EmbeddingContext("x", rows[:1])), ("In which city is the Colosseum, an amphitheatre?",
                                                    EmbeddingContext("y", rows))]
    assert reader.answer_batch(items) == [reader.answer(*items[0]), reader.answer(*items[1])]


# -- the compressor: reused embeddings, one token per document, fallback ---------------------------
class NoEncoder:
    """Stands in for the retriever's embedder where the test proves it is never called."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the embedder was used ({name}) although the vectors were stored")


def test_embeddings_come_from_index_store_and_metadata(projector_dir: Path) -> None:
    index = _index(["a", "b"])
    store = MemoryStore()
    c_vec = np.random.default_rng(5).normal(size=384).astype(np.float32)
    store.set_many([(text_key("minilm", "Text C."), c_vec.astype("<f4").tobytes())])
    comp = XragCompressor(projector_dir, vector_index=index, store=store, encode_missing=False)
    comp._cached = NoEncoder()
    d_vec = np.ones(384, dtype=np.float32)
    passages = [Passage("a", "Text A."), Passage("b", "Text B."), Passage("c", "Text C."),
                Passage("d", "Text D.", metadata={"embedding": d_vec.tolist()})]
    res = comp.compress("q", passages)
    assert isinstance(res.context, EmbeddingContext)
    assert res.tokens_out == 4 and res.context.n_docs == 4
    assert str(res.context) == "Text A.\n\nText B.\n\nText C.\n\nText D."
    want = comp.project(np.stack([*index.vectors(["a", "b"]), c_vec, d_vec]))
    np.testing.assert_allclose(res.context.embeddings, want, atol=1e-6)
    assert dict(comp.stats) == {"index": 2, "store": 1, "metadata": 1}
    with pytest.raises(ValueError, match="no stored embedding for passage 'zz' and encode_missing=False"):
        comp.compress("q", [Passage("zz", "unknown")])
    bad = Passage("e", "E", metadata={"embedding": [0.0] * 10})
    with pytest.raises(ValueError, match=r"passage 'e' \(metadata\) has size 10 but the xrag projector"):
        comp.compress("q", [bad])


def test_top_k_fallback_and_config_mismatches(projector_dir: Path) -> None:
    index = _index(["a", "b", "c"])
    comp = XragCompressor(projector_dir, vector_index=index, top_k=2,
                          fallback=TokenBudget(3, tokenizer="whitespace", truncate="tokens"))
    res = comp.compress("q", [Passage("a", "one two three four"), Passage("b", "five six"),
                              Passage("c", "seven")])
    assert [c.passage.id for c in res.kept] == ["a", "b"]
    assert res.context.n_docs == 2 and str(res.context) == "one two three"
    assert comp.fallback == "budget"
    empty = comp.compress("q", [])
    assert empty.empty and empty.context == "" and empty.tokens_out == 0
    with pytest.raises(ValueError, match="trained on 'minilm' embeddings, not 'other'"):
        XragCompressor(projector_dir, embedder="other")
    with pytest.raises(ValueError, match="vector_index has dim 8 but the xrag projector takes 384"):
        XragCompressor(projector_dir, vector_index=_index(["x"], dim=8))


class TextOnlyReader(Reader):
    """A reader that cannot take embeddings (like a remote API): records what it was given."""

    name = "text-only"
    tokenizer = "whitespace"

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def answer(self, question: str, context: str | None) -> str:
        self.seen.append(context)
        return "ok"


def test_text_only_reader_falls_back_once(projector_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ragcomp.compressors.xrag import answer_with_xrag
    from ragcomp.compressors.xrag import context as xrag_context

    xrag_context._WARNED.clear()
    comp = XragCompressor(projector_dir, vector_index=_index(["a"]))
    reader = TextOnlyReader()
    for _ in range(2):
        answer, stats = answer_with_xrag(comp, reader, "q", [Passage("a", "Alpha text here.")])
        assert answer == "ok" and stats["mode"] == "text fallback (full text)" and stats["tokens_out"] == 3
    assert reader.seen == ["Alpha text here."] * 2 and type(reader.seen[0]) is str
    assert capsys.readouterr().err.count("cannot take document embeddings") == 1


# -- eval rows, training, integrations -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """12 wiki summaries that no qa_dev question uses, and 2 questions of our own over them."""
    if not (SHARED / "wiki_summaries_en.json").is_file():
        pytest.skip("shared wiki data missing")
    banned = {t for line in (SHARED / "qa_dev.jsonl").read_text().splitlines() if line.strip()
              for t in json.loads(line)["titles"]}
    wiki = json.loads((SHARED / "wiki_summaries_en.json").read_text())
    keys = [k for k in sorted(wiki) if k not in banned and wiki[k].get("description")][:12]
    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.json"
    corpus.write_text(json.dumps({k: wiki[k] for k in keys}))
    qs = [{"id": f"t{i}", "question": f"What is {k}?", "answers": [wiki[k]["description"]], "titles": [k],
           "evidence": []} for i, k in enumerate(keys[:2])]
    data = root / "qa.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in qs))
    return corpus, data, qs


@pytest.mark.slow
def test_training_saves_a_projector_the_compressor_loads(tmp_path: Path, lm, tiny_corpus) -> None:
    from ragcomp.text import split_sentences
    from ragcomp.train.xrag import train

    corpus, _, _ = tiny_corpus
    doc_id, rec = next(iter(json.loads(corpus.read_text()).items()))
    text = rec["extract"]
    spans = [[x.start, x.end] for x in split_sentences(text)]
    eval_question = json.loads((SHARED / "qa_dev.jsonl").read_text().splitlines()[0])["question"]
    questions = tmp_path / "questions.jsonl"  # provence-data records; the evaluation one is dropped
    labels = [1] + [0] * (len(spans) - 1)
    records = [{"question": q, "passage_id": doc_id, "text": text, "sentences": spans, "labels": labels,
                "ranking_label": 1.0, "kind": "positive", "target": 0}
               for q in (f"What is {doc_id}?", eval_question)]
    questions.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    report = train(out, corpus=corpus, device="cpu", steps1=6, steps2=1, batch_size=2, lr1=1e-2,
                   max_target_tokens=10, max_answer_tokens=6, max_docs=2, dev_docs=2, log_every=1,
                   index_dir=tmp_path / "index", exclude_qa=[SHARED / "qa_dev.jsonl"], progress=False,
                   questions=questions)
    assert report["file_questions"] == 1
    curve = [p["loss"] for p in report["stages"]["1"]["curve"]]
    assert len(curve) == 6 and np.mean(curve[-2:]) < np.mean(curve[:2])  # stage 1 learns
    assert report["stages"]["2"]["steps"] == 1 and report["documents"] == 12
    assert report["parameters"] == 384 * 576 + 576 + 576 * 576 + 576
    comp = XragCompressor(out)
    assert comp.lm == "smollm2-135m" and comp.hidden_size == 576
    with pytest.raises(FileExistsError, match="is not empty"):
        train(out, corpus=corpus, device="cpu", exclude_qa=[SHARED / "qa_dev.jsonl"], progress=False)


@pytest.mark.slow
def test_eval_rows_no_retrieval_full_text_and_xrag(projector_dir: Path, lm, tiny_corpus) -> None:
    from ragcomp.eval import evaluate
    from ragcomp.llm.local import LocalReader

    corpus, data, qs = tiny_corpus
    report = evaluate(data, method="xrag", params={"projector": str(projector_dir)}, corpus=corpus,
                      retrieve_k=2, reader=LocalReader(lm, max_new_tokens=6), baseline=True,
                      no_retrieval=True, device="cpu")
    rows = {r["label"]: r for r in report["runs"]}
    assert list(rows) == ["no retrieval", "none (uncompressed)", f"xrag projector={projector_dir}"]
    xr = rows[f"xrag projector={projector_dir}"]
    assert xr["tokens_out"] == 2 * len(qs)  # one token per retrieved document
    assert rows["no retrieval"]["tokens_out"] == 0 and rows["no retrieval"]["empty_rate"] == 1.0
    assert rows["none (uncompressed)"]["tokens_out"] > 20 * len(qs)
    assert all(isinstance(r["prediction"], str) for r in xr["per_question"])
    with pytest.raises(ValueError, match="'no-retrieval' row takes no parameters"):
        evaluate(data, method="xrag", params={"no-retrieval.top_k": 1}, corpus=corpus, no_retrieval=True)


@pytest.mark.slow
def test_framework_wrappers_answer_from_node_embeddings(projector_dir: Path, lm) -> None:
    pytest.importorskip("llama_index.core")
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode

    from ragcomp.integrations.langchain import XragRunnable
    from ragcomp.integrations.llama_index import XragQueryEngine
    from ragcomp.llm.local import LocalReader

    # The node carries its vector: the engine must answer exactly as the reader does on its projection.
    vec = np.random.default_rng(3).normal(size=384).astype(np.float32)
    comp = XragCompressor(projector_dir, encode_missing=False)
    reader = LocalReader(lm, max_new_tokens=6)
    q = "Which city is the Eiffel Tower in?"
    expected = reader.answer(q, EmbeddingContext("x", comp.project(vec[None])))

    class OneNode(BaseRetriever):
        def _retrieve(self, query_bundle):
            return [NodeWithScore(node=TextNode(text="The Eiffel Tower is in Paris.", id_="eiffel",
                                                embedding=vec.tolist()), score=1.0)]

    resp = XragQueryEngine(OneNode(), compressor=comp, reader=reader).query(q)
    assert resp.response == expected and resp.metadata["ragcomp_xrag"]["tokens_out"] == 1
    chain = XragRunnable(compressor=comp, reader=reader, return_stats=True)
    out = chain.invoke({"question": q, "documents": [Document("The Eiffel Tower is in Paris.", id="eiffel",
                                                              metadata={"embedding": vec.tolist()})]})
    assert out["answer"] == expected and out["stats"]["mode"] == "embeddings"
