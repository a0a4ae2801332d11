"""Document KV cache for LangChain: a runnable that answers from precomputed KV of documents.

    from ragcomp.kv import KVCache
    from ragcomp.integrations.langchain_kv import KVCacheRunnable

    kv = KVCache(model="smollm2-135m", store="redis://localhost:6379/0")
    chain = KVCacheRunnable(kv_cache=kv, retriever=retriever)      # str -> str
    chain.invoke("Who painted the Mona Lisa?")

    # or inside LCEL, with documents coming from elsewhere:
    chain = {"documents": retriever, "question": RunnablePassthrough()} | KVCacheRunnable(kv_cache=kv)

Each document's KV is encoded once (after the shared prefix) and reused by every later
question that retrieves it: only the question is prefilled. `return_stats=True` returns
{"answer", "stats", "documents"} instead of the answer string.

Needs `pip install 'ragcomp[langchain,models]'`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from ragcomp._optional import require

require("langchain_core", "langchain")  # fail here, with the install hint, not deep inside

from langchain_core.documents import Document  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import Runnable, RunnableConfig  # noqa: E402
from langchain_core.runnables.config import ensure_config, get_callback_manager_for_config  # noqa: E402

from ragcomp.kv.cache import KVCache  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

__all__ = ["KVCacheRunnable", "documents_to_passages"]


def documents_to_passages(documents: Sequence[Document]) -> list[Passage]:
    """One Passage per document; the id is the document's id, else a hash of its text (so the
    same text maps to the same cached KV across calls)."""
    out = []
    for d in documents:
        if not isinstance(d, Document):
            raise TypeError(f"expected langchain Document, got {type(d).__name__}")
        pid = d.id or d.metadata.get("id")
        if pid is None:
            pid = "t" + hashlib.blake2b(d.page_content.encode("utf-8"), digest_size=12).hexdigest()
        out.append(Passage(str(pid), d.page_content, d.metadata.get("score"), dict(d.metadata)))
    return out


class KVCacheRunnable(Runnable[Any, Any]):
    """Question (+ documents) -> answer, generated from cached document KV.

    Input: a question string (documents then come from `retriever`), or a dict with
    "question" (or "query"/"input") and "documents" (or "context"): a list of Documents.
    """

    def __init__(self, kv_cache: KVCache, retriever: BaseRetriever | None = None, max_new_tokens: int = 64,
                 repair: Any = True, return_stats: bool = False, reuse: str = "exact") -> None:
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a ragcomp.kv.KVCache, got {type(kv_cache).__name__}")
        self.kv_cache = kv_cache
        self.retriever = retriever
        self.max_new_tokens = max_new_tokens
        self.repair = repair
        self.reuse = reuse  # "exact" (answers equal a full prefill) or "chunks" (see KVCache.generate)
        self.return_stats = return_stats

    @property
    def InputType(self) -> Any:  # LangChain's name
        return str | dict

    @property
    def OutputType(self) -> Any:  # LangChain's name
        return dict if self.return_stats else str

    def _split(self, input: Any, config: RunnableConfig | None) -> tuple[str, list[Document]]:
        if isinstance(input, str):
            if self.retriever is None:
                raise ValueError("a plain question needs retriever=...; or pass {'question', 'documents'}")
            return input, self.retriever.invoke(input, config=config)
        if not isinstance(input, dict):
            raise TypeError(f"input must be a question string or a dict, got {type(input).__name__}")
        question = next((input[k] for k in ("question", "query", "input") if k in input), None)
        if not isinstance(question, str):
            raise ValueError("the input dict needs a 'question' (or 'query' / 'input') string")
        docs = next((input[k] for k in ("documents", "context", "docs") if k in input), None)
        if docs is None:
            if self.retriever is None:
                raise ValueError("the input dict needs 'documents' (or pass retriever=...)")
            docs = self.retriever.invoke(question, config=config)
        return question, list(docs)

    def _answer(self, question: str, docs: list[Document], config: RunnableConfig | None) -> Any:
        config = ensure_config(config)
        manager = get_callback_manager_for_config(config)
        run = manager.on_chain_start(None, {"question": question, "documents": len(docs)},
                                     name=config.get("run_name") or type(self).__name__)
        try:
            text, stats = self._generate(question, docs)
        except BaseException as e:
            run.on_chain_error(e)
            raise
        out = {"answer": text, "stats": stats, "documents": docs} if self.return_stats else text
        run.on_chain_end({"answer": text})
        return out

    def _generate(self, question: str, docs: list[Document]) -> tuple[str, dict[str, Any]]:
        """(answer, stats) for the documents; the part a subclass answering another way replaces."""
        if not docs:
            return "", {}
        ans = self.kv_cache.generate(question, documents_to_passages(docs),
                                     max_new_tokens=self.max_new_tokens, repair=self.repair,
                                     reuse=self.reuse)
        return ans.text, ans.stats.to_dict()

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        question, docs = self._split(input, config)
        return self._answer(question, docs, config)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if isinstance(input, str) and self.retriever is not None:
            docs = await self.retriever.ainvoke(input, config=config)
            return await asyncio.to_thread(self._answer, input, list(docs), config)
        # The model runs in a worker thread (guarded by its lock): the event loop stays free.
        return await asyncio.to_thread(self.invoke, input, config)
