"""xrag for LlamaIndex: a query engine whose reader sees each retrieved node as ONE token.

    from ragcomp.compressors.xrag import XragCompressor
    from ragcomp.integrations.llama_index_xrag import XragQueryEngine

    engine = XragQueryEngine(retriever=index.as_retriever(similarity_top_k=3),
                             compressor=XragCompressor(projector="path/or/None for the packaged one"))
    response = engine.query("Who painted the Mona Lisa?")
    response.response, response.source_nodes, response.metadata["ragcomp_xrag"]

Node embeddings are reused: a node that carries its vector (`node.embedding`, kept by vector
stores that return it) goes straight to the projector; otherwise the compressor's index, store or
embedder provides it (see `ragcomp.compressors.xrag`). With a reader that cannot take embeddings
(e.g. an OpenAI-compatible client) the engine answers from the text fallback and says so once.

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
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle  # noqa: E402

from ragcomp.compressors.xrag import EMBEDDING_KEY, XragCompressor, answer_with_xrag  # noqa: E402
from ragcomp.llm import Reader, load_reader  # noqa: E402
from ragcomp.types import Passage  # noqa: E402

__all__ = ["XragQueryEngine", "nodes_to_xrag_passages"]

STATS_KEY = "ragcomp_xrag"


def nodes_to_xrag_passages(nodes: Sequence[NodeWithScore],
                           metadata_mode: MetadataMode = MetadataMode.NONE) -> list[Passage]:
    """One Passage per node, with the node's own embedding (when it has one) in its metadata."""
    out = []
    for n in nodes:
        meta = dict(n.node.metadata)
        if n.node.embedding is not None:
            meta[EMBEDDING_KEY] = n.node.embedding
        out.append(Passage(n.node.node_id, n.node.get_content(metadata_mode=metadata_mode), n.score, meta))
    return out


class XragQueryEngine(BaseQueryEngine):
    """Retrieve nodes, project each one's embedding to one token, answer with the local reader."""

    def __init__(
        self,
        retriever: BaseRetriever,
        compressor: XragCompressor | None = None,
        reader: Reader | str = "smollm2-135m",
        max_new_tokens: int = 32,
        metadata_mode: MetadataMode = MetadataMode.NONE,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if compressor is not None and not isinstance(compressor, XragCompressor):
            raise TypeError(f"compressor must be an XragCompressor, got {type(compressor).__name__}")
        self.retriever = retriever
        self.compressor = compressor or XragCompressor()
        self.reader = load_reader(reader, max_new_tokens=max_new_tokens)
        self.metadata_mode = metadata_mode
        super().__init__(callback_manager or getattr(retriever, "callback_manager", None))

    def _get_prompt_modules(self) -> dict[str, Any]:
        return {}

    def _answer(self, query_bundle: QueryBundle, nodes: list[NodeWithScore]) -> Response:
        passages = nodes_to_xrag_passages(nodes, self.metadata_mode)
        with self.callback_manager.event(
            CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query_bundle.query_str}
        ) as event:
            if passages:
                text, stats = answer_with_xrag(self.compressor, self.reader, query_bundle.query_str, passages)
            else:  # nothing retrieved: say so instead of answering from nothing
                text, stats = "Empty Response", {"documents": 0}
            response = Response(text, source_nodes=nodes, metadata={STATS_KEY: stats})
            event.on_end(payload={EventPayload.RESPONSE: response})
        return response

    def _query(self, query_bundle: QueryBundle) -> Response:
        return self._answer(query_bundle, self.retriever.retrieve(query_bundle))

    async def _aquery(self, query_bundle: QueryBundle) -> Response:
        nodes = await self.retriever.aretrieve(query_bundle)
        # The model runs in a worker thread (guarded by its lock): the event loop stays free.
        return await asyncio.to_thread(self._answer, query_bundle, nodes)
