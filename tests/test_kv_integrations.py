"""The KV cache inside LlamaIndex (query engine, prefetch postprocessor) and LangChain (runnable),
with the real SmolLM2 weights and tiny in-test retrievers."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ragcomp.types import Passage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


TEXTS = {
    "eiffel": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889.",
    "nile": "The Nile is a major north-flowing river in Africa. It flows into the Mediterranean.",
}
QUESTION = "When was the Eiffel Tower completed?"


@pytest.fixture(scope="module")
def kv():
    from ragcomp.kv import KVCache
    from ragcomp.models import load_causal_lm

    try:
        lm = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    except (ImportError, OSError) as e:  # pragma: no cover - offline weights missing
        pytest.skip(f"SmolLM2 weights unavailable: {e}")
    return KVCache(lm, "memory")


@pytest.fixture(scope="module")
def reference(kv) -> list[int]:
    return kv.generate(QUESTION, [Passage(i, t) for i, t in TEXTS.items()], max_new_tokens=3).token_ids


async def test_llama_index_query_engine(kv, reference: list[int]) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from ragcomp.integrations.llama_index_kv import KVCacheQueryEngine, KVPrefetchPostprocessor

    class Fixed(BaseRetriever):
        def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
            return [NodeWithScore(node=TextNode(id_=i, text=t, metadata={"title": i}), score=1.0)
                    for i, t in TEXTS.items()]

    engine = KVCacheQueryEngine(Fixed(), kv, max_new_tokens=3,
                                node_postprocessors=[KVPrefetchPostprocessor(kv)])
    resp = engine.query(QUESTION)
    stats = resp.metadata["ragcomp_kv"]
    assert [n.node.node_id for n in resp.source_nodes] == list(TEXTS)
    assert stats["misses"] == 0 and stats["hits"]["cpu"] == 3  # cached by the reference call
    assert resp.response == kv.tokenizer.decode(reference, skip_special_tokens=True).strip()
    aresp = await engine.aquery(QUESTION)
    assert aresp.response == resp.response


async def test_langchain_runnable(kv, reference: list[int]) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnablePassthrough

    from ragcomp.integrations.langchain_kv import KVCacheRunnable

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun
                                    ) -> list[Document]:
            return [Document(page_content=t, id=i) for i, t in TEXTS.items()]

    expected = kv.tokenizer.decode(reference, skip_special_tokens=True).strip()
    chain = KVCacheRunnable(kv_cache=kv, retriever=Fixed(), max_new_tokens=3)
    assert chain.invoke(QUESTION) == expected
    assert await chain.ainvoke(QUESTION) == expected
    lcel = {"documents": Fixed(), "question": RunnablePassthrough()} | KVCacheRunnable(
        kv_cache=kv, max_new_tokens=3, return_stats=True)
    out = lcel.invoke(QUESTION)
    assert out["answer"] == expected and out["stats"]["misses"] == 0 and len(out["documents"]) == 2
    with pytest.raises(ValueError, match="retriever"):
        KVCacheRunnable(kv_cache=kv).invoke(QUESTION)
