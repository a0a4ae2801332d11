"""Wikipedia questions in LangChain with xrag: each retrieved summary reaches the reader as ONE token.

    python examples/xrag_langchain.py [--projector DIR] [--top-k 3]

Offline (packaged Wikipedia summaries, MiniLM + FAISS retrieval, SmolLM2-135M-Instruct reader).
The retriever puts each document's stored vector in `metadata["embedding"]`; `XragRunnable`
projects it to one input embedding of the reader. The same runnable composes in LCEL:
`{"documents": retriever, "question": RunnablePassthrough()} | XragRunnable(...)`.
"""

from __future__ import annotations

import argparse

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from ragcomp.compressors.xrag import XragCompressor
from ragcomp.integrations.langchain import XragRunnable
from ragcomp.retrieval import CorpusRetriever

QUESTIONS = [
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
]


class WikiRetriever(BaseRetriever):
    """Top-k Wikipedia summaries as Documents carrying their index vectors."""

    k: int = 3
    corpus: object = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun
                                ) -> list[Document]:
        if self.corpus is None:
            self.corpus = CorpusRetriever.for_corpus("wiki")
        hits = self.corpus.retrieve(query, self.k)
        vectors = self.corpus.index.vectors([p.id for p in hits])
        return [Document(p.text, id=p.id, metadata={"score": p.score, "embedding": v.tolist()})
                for p, v in zip(hits, vectors, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projector", default=None, help="projector folder (default: the packaged one)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("questions", nargs="*", default=QUESTIONS)
    args = parser.parse_args()
    chain = XragRunnable(compressor=XragCompressor(args.projector, encode_missing=False),
                         retriever=WikiRetriever(k=args.top_k), return_stats=True)
    for q in args.questions:
        out = chain.invoke(q)
        print(f"Q: {q}\nA: {out['answer']}   ({out['stats']['tokens_out']} context tokens instead of "
              f"{out['stats']['tokens_in']})\n")


if __name__ == "__main__":
    main()
