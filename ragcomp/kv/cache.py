"""`KVCache`: answer repeated questions over the same documents without prefilling them again.

    kv = KVCache(model="smollm2-135m", store="disk:/tmp/kv")
    ids = kv.add(passages)                       # encode each chunk once, after one shared prefix
    ans = kv.generate("Who wrote X?", ids[:10])  # longest cached prefix loaded, the rest prefilled
    ans.text, ans.stats.ttft, ans.stats.tokens_loaded, ans.stats.tokens_prefilled

Prompt layout (token ids, concatenated; never re-tokenised as one string):

    [chat head + system + instruction] [chunk 1] ... [chunk k] [question + chat tail]
     shared prefix: encoded once          reuse="exact": blocks along a hash chain
                                          reuse="chunks": each encoded after the prefix only

`generate(reuse="exact")` (the default, `PrefixChain` in `ragcomp.kv.chain`) keeps each chunk's
KV as it was in the prompt that first held it, keyed by everything before it: the longest
cached prefix of a prompt is loaded as it is and the rest prefilled, so answers equal
`generate_full`'s. `reuse="chunks"` (what `add` precomputes) reuses a chunk in any prompt:
its keys are rotated from the position it was encoded at to where it lands. What moving
cannot restore is attention between chunks (each never saw the others); the `repair` option
recomputes part of it (see `Repair`), off by default.

A `KVCache` holds the parts it drives: `engine` (`KVEngine`, the model-side work), `tiers`
(`TieredKV`: GPU and CPU LRUs in front of `store`), `layout` (`PromptLayout`: the token ids of
this layout, entry keys and the passage index), `prefix` (`SharedPrefix`: the prefix's KV),
`chain` (`PrefixChain`: exact prompt-prefix blocks) and,
once asked for, `long_documents()` (`LongDocuments`: KV pages of long documents). Its settings
are declared in `PromptConfig` and `TierConfig` (`ragcomp.kv.config`).
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ragcomp.base import as_passages
from ragcomp.kv.cache_prompt import PassageOrId, PromptLayout
from ragcomp.kv.chain import PrefixChain
from ragcomp.kv.codec import ChunkKV
from ragcomp.kv.config import PromptConfig, TierConfig, with_options
from ragcomp.kv.engine import KVEngine
from ragcomp.kv.pages import LongDocuments
from ragcomp.kv.pages_types import LongDocument
from ragcomp.kv.prefix import SharedPrefix
from ragcomp.kv.repair import Repair
from ragcomp.kv.tiers import ReconnectingStore, TieredKV
from ragcomp.kv.types import KVAnswer, KVStats
from ragcomp.types import Passage


class KVCache:
    """Precomputed document KV, kept in GPU / CPU tiers in front of a store, reused per question.

    Args:
        model: an offline alias ("smollm2-135m"), a hub id or local path, a
            `ragcomp.models.CausalLM`, or a Hugging Face model (then pass `tokenizer`).
        store: "memory", "disk:DIR", "redis://HOST:PORT/DB", or any `ByteStore`.
        storage: how chunk KV is kept: "native" (model dtype), "bf16", "fp16", "fp8", "int8".
        repair: default repair for `generate(reuse="chunks")`: None, "first:N", "deviation:SHARE"
            or "attention:SHARE" (see `ragcomp.kv.repair`).
        batch_size: chunks encoded per forward pass in `add`.
        namespace: the first part of every store key.
        prompt_config: the prompt's parts and chunk size (`PromptConfig`: system_prompt,
            instruction, doc_template, question_template, max_chunk_tokens).
        tier_config: the tiers and store reads (`TierConfig`: gpu_bytes, cpu_bytes, io_threads,
            retry_after, verify).
        **options: any field of the two configs by name (`max_chunk_tokens=256`, `cpu_bytes=2**30`),
            as the constructor always took them; a field named here overrides the config's.
    """

    def __init__(
        self,
        model: Any = "smollm2-135m",
        store: Any = "memory",
        *,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: Any = None,
        storage: str = "native",
        repair: str | Repair | None = None,
        batch_size: int = 8,
        namespace: str = "ragcomp:kv",
        prompt_config: PromptConfig | None = None,
        tier_config: TierConfig | None = None,
        **options: Any,
    ) -> None:
        from ragcomp.stores import StoreError, open_store

        self.prompt_config = with_options(prompt_config or PromptConfig(), options)
        self.tier_config = with_options(tier_config or TierConfig(), options)
        if options:
            raise TypeError(f"KVCache() got unexpected keyword argument(s): {', '.join(map(repr, options))}")
        self.lm_name, self.model, self.tokenizer, lock = _load(model, tokenizer, device, dtype)
        self.engine = KVEngine(self.model, self.lm_name, storage=storage, lock=lock)
        try:
            self.store = open_store(store) if store is not None else None
        except StoreError as e:
            if not isinstance(store, str):
                raise
            # Answers must not depend on the store being up: start without it, retry later.
            warnings.warn(f"KV store unavailable at start ({e}); answering by recomputing until it is back",
                          RuntimeWarning, stacklevel=2)
            self.store = ReconnectingStore(store)
        t = self.tier_config
        self.tiers = TieredKV(self.store, self.engine.device, t.gpu_bytes, t.cpu_bytes, t.io_threads,
                              t.retry_after, t.verify)
        self.repair = Repair.parse(repair)
        self.batch_size = batch_size
        self.layout = PromptLayout(self.tokenizer, self.engine, self.tiers, self.prompt_config, namespace)
        self.prefix = SharedPrefix(self.engine, self.layout, self.tiers)
        self.chain = PrefixChain(self.engine, self.layout, self.prefix, self.tiers)
        self._long: LongDocuments | None = None
        stop = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops = [stop] if isinstance(stop, int) else list(stop or [])
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            stops.append(self.tokenizer.eos_token_id)
        self.stop_ids = sorted(set(stops))

    # -- token ids and keys (PromptLayout) -------------------------------------------------
    @property
    def namespace(self) -> str:
        return self.layout.namespace

    @property
    def prefix_ids(self) -> list[int]:
        return self.layout.prefix_ids

    def question_ids(self, question: str) -> list[int]:
        return self.layout.question_ids(question)

    def passage_chunks(self, passage: Passage) -> list[list[int]]:
        """Token ids of a passage's chunks (split every max_chunk_tokens tokens)."""
        return self.layout.passage_chunks(passage)

    def prompt_ids(self, question: str, passages_or_ids: Sequence[PassageOrId]) -> list[int]:
        """The exact token ids both the cached and the full-prefill paths answer from."""
        return self.layout.prompt_ids(question, passages_or_ids)

    # Short names of the layout's, kept for the tests and benches that name entries with them.
    def _fp(self, ids: Sequence[int]) -> str:
        return self.layout.fingerprint(ids)

    def _key(self, fp: str) -> str:
        return self.layout.key(fp)

    def _resolve(self, items: Sequence[PassageOrId]) -> list[list[list[int]]]:
        return self.layout.resolve(items)

    # -- precompute ------------------------------------------------------------------------
    def prefix_kv(self, stats: KVStats | None = None) -> ChunkKV:
        """The shared prefix's KV (tiers -> store -> encode)."""
        return self.prefix.get(stats)

    def add(self, passages: Sequence[Passage | str], keep: bool = True) -> list[str]:
        """Encode and store every chunk not cached yet; returns the passage ids.

        Plain strings become Passages whose id is a hash of the text (stable across runs).
        `keep=False` writes to the store only (for corpora larger than the CPU tier).
        """
        items = [p if isinstance(p, Passage) else Passage(_text_id(p), p) for p in passages]
        as_passages(items)  # type checks
        prefix = self.prefix_kv()
        todo: dict[str, list[int]] = {}
        listed = self.tiers.stored_keys(self.namespace + ":")  # one listing, not one read per key
        records = [(p, self.layout.passage_chunks(p)) for p in items]
        self.layout.remember(records)
        for _, chunks in records:
            for c in chunks:
                key = self.layout.key(self.layout.fingerprint(c))
                if key in todo or key in self.tiers.cpu or key in self.tiers.gpu:
                    continue
                if (key not in listed) if listed is not None else not self.tiers.contains(key):
                    todo[key] = c
        keys = list(todo)
        step = max(1, self.batch_size) * 4
        for i in range(0, len(keys), step):
            part = keys[i : i + step]
            encoded = self.engine.encode_chunks(prefix, [todo[k] for k in part], self.batch_size)
            self.tiers.put_many(list(zip(part, encoded, strict=True)), keep=keep)
        return [p.id for p in items]

    def prefetch(self, passages_or_ids: Sequence[PassageOrId]) -> list[Future]:
        """Start loading these passages' KV from the store into the CPU tier (non-blocking)."""
        chunks = [c for cs in self.layout.resolve(passages_or_ids) for c in cs]
        fps = [self.layout.fingerprint(c) for c in chunks]
        return self.tiers.prefetch([(self.layout.key(fp), fp, c) for fp, c in zip(fps, chunks, strict=True)])

    # -- answering -------------------------------------------------------------------------
    def generate(self, question: str, passages_or_ids: Sequence[PassageOrId], max_new_tokens: int = 64,
                 repair: str | Repair | bool | None = True, reuse: str = "exact") -> KVAnswer:
        """Answer greedily from cached KV of the given passages (computing the missing ones).

        `reuse="exact"` (default): the longest cached prefix of the prompt's blocks (shared
        prefix, then each chunk in order, `ragcomp.kv.chain`) is loaded as it is and the rest
        prefilled; the answer equals `generate_full`'s. `reuse="chunks"`: each chunk's KV encoded
        alone after the prefix, rotated into place (approximate); `repair=True` then uses the
        cache's default repair, None/"none" turns it off for this call.
        """
        if reuse not in REUSE:
            raise ValueError(f"reuse must be one of {', '.join(map(repr, REUSE))}, got {reuse!r}")
        if reuse == "exact":
            if repair is not True and Repair.parse(repair or None) is not None:
                raise ValueError("repair= applies to reuse='chunks' only; reuse='exact' needs no repair")
            ans = self._generate_exact(question, passages_or_ids, max_new_tokens)
            self.tiers.warn_faults(ans.stats)  # here, so the warnings name generate's caller
            return ans
        t0 = time.perf_counter()
        stats = KVStats()
        rep = self.repair if repair is True else Repair.parse(repair or None)
        chunk_ids = [c for cs in self.layout.resolve(passages_or_ids) for c in cs]
        prefix = self.prefix.for_answer(stats)
        fps = [self.layout.fingerprint(c) for c in chunk_ids]
        keys = [self.layout.key(fp) for fp in fps]
        # Store reads start now, all entries in one store call (two pipelined round trips on Redis),
        # and run while the question is tokenised.
        pending = self.tiers.lookup_many(list(zip(keys, fps, chunk_ids, strict=True)), stats)
        q_ids = self.question_ids(question)
        total = len(prefix) + sum(len(c) for c in chunk_ids)
        self.engine.check_length(total + len(q_ids) + max_new_tokens)
        stats.seconds_prepare = time.perf_counter() - t0
        stats.context_tokens, stats.question_tokens = total, len(q_ids)
        misses: list[tuple[str, ChunkKV]] = []

        def fetch(i: int) -> ChunkKV:
            t = time.perf_counter()
            found = pending[i]
            chunk = found.result() if isinstance(found, Future) else found
            stats.seconds_load += time.perf_counter() - t
            if chunk is None:
                t = time.perf_counter()
                chunk = self.engine.encode_chunks(prefix, [chunk_ids[i]], 1)[0]
                stats.misses += 1
                stats.seconds_compute_misses += time.perf_counter() - t
                misses.append((keys[i], chunk))
            return chunk

        streamed = self.engine.device.type == "cuda" and rep is None
        if streamed:
            # GPU: host-to-GPU copies run layer group by layer group under the question's
            # forward pass; rotation and copies are inside seconds_prefill_question.
            chunks = [fetch(i) for i in range(len(chunk_ids))]
            t = time.perf_counter()
            asm, cache, logits = self.engine.prefill_streamed(prefix, chunks, q_ids,
                                                              reserve=len(q_ids) + max_new_tokens)
        else:
            def getter(i: int) -> Any:
                return lambda: self.tiers.to_gpu(keys[i], fetch(i))

            def on_rotate(dt: float) -> None:
                stats.seconds_rotate += dt

            # Store reads of later chunks overlap rotating earlier ones.
            asm = self.engine.assemble(prefix, [getter(i) for i in range(len(chunk_ids))],
                                       [len(c) for c in chunk_ids], on_rotate,
                                       reserve=len(q_ids) + max_new_tokens)
            if rep is not None:
                t = time.perf_counter()
                chosen = self.engine.select_for_repair(asm, rep, q_ids)
                self.engine.repair(asm, chosen)
                stats.repaired_tokens = len(chosen)
                stats.seconds_repair = time.perf_counter() - t
            t = time.perf_counter()
            cache = self.engine.make_cache(asm.keys, asm.values, grow=True)
            logits = self.engine.prefill(cache, q_ids, total)
        int(logits.argmax())  # the first token exists once its logits are reduced (syncs a GPU)
        stats.seconds_prefill_question = time.perf_counter() - t
        stats.ttft = time.perf_counter() - t0
        t = time.perf_counter()
        out = self.engine.decode(cache, logits, total + len(q_ids), max_new_tokens, self.stop_ids)
        stats.seconds_decode = time.perf_counter() - t
        stats.new_tokens = len(out)
        if misses:  # written after answering, so a slow store does not delay the answer
            for key, chunk in misses:
                self.tiers.put(key, chunk, stats=stats)
        if streamed and self.tiers.gpu.max_bytes:
            for key, chunk in zip(keys, chunks, strict=True):  # promote for the next question
                self.tiers.to_gpu(key, chunk)
        self.tiers.warn_faults(stats)
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        return KVAnswer(text, out, asm.ids + q_ids, stats)

    def _generate_exact(self, question: str, passages_or_ids: Sequence[PassageOrId],
                        max_new_tokens: int) -> KVAnswer:
        t0 = time.perf_counter()
        stats = KVStats()
        chunk_ids = [c for cs in self.layout.resolve(passages_or_ids) for c in cs]
        q_ids = self.question_ids(question)
        context = len(self.prefix_ids) + sum(len(c) for c in chunk_ids)
        self.chain.check_length(context + len(q_ids), max_new_tokens)  # before any model work
        stats.context_tokens, stats.question_tokens = context, len(q_ids)
        stats.seconds_prepare = time.perf_counter() - t0
        cache, logits, ids, new = self.chain.prefill(chunk_ids, q_ids, stats, reserve=max_new_tokens)
        int(logits.argmax())
        stats.ttft = time.perf_counter() - t0
        t = time.perf_counter()
        out = self.engine.decode(cache, logits, len(ids), max_new_tokens, self.stop_ids)
        stats.seconds_decode = time.perf_counter() - t
        stats.new_tokens = len(out)
        self.chain.store(new, stats)
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        return KVAnswer(text, out, ids, stats)

    def generate_full(self, question: str, passages_or_ids: Sequence[PassageOrId],
                      max_new_tokens: int = 64) -> KVAnswer:
        """The reference: a full prefill of the very same prompt ids (no cached KV)."""
        t0 = time.perf_counter()
        stats = KVStats()
        ids = self.prompt_ids(question, passages_or_ids)
        q_len = len(self.question_ids(question))
        stats.context_tokens, stats.question_tokens = len(ids) - q_len, q_len
        self.chain.check_length(len(ids), max_new_tokens)
        cache, logits = self.engine.full_prefill(ids)
        int(logits.argmax())
        stats.seconds_prefill_question = time.perf_counter() - t0
        stats.ttft = time.perf_counter() - t0
        t = time.perf_counter()
        out = self.engine.decode(cache, logits, len(ids), max_new_tokens, self.stop_ids)
        stats.seconds_decode = time.perf_counter() - t
        stats.new_tokens = len(out)
        return KVAnswer(self.tokenizer.decode(out, skip_special_tokens=True).strip(), out, ids, stats)

    # -- long documents (KV page retrieval, ragcomp.kv.pages) --------------------------------
    def long_documents(self, **options: Any) -> LongDocuments:
        """The `LongDocuments` of this cache (created on first use; `options` apply then:
        prefill_chunk, score_layers, embedder)."""
        if self._long is None:
            self._long = LongDocuments(self.engine, self.layout, self.prefix, self.tiers, self.stop_ids,
                                       **options)
        elif options:
            raise ValueError("long_documents() options can only be set on first use")
        return self._long

    def add_long(self, document_id: str, text: str | Sequence[int], page_tokens: int = 64,
                 keep: bool = True) -> LongDocument:
        """Encode a long document once (chunked prefill) and keep it as KV pages."""
        return self.long_documents().add(document_id, text, page_tokens=page_tokens, keep=keep)

    def ask_long(self, question: str, document_id: str, page_budget_tokens: int | None = 1024,
                 scoring: str = "hybrid", max_new_tokens: int = 64) -> KVAnswer:
        """Answer from the document's best KV pages (see `ragcomp.kv.pages`)."""
        return self.long_documents().ask(question, document_id, page_budget_tokens, scoring, max_new_tokens)

    # -- housekeeping ----------------------------------------------------------------------
    def clear_tiers(self) -> None:
        """Empty the GPU and CPU tiers (the store keeps its entries)."""
        self.tiers.clear_tiers()

    def close(self) -> None:
        self.tiers.close()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"KVCache(model={self.lm_name!r}, store={type(self.store).__name__}, "
                f"storage={self.engine.storage!r}, repair={self.repair})")


REUSE = ("exact", "chunks")


def _text_id(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"passages must be Passage or str, got {type(text).__name__}")
    return "t" + hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def _load(model: Any, tokenizer: Any, device: str | None, dtype: Any) -> tuple[str, Any, Any, Any]:
    """(name, hf_model, tokenizer, lock) from an alias/path/hub id, a CausalLM or a HF model."""
    from ragcomp.models import CausalLM, load_causal_lm

    if isinstance(model, str):
        lm = load_causal_lm(model, device=device, dtype=dtype)
        return lm.name, lm.model, lm.tokenizer, lm.lock
    if isinstance(model, CausalLM):
        return model.name, model.model, model.tokenizer, model.lock
    if tokenizer is None:
        raise ValueError("pass tokenizer= together with a Hugging Face model object")
    name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    return str(name), model, tokenizer, threading.RLock()
