"""Document KV cache: precompute each chunk's KV once, keep it in GPU/CPU/store tiers, move it
to wherever a retrieved chunk lands, and answer repeated questions without prefilling the
documents again. `KVCache` is the entry point (configured by `PromptConfig` and `TierConfig`);
`KVEngine` does the token-level work."""

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
