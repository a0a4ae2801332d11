"""ragcomp for LangChain: a document compressor, a compressing retriever and offline embeddings.

    from ragcomp.integrations.langchain import CompressingRetriever
    retriever = CompressingRetriever(base_retriever=store.as_retriever(k=10), top_k=4)

Built on langchain-core only. `RagcompCompressor` is a `BaseDocumentCompressor`, so it also
works as the `base_compressor` of langchain-classic's `ContextualCompressionRetriever`.
Needs `pip install 'ragcomp[langchain]'`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ragcomp._optional import require

require("langchain_core", "langchain")  # fail here, with the install hint, not deep inside

from langchain_core.callbacks import (  # noqa: E402
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from pydantic import ConfigDict, Field, PrivateAttr, model_validator  # noqa: E402

from ragcomp.base import Compressor  # noqa: E402
from ragcomp.embeddings import CachedEmbedder, shared_embedder  # noqa: E402
from ragcomp.types import CompressionResult, Passage  # noqa: E402

from . import DEFAULT_METHOD, build_compressor, compression_metadata  # noqa: E402

__all__ = ["CompressingRetriever", "RagcompCompressor", "RagcompEmbeddings"]


class RagcompCompressor(BaseDocumentCompressor):
    """Compress LangChain documents with any ragcomp method.

    `RagcompCompressor(method="recomp-extractive", top_k=4)` builds the method by name;
    `RagcompCompressor(compressor=my_compressor)` runs a Compressor (or Pipeline) you built.

    Returns one new Document per kept passage, in the method's order, with the input's id and a
    copy of its metadata plus `ragcomp_spans` (kept [start, end) character spans into the
    original `page_content`), `ragcomp_tokens_in`, `ragcomp_tokens_out`, `ragcomp_method` and
    `ragcomp_score`. Input documents are not modified. When the method keeps nothing the result
    is `[]` (no error); `last_result` holds the full CompressionResult of the latest call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str = Field(default=DEFAULT_METHOD, description="ragcomp method name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the method.")

    _compressor: Compressor = PrivateAttr()
    _last_result: CompressionResult | None = PrivateAttr(default=None)

    def __init__(
        self,
        method: str | None = None,
        *,
        compressor: Compressor | str | None = None,
        params: dict[str, Any] | None = None,
        **method_params: Any,
    ) -> None:
        all_params = {**(params or {}), **method_params}
        comp = build_compressor(method, compressor, all_params)
        super().__init__(
            method=comp.name,
            params=all_params if not isinstance(compressor, Compressor) else comp.params(),
        )
        self._compressor = comp

    @property
    def compressor(self) -> Compressor:
        return self._compressor

    @property
    def last_result(self) -> CompressionResult | None:
        """The CompressionResult of the latest call (its `empty` flag is the selective signal)."""
        return self._last_result

    def _passages(self, documents: Sequence[Document]) -> tuple[list[Passage], dict[int, Document]]:
        passages, owner = [], {}
        for i, doc in enumerate(documents):
            p = Passage(doc.id or str(i), doc.page_content, None, dict(doc.metadata))
            owner[id(p)] = doc
            passages.append(p)
        return passages, owner

    def _documents(self, result: CompressionResult, owner: dict[int, Document]) -> list[Document]:
        self._last_result = result
        out = []
        for item in result.kept:
            doc = owner[id(item.passage)]
            meta = {**doc.metadata, **compression_metadata(item, self._compressor)}
            out.append(Document(page_content=item.text, metadata=meta, id=doc.id))
        return out

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        passages, owner = self._passages(documents)
        return self._documents(self._compressor.compress(query, passages), owner)

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        passages, owner = self._passages(documents)
        return self._documents(await self._compressor.acompress(query, passages), owner)


