"""ragcomp for LlamaIndex: a node postprocessor, a compressing retriever, an offline embedding
model and an offline LLM.

    from ragcomp.integrations.llama_index import RagcompPostprocessor
    engine = index.as_query_engine(node_postprocessors=[RagcompPostprocessor(top_k=4)])

Needs `pip install 'ragcomp[llama-index]'`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ragcomp._optional import require

require("llama_index.core", "llama-index")  # fail here, with the install hint, not deep inside

from llama_index.core.base.base_retriever import BaseRetriever  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding  # noqa: E402
from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import (  # noqa: E402
    BaseNode,
    ImageNode,
    IndexNode,
    Node,
    NodeWithScore,
    QueryBundle,
    TextNode,
)

from ragcomp.base import Compressor  # noqa: E402
from ragcomp.embeddings import CachedEmbedder, shared_embedder  # noqa: E402
from ragcomp.types import Compressed, CompressionResult, Passage  # noqa: E402

from . import METADATA_KEYS, build_compressor, compression_metadata  # noqa: E402
from .llama_index_llm import LocalLLM  # noqa: E402  (re-exported: one module for every LlamaIndex piece)

__all__ = ["CompressingRetriever", "LocalLLM", "RagcompEmbedding", "RagcompPostprocessor"]

dispatcher = get_dispatcher(__name__)


# --------------------------------------------------------------------------- postprocessor
def _text_of(node: BaseNode) -> str | None:
    """The node's plain text, or None when the node carries more than text (left untouched)."""
    if isinstance(node, (ImageNode, IndexNode)):  # an image, or a pointer to another object
        return None
    if isinstance(node, TextNode):
        return node.text
    if isinstance(node, Node):  # the multimodal node (Document included)
        if node.image_resource or node.audio_resource or node.video_resource:
            return None
        return "" if node.text_resource is None else (node.text_resource.text or "")
    return None


def _query_of(query_bundle: QueryBundle | None) -> str:
    if query_bundle is None or not (query_bundle.query_str or "").strip():
        raise ValueError(
            "RagcompPostprocessor needs the query to compress against: call "
            "postprocess_nodes(nodes, query_str=...) or pass query_bundle=QueryBundle(...)"
        )
    return query_bundle.query_str


class RagcompPostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes with any ragcomp method.

    `RagcompPostprocessor(method="recomp-extractive", top_k=4)` builds the method by name;
    `RagcompPostprocessor(compressor=my_compressor)` runs a Compressor (or Pipeline) you built.

    Returns one node per kept passage, in the method's order, each a COPY of its input node
    with its own metadata and the method's score; the input nodes are never modified. The copy
    records `ragcomp_spans` (kept [start, end) character spans into the node's original text;
    add the node's `start_char_idx` for offsets in the source document), `ragcomp_tokens_in`,
    `ragcomp_tokens_out`, `ragcomp_method` and `ragcomp_score`, all hidden from the LLM and the
    embedder. Nodes that are not plain text (images, index nodes) pass through unchanged, after
    the compressed ones. When the method keeps nothing (`empty`: nothing retrieved helps the
    query) the text nodes are dropped and no error is raised; `last_result` holds the full
    CompressionResult of the latest call.
    """

    method: str = Field(description="ragcomp method name (see ragcomp.available_methods()).")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the method.")
    keep_retrieval_score: bool = Field(
        default=False, description="Keep the retriever's score in metadata as `retrieval_score`."
    )

    _compressor: Compressor = PrivateAttr()
    _last_result: CompressionResult | None = PrivateAttr(default=None)

    def __init__(
        self,
        method: str | None = None,
        *,
        compressor: Compressor | str | None = None,
        params: dict[str, Any] | None = None,
        keep_retrieval_score: bool = False,
        callback_manager: CallbackManager | None = None,
        **method_params: Any,
    ) -> None:
        # `params=` is what to_dict() writes, so from_dict() round-trips.
        all_params = {**(params or {}), **method_params}
        comp = build_compressor(method, compressor, all_params)
        super().__init__(
            method=comp.name,
            params=all_params if not isinstance(compressor, Compressor) else comp.params(),
            keep_retrieval_score=keep_retrieval_score,
            callback_manager=callback_manager or CallbackManager(),
        )
        self._compressor = comp

    @classmethod
    def class_name(cls) -> str:
        return "RagcompPostprocessor"

    @property
    def compressor(self) -> Compressor:
        return self._compressor

    @property
    def last_result(self) -> CompressionResult | None:
        """The CompressionResult of the latest call (its `empty` flag is the selective signal)."""
        return self._last_result

    # -- the two paths share everything but the compress call ------------------------
    def _prepare(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None
    ) -> tuple[str, list[Passage], dict[int, NodeWithScore], list[NodeWithScore]]:
        query = _query_of(query_bundle)
        passages: list[Passage] = []
        owner: dict[int, NodeWithScore] = {}  # id(Passage) -> its input node
        passthrough: list[NodeWithScore] = []
        for nws in nodes:
            text = _text_of(nws.node)
            if text is None:
                passthrough.append(nws)
                continue
            p = Passage(nws.node.node_id, text, nws.score, dict(nws.node.metadata))
            owner[id(p)] = nws
            passages.append(p)
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle, nodes=nodes, top_n=self._top_n(nodes), model_name=self.method
            )
        )
        return query, passages, owner, passthrough

    def _top_n(self, nodes: list[NodeWithScore]) -> int:
        # Most nodes that can come back: a reranker's top_n, else all of them.
        top_n = self.params.get("top_n")
        return top_n if isinstance(top_n, int) else len(nodes)

    def _payload(self, nodes: list[NodeWithScore], query: str) -> dict[str, Any]:
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: self.method,
            EventPayload.QUERY_STR: query,
            EventPayload.TOP_K: self._top_n(nodes),
        }

    def _finish(
        self,
        result: CompressionResult,
        owner: dict[int, NodeWithScore],
        passthrough: list[NodeWithScore],
    ) -> list[NodeWithScore]:
        self._last_result = result
        out = [self._rewrite(owner[id(item.passage)], item) for item in result.kept]
        return out + passthrough

    def _rewrite(self, nws: NodeWithScore, item: Compressed) -> NodeWithScore:
        node = nws.node
        meta = dict(node.metadata)  # a new dict: model_copy() alone would share the original's
        meta.update(compression_metadata(item, self._compressor))
        hidden = list(METADATA_KEYS)
        if self.keep_retrieval_score:
            meta["retrieval_score"] = nws.score
            hidden.append("retrieval_score")
        copy = node.model_copy(
            update={
                "metadata": meta,
                "excluded_llm_metadata_keys": _merged(node.excluded_llm_metadata_keys, hidden),
                "excluded_embed_metadata_keys": _merged(node.excluded_embed_metadata_keys, hidden),
                "embedding": None,  # it described the uncompressed text
            }
        )
        copy.set_content(item.text)
        score = item.score if item.score is not None else nws.score
        return NodeWithScore(node=copy, score=score)

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query, passages, owner, passthrough = self._prepare(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=self._payload(nodes, query)) as ev:
            result = self._compressor.compress(query, passages)
            out = self._finish(result, owner, passthrough)
            ev.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query, passages, owner, passthrough = self._prepare(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=self._payload(nodes, query)) as ev:
            result = await self._compressor.acompress(query, passages)
            out = self._finish(result, owner, passthrough)
            ev.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out


def _merged(keys: list[str], extra: list[str]) -> list[str]:
    return [*keys, *(k for k in extra if k not in keys)]


# --------------------------------------------------------------------------- retriever
class CompressingRetriever(BaseRetriever):
    """Any LlamaIndex retriever, with its nodes compressed by a ragcomp method.

    `CompressingRetriever(index.as_retriever(similarity_top_k=10), "recomp-extractive", top_k=4)`,
    or `compressor=` a ragcomp Compressor or a ready RagcompPostprocessor. The async path awaits
    the base retriever's `aretrieve` and the compressor's `acompress`: it never blocks the loop.
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        compressor: Compressor | str | RagcompPostprocessor | None = None,
        *,
        method: str | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
        **params: Any,
    ) -> None:
        if not isinstance(retriever, BaseRetriever):
            raise TypeError(f"retriever must be a LlamaIndex BaseRetriever, got {type(retriever).__name__}")
        super().__init__(callback_manager=callback_manager or retriever.callback_manager, verbose=verbose)
        self._retriever = retriever
        if isinstance(compressor, RagcompPostprocessor):
            if method is not None or params:
                raise ValueError("a RagcompPostprocessor is already configured: pass no method or params")
            self._postprocessor = compressor
        else:
            # Shares this retriever's callback manager so RERANKING lands in the same trace.
            self._postprocessor = RagcompPostprocessor(
                method, compressor=compressor, callback_manager=self.callback_manager, **params
            )

    @property
    def retriever(self) -> BaseRetriever:
        return self._retriever

    @property
    def postprocessor(self) -> RagcompPostprocessor:
        return self._postprocessor

    @property
    def last_result(self) -> CompressionResult | None:
        return self._postprocessor.last_result

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = self._retriever.retrieve(query_bundle)
        return self._postprocessor.postprocess_nodes(nodes, query_bundle=query_bundle)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = await self._retriever.aretrieve(query_bundle)
        return await self._postprocessor.apostprocess_nodes(nodes, query_bundle=query_bundle)


# --------------------------------------------------------------------------- embeddings
class RagcompEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from ragcomp's cached embedder (offline MiniLM by default).

    Shares the process-wide cache with ragcomp's compressors, so text embedded while indexing
    is not embedded again when a compressor or a later query sees it.
    """

    model_name: str = Field(default="minilm", description="Embedder alias, hub id or local path.")
    device: str | None = Field(default=None, description="torch device; None picks cuda when present.")

    _embedder: CachedEmbedder | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        model_name: str = "minilm",
        device: str | None = None,
        embedder: CachedEmbedder | None = None,
        embed_batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model_name=embedder.name if embedder is not None else model_name,
            device=device,
            embed_batch_size=embed_batch_size,
            **kwargs,
        )
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        return "RagcompEmbedding"

    @property
    def embedder(self) -> CachedEmbedder:
        with self._lock:  # loading is deferred to first use, and must happen once
            if self._embedder is None:
                self._embedder = shared_embedder(self.model_name, self.device)
            return self._embedder

    def _embed(self, texts: list[str]) -> list[Embedding]:
        return self.embedder.embed(texts).tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(list(texts))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await asyncio.to_thread(self._embed, [query]))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await asyncio.to_thread(self._embed, [text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._embed, list(texts))


_KV_NAMES = ("KVCacheQueryEngine", "KVPrefetchPostprocessor")


def __getattr__(name: str) -> Any:
    # The document-KV classes live in llama_index_kv (they pull in the KV layer and torch);
    # re-exported here so users find every LlamaIndex piece under one module.
    if name in _KV_NAMES:
        from ragcomp.integrations import llama_index_kv

        return getattr(llama_index_kv, name)
    if name == "XragQueryEngine":  # lives in llama_index_xrag (pulls in torch), re-exported likewise
        from ragcomp.integrations import llama_index_xrag

        return llama_index_xrag.XragQueryEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
