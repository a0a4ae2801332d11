"""Document KV cache for LlamaIndex: answer from precomputed KV of the nodes a retriever returns.

    from ragcomp.kv import KVCache
    from ragcomp.integrations.llama_index_kv import KVCacheQueryEngine

    kv = KVCache(model="smollm2-135m", store="disk:/tmp/kv")
    engine = KVCacheQueryEngine(retriever=index.as_retriever(similarity_top_k=10), kv_cache=kv)
    response = engine.query("Who painted the Mona Lisa?")
    response.response, response.source_nodes, response.metadata["ragcomp_kv"]

The first question that meets a node encodes its KV once (after the shared prefix) and
stores it; every later question that retrieves it loads, rotates and reuses it, so only
the question is prefilled. `KVPrefetchPostprocessor` starts those loads as soon as a
retriever's nodes are known (useful ahead of a reranker in a longer pipeline).

Needs `pip install 'ragcomp[llama-index,models]'`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ragcomp._optional import require

require("llama_index.core", "llama-index")  # fail here, with the install hint, not deep inside

from llama_index.core.base.base_query_engine import BaseQueryEngine  # noqa: E402
from llama_index.core.base.base_retriever import BaseRetriever  # noqa: E402
from llama_index.core.base.response.schema import Response  # noqa: E402
from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle  # noqa: E402

from ragcomp.kv.cache import KVCache  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

__all__ = ["KVCacheQueryEngine", "KVPrefetchPostprocessor", "nodes_to_passages"]

STATS_KEY = "ragcomp_kv"


def nodes_to_passages(nodes: Sequence[NodeWithScore], metadata_mode: MetadataMode = MetadataMode.NONE
                      ) -> list[Passage]:
    """One Passage per node: its id, its text as the LLM would see it, score and metadata."""
    out = []
    for n in nodes:
        text = n.node.get_content(metadata_mode=metadata_mode)
        out.append(Passage(n.node.node_id, text, n.score, dict(n.node.metadata)))
    return out


class KVCacheQueryEngine(BaseQueryEngine):
    """Retrieve nodes, then answer from their cached KV with the KVCache's local model.

    The response's `metadata["ragcomp_kv"]` holds the call's stats (tier hits, misses,
    bytes loaded, seconds to load/rotate/prefill/decode, time to first token).
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        kv_cache: KVCache,
        max_new_tokens: int = 64,
        repair: Any = True,
        node_postprocessors: Sequence[BaseNodePostprocessor] | None = None,
        metadata_mode: MetadataMode = MetadataMode.NONE,
        callback_manager: CallbackManager | None = None,
        reuse: str = "exact",
    ) -> None:
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a ragcomp.kv.KVCache, got {type(kv_cache).__name__}")
        self.retriever = retriever
        self.kv_cache = kv_cache
        self.max_new_tokens = max_new_tokens
        self.repair = repair
        self.reuse = reuse  # "exact" (answers equal a full prefill) or "chunks" (see KVCache.generate)
        self.node_postprocessors = list(node_postprocessors or [])
        self.metadata_mode = metadata_mode
        super().__init__(callback_manager or getattr(retriever, "callback_manager", None))

    def _get_prompt_modules(self) -> dict[str, Any]:
        return {}

    def _postprocess(self, nodes: list[NodeWithScore], query_bundle: QueryBundle) -> list[NodeWithScore]:
        for p in self.node_postprocessors:
            nodes = p.postprocess_nodes(nodes, query_bundle=query_bundle)
        return nodes

    def retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._postprocess(self.retriever.retrieve(query_bundle), query_bundle)

    async def aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = await self.retriever.aretrieve(query_bundle)
        return await asyncio.to_thread(self._postprocess, nodes, query_bundle)

    def _answer(self, query_bundle: QueryBundle, nodes: list[NodeWithScore]) -> Response:
        passages = nodes_to_passages(nodes, self.metadata_mode)
        with self.callback_manager.event(
            CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query_bundle.query_str}
        ) as event:
            if passages:
                ans = self.kv_cache.generate(query_bundle.query_str, passages,
                                             max_new_tokens=self.max_new_tokens, repair=self.repair,
                                             reuse=self.reuse)
                text, stats = ans.text, ans.stats.to_dict()
            else:  # nothing retrieved: say so instead of answering from nothing
                text, stats = "Empty Response", {}
            response = Response(text, source_nodes=nodes, metadata={STATS_KEY: stats})
            event.on_end(payload={EventPayload.RESPONSE: response})
        return response

    def _query(self, query_bundle: QueryBundle) -> Response:
        return self._answer(query_bundle, self.retrieve(query_bundle))

    async def _aquery(self, query_bundle: QueryBundle) -> Response:
        nodes = await self.aretrieve(query_bundle)
        # The model runs in a worker thread (guarded by its lock): the event loop stays free.
        return await asyncio.to_thread(self._answer, query_bundle, nodes)


class KVPrefetchPostprocessor(BaseNodePostprocessor):
    """Leaves nodes as they are and starts loading their KV from the store into the CPU tier,
    so the reads overlap whatever runs before generation (reranking, prompt building)."""

    metadata_mode: MetadataMode = MetadataMode.NONE
    _kv: KVCache = PrivateAttr()

    def __init__(self, kv_cache: KVCache, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._kv = kv_cache

    @classmethod
    def class_name(cls) -> str:
        return "RagcompKVPrefetchPostprocessor"

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
                           ) -> list[NodeWithScore]:
        if nodes:
            self._kv.prefetch(nodes_to_passages(nodes, self.metadata_mode))
        return nodes
