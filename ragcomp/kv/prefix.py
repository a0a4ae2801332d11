"""`SharedPrefix`: the KV of a layout's shared prefix (chat head, system prompt, instruction), which
every chunk is encoded after and every prompt starts with. Found in the tiers or the store, or
encoded, once per process; then held on the engine's device for every answer (`KVCache` and its
`LongDocuments` share one)."""

from __future__ import annotations

from concurrent.futures import Future

from ragcomp.kv.cache_prompt import PromptLayout
from ragcomp.kv.codec import ChunkKV
from ragcomp.kv.engine_core import EngineCore
from ragcomp.kv.tiers import TieredKV
from ragcomp.kv.types import KVStats


class SharedPrefix:
    """The shared prefix's KV of `layout` (tiers -> store -> encode, then held)."""

    def __init__(self, engine: EngineCore, layout: PromptLayout, tiers: TieredKV) -> None:
        self.engine = engine
        self.layout = layout
        self.tiers = tiers
        self._kv: ChunkKV | None = None

    def get(self, stats: KVStats | None = None) -> ChunkKV:
        """The prefix's KV on the engine's device; `stats` counts where it came from the first time."""
        if self._kv is not None:
            return self._kv
        fp = self.layout.prefix_fingerprint()
        key = self.layout.key(fp)
        found = self.tiers.lookup(key, fp, self.layout.prefix_ids, stats)
        chunk = found.result() if isinstance(found, Future) else found
        if chunk is None:
            chunk = self.engine.encode_prefix(self.layout.prefix_ids)
            self.tiers.put(key, chunk, keep=False, stats=stats)
        self._kv = chunk.to(self.engine.device) if chunk.device != self.engine.device else chunk
        return self._kv

    def for_answer(self, stats: KVStats) -> ChunkKV:
        """The prefix for one answer, counted in `stats` as a hit of the tier that holds it."""
        prefix = self.get(stats)
        tier = "gpu" if prefix.device.type == "cuda" else "cpu"
        stats.hits[tier] += 1
        stats.bytes_loaded[tier] += prefix.nbytes
        return prefix
