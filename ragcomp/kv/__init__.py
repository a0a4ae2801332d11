"""Document KV cache: keep prompt KV in GPU/CPU/store tiers and answer repeated questions without
prefilling the documents again. By default the longest cached prefix of the exact prompt is
reused (blocks along a hash chain, `ragcomp.kv.chain`: answers equal a full prefill); opt-in,
each chunk's KV precomputed once is moved to wherever it lands (approximate). `KVCache` is the
entry point (configured by `PromptConfig` and `TierConfig`); `KVEngine` does the token-level work."""

from ragcomp.kv.codec import STORAGE_KINDS, ChunkKV, CorruptEntryError, decode_entry, encode_entry
from ragcomp.kv.config import PromptConfig, TierConfig
from ragcomp.kv.engine import KVEngine
from ragcomp.kv.ops import Assembled
from ragcomp.kv.repair import Repair
from ragcomp.kv.rope import MOVABLE_ROPE_TYPES, SUPPORTED_MODEL_TYPES, UnsupportedModelError, check_movable
from ragcomp.kv.types import KVAnswer, KVStats


def __getattr__(name: str) -> object:
    # KVCache pulls in ragcomp.stores; keep `import ragcomp.kv` light for engine-only use.
    if name == "KVCache":
        from ragcomp.kv.cache import KVCache

        return KVCache
    if name in ("LongDocuments", "LongDocument", "PageStats"):  # KV page retrieval (long documents)
        from ragcomp.kv import pages

        return getattr(pages, name)
    raise AttributeError(name)


__all__ = [
    "MOVABLE_ROPE_TYPES",
    "STORAGE_KINDS",
    "SUPPORTED_MODEL_TYPES",
    "Assembled",
    "ChunkKV",
    "CorruptEntryError",
    "KVAnswer",
    "KVCache",
    "KVEngine",
    "KVStats",
    "LongDocument",
    "LongDocuments",
    "PageStats",
    "PromptConfig",
    "Repair",
    "TierConfig",
    "UnsupportedModelError",
    "check_movable",
    "decode_entry",
    "encode_entry",
]
