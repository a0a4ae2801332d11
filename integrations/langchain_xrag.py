"""xrag for LangChain: a runnable whose reader sees each document as ONE token.

    from ragcomp.compressors.xrag import XragCompressor
    from ragcomp.integrations.langchain_xrag import XragRunnable

    chain = XragRunnable(compressor=XragCompressor(), retriever=retriever)     # str -> str
    chain.invoke("Who painted the Mona Lisa?")

    # or inside LCEL, with documents coming from elsewhere:
    chain = {"documents": retriever, "question": RunnablePassthrough()} | XragRunnable(compressor=comp)

Document embeddings are reused from `metadata["embedding"]` when a store returns them, else from the
compressor's index, store or embedder. A reader that cannot take embeddings (an OpenAI-compatible
client) answers from the text fallback, said once. `return_stats=True` returns
{"answer", "stats", "documents"}.

Needs `pip install 'ragcomp[langchain,models]'`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ragcomp._optional import require

require("langchain_core", "langchain")  # fail here, with the install hint, not deep inside

from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import RunnableConfig  # noqa: E402

from ragcomp.compressors.xrag import XragCompressor, answer_with_xrag  # noqa: E402
from ragcomp.integrations.langchain_kv import KVCacheRunnable, documents_to_passages  # noqa: E402
from ragcomp.llm import Reader, load_reader  # noqa: E402

__all__ = ["XragRunnable"]


class XragRunnable(KVCacheRunnable):
    """Question (+ documents) -> answer read from one projected embedding per document.

    Input: a question string (documents then come from `retriever`), or a dict with
    "question" (or "query"/"input") and "documents" (or "context"): a list of Documents.
    """

    def __init__(self, compressor: XragCompressor | None = None, retriever: BaseRetriever | None = None,
                 reader: Reader | str = "smollm2-135m", max_new_tokens: int = 32,
                 return_stats: bool = False) -> None:
        if compressor is not None and not isinstance(compressor, XragCompressor):
            raise TypeError(f"compressor must be an XragCompressor, got {type(compressor).__name__}")
        # The input handling (str or dict, retriever) is KVCacheRunnable's; the answering is ours.
        self.compressor = compressor or XragCompressor()
        self.reader = load_reader(reader, max_new_tokens=max_new_tokens)
        self.retriever = retriever
        self.max_new_tokens = max_new_tokens
        self.return_stats = return_stats

    def _generate(self, question: str, docs: list[Any]) -> tuple[str, dict[str, Any]]:
        if not docs:
            return "", {"documents": 0}
        return answer_with_xrag(self.compressor, self.reader, question, documents_to_passages(docs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.invoke, input, config)