class CompressingRetriever(BaseRetriever):
    """Any LangChain retriever, with what it returns compressed.

    `compressor` is a method name (its parameters as extra keyword arguments, e.g.
    `CompressingRetriever(base_retriever=r, compressor="recomp-extractive", top_k=4)`), a ragcomp
    Compressor, or any LangChain `BaseDocumentCompressor`. `k` caps how many documents come back
    after compression (best first); `invoke(query, k=...)` overrides it per call. Other invoke
    keyword arguments go to the base retriever.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    base_retriever: BaseRetriever
    compressor: Any = Field(
        default=DEFAULT_METHOD, description="Method name, ragcomp Compressor or BaseDocumentCompressor."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Method parameters (name only).")
    k: int | None = Field(default=None, ge=0, description="Most documents returned; None for all kept.")

    _doc_compressor: BaseDocumentCompressor = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _collect_method_params(cls, data: Any) -> Any:
        # Unknown keywords are the method's parameters, like RagcompCompressor(method, **params).
        if isinstance(data, dict):
            extra = {k: v for k, v in data.items() if k not in cls.model_fields}
            if extra:
                data = {k: v for k, v in data.items() if k not in extra}
                data["params"] = {**data.get("params", {}), **extra}
        return data

    @model_validator(mode="after")
    def _build(self) -> CompressingRetriever:
        if isinstance(self.compressor, BaseDocumentCompressor):
            if self.params:
                raise TypeError(
                    f"parameters {sorted(self.params)} only apply when compressor is a method name"
                )
            self._doc_compressor = self.compressor
        elif isinstance(self.compressor, (str, Compressor)):
            self._doc_compressor = RagcompCompressor(compressor=self.compressor, **self.params)
        else:
            raise TypeError(
                "compressor must be a method name, a ragcomp Compressor or a BaseDocumentCompressor, "
                f"got {type(self.compressor).__name__}"
            )
        return self

    @property
    def document_compressor(self) -> BaseDocumentCompressor:
        return self._doc_compressor

    @property
    def last_result(self) -> CompressionResult | None:
        """The latest CompressionResult when the compressor is a ragcomp one, else None."""
        return getattr(self._doc_compressor, "last_result", None)

    def _limit(self, docs: Sequence[Document], k: int | None) -> list[Document]:
        limit = self.k if k is None else k
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"k must be an integer >= 0 or None, got {limit!r}")
        return list(docs) if limit is None else list(docs)[:limit]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None, **kwargs: Any
    ) -> list[Document]:
        docs = self.base_retriever.invoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        if not docs:
            return []
        out = self._doc_compressor.compress_documents(docs, query, callbacks=run_manager.get_child())
        return self._limit(out, k)

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        docs = await self.base_retriever.ainvoke(
            query, config={"callbacks": run_manager.get_child()}, **kwargs
        )
        if not docs:
            return []
        out = await self._doc_compressor.acompress_documents(docs, query, callbacks=run_manager.get_child())
        return self._limit(out, k)


class RagcompEmbeddings(Embeddings):
    """LangChain embeddings from ragcomp's cached embedder (offline MiniLM by default).

    Shares the process-wide cache with ragcomp's compressors: a text is embedded once.
    """

    def __init__(
        self, model: str = "minilm", device: str | None = None, embedder: CachedEmbedder | None = None
    ) -> None:
        self.model = embedder.name if embedder is not None else model
        self.device = device
        self._embedder = embedder

    @property
    def embedder(self) -> CachedEmbedder:
        if self._embedder is None:  # deferred so constructing costs nothing
            self._embedder = shared_embedder(self.model, self.device)
        return self._embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed(list(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed([text])[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)


def __getattr__(name: str) -> Any:
    # KVCacheRunnable lives in langchain_kv (it pulls in the KV layer and torch);
    # re-exported here so users find every LangChain piece under one module.
    if name == "KVCacheRunnable":
        from ragcomp.integrations import langchain_kv

        return langchain_kv.KVCacheRunnable
    if name == "XragRunnable":  # lives in langchain_xrag (pulls in torch), re-exported likewise
        from ragcomp.integrations import langchain_xrag

        return langchain_xrag.XragRunnable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
