"""`PrefixChain`: exact prefix reuse. A prompt's KV is kept in blocks along a hash chain: the
shared prefix (`SharedPrefix`), then each chunk in prompt order. A chunk block's key hashes the
chain before it (which starts from the model fingerprint, the storage kind "native" and the
prefix's token ids, so the system prompt, chat template, model and dtype are all in it) and its
own token ids. A block is the KV its tokens got in a plain prefill of the whole prompt up to
them: loading the longest cached run of blocks as it is (positions unchanged, no rotation) and
prefilling the rest gives the same KV as a full prefill, up to float rounding of the split.

A block missing or corrupt in the middle of the chain ends the reuse there: everything from it
on is prefilled (and stored again), the answer is the same; the call warns and counts it.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ragcomp.kv.cache_prompt import PromptLayout
from ragcomp.kv.codec import ChunkKV
from ragcomp.kv.engine_core import EngineCore
from ragcomp.kv.fingerprint import entry_key, ids_hash
from ragcomp.kv.prefix import SharedPrefix
from ragcomp.kv.tiers import TieredKV
from ragcomp.kv.types import KVStats


class PrefixChain:
    """Blocks of exact prompt KV along a hash chain, in the tiers and store of one cache."""

    def __init__(self, engine: EngineCore, layout: PromptLayout, prefix: SharedPrefix,
                 tiers: TieredKV) -> None:
        self.engine = engine
        self.layout = layout
        self.prefix = prefix
        self.tiers = tiers

    # -- keys ------------------------------------------------------------------------------
    def root(self) -> str:
        """The chain's start: model fingerprint (name, weights, dtype, RoPE), storage, prefix ids."""
        return self.layout.prefix_fingerprint()

    def fingerprints(self, chunks: Sequence[Sequence[int]]) -> list[str]:
        """The fingerprint of each chunk block: the hash of the chain before it plus its own ids."""
        out = []
        parent = hashlib.blake2b(self.root().encode(), digest_size=16).hexdigest()
        for c in chunks:
            fp = json.dumps({"chain": parent, "ids": ids_hash(list(c)), "model": self.engine.model_fp,
                             "storage": "native"}, sort_keys=True)
            out.append(fp)
            parent = hashlib.blake2b(fp.encode(), digest_size=16).hexdigest()
        return out

    def key(self, fp: str) -> str:
        return entry_key(self.layout.namespace + ":chain", fp)

    # -- checks ----------------------------------------------------------------------------
    def check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        """A ValueError when the prompt (and answer) would not fit the model's window."""
        limit = getattr(self.engine.config, "max_position_embeddings", None)
        total = n_prompt + max(0, max_new_tokens)
        if limit is not None and total > int(limit):
            raise ValueError(f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's window of {int(limit)} tokens (max_position_embeddings)")
        self.engine.check_length(total)

    # -- answering -------------------------------------------------------------------------
    def prefill(self, chunks: Sequence[Sequence[int]], q_ids: Sequence[int], stats: KVStats,
                reserve: int) -> tuple[Any, Any, list[int], list[tuple[str, ChunkKV]]]:
        """(cache, next-token logits, prompt ids, new blocks): the longest cached run of blocks
        loaded as it is, everything after it prefilled in one forward pass; `store` the new blocks
        (keyed) once the answer is out."""
        eng = self.engine
        chunks = [list(c) for c in chunks]
        t0 = time.perf_counter()
        prefix = self.prefix.for_answer(stats)
        fps = self.fingerprints(chunks)
        keys = [self.key(fp) for fp in fps]
        pending = self.tiers.lookup_many(list(zip(keys, fps, chunks, strict=True)), stats)
        found: list[ChunkKV | None] = [p.result() if isinstance(p, Future) else p for p in pending]
        stats.seconds_load += time.perf_counter() - t0
        n_hit = 0
        while n_hit < len(chunks) and found[n_hit] is not None:
            n_hit += 1
        later = [i for i in range(n_hit + 1, len(chunks)) if found[i] is not None]
        if later:
            stats.chain_breaks += 1
            warnings.warn(f"KV chain broken at block {n_hit + 1} of {len(chunks)} (missing or corrupt) while "
                          f"{len(later)} later block(s) are cached; recomputed from block {n_hit + 1} on",
                          RuntimeWarning, stacklevel=4)  # names generate's caller
        loaded = [prefix] + [c for c in found[:n_hit] if c is not None]
        n_loaded = sum(len(c) for c in loaded)
        rest = [t for c in chunks[n_hit:] for t in c] + list(q_ids)
        prompt = [t for c in loaded for t in c.ids] + rest
        stats.blocks_loaded, stats.tokens_loaded = len(loaded), n_loaded
        stats.blocks_prefilled, stats.tokens_prefilled = len(chunks) - n_hit, len(rest)
        stats.misses += len(chunks) - n_hit
        t = time.perf_counter()
        keys_buf, values_buf = eng.new_buffers(n_loaded, reserve=len(rest) + reserve)
        with eng.torch.inference_mode():
            pos = 0
            for c in loaded:
                eng.place(keys_buf, values_buf, c, pos)  # c.base == pos: a plain copy, no rotation
                pos += len(c)
        cache = eng.make_cache(keys_buf, values_buf, grow=True)
        logits = eng.prefill(cache, rest, n_loaded)
        stats.seconds_prefill_question = time.perf_counter() - t
        # The new blocks, cut from the cache before decoding appends to it.
        new: list[tuple[str, ChunkKV]] = []
        with eng.lock, eng.torch.inference_mode():
            pos = n_loaded
            for i in range(n_hit, len(chunks)):
                n = len(chunks[i])
                k, v = eng.stacked(cache, 0, pos, pos + n)
                new.append((keys[i], ChunkKV(chunks[i], k, v, pos, fps[i], "native")))
                pos += n
        return cache, logits, prompt, new

    def store(self, new: Sequence[tuple[str, ChunkKV]], stats: KVStats) -> None:
        """Write blocks `prefill` computed (called after answering: a slow store does not delay it)."""
        for key, chunk in new:
            self.tiers.put(key, chunk, stats=stats)
