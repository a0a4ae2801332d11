"""KV page retrieval over long documents (RetroLM-style), on the engine, prompt layout, shared
prefix and tiers of a `KVCache` (which makes one: `KVCache.long_documents()`).

    kv = KVCache(model="smollm2-135m", store="disk:/tmp/kv")
    kv.add_long("report", long_text)                  # encoded once, kept as 64-token pages
    ans = kv.ask_long("Who signed it?", "report", page_budget_tokens=1024)
    ans.text, ans.stats.kept_pages, ans.stats.bytes_touched

The document is encoded once after the shared prefix (chunked prefill, see
`pages_score.encode_document`), so every page's KV was computed with all the text before
it. Each page is one entry in the KV tiers and store (its fingerprint hashes the prefix and
the document up to the page). Per question only the scoring data (a few layers of keys
without RoPE, page embeddings) and the kept pages are read; the kept pages are rotated to
contiguous positions after the prefix, then the question is prefilled and answered:

    [prefix] [best pages, in document order] [last page] [question]

No page is re-encoded per question; what is lost is attention from kept pages' later
neighbours, which they never had, and the pages that were dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ragcomp.kv.cache_prompt import PromptLayout
from ragcomp.kv.codec import ChunkKV, CorruptEntryError, decode_entry, encode_entry
from ragcomp.kv.engine import KVEngine
from ragcomp.kv.fingerprint import ids_hash
from ragcomp.kv.pages_score import (
    NULL_QUESTION,
    SCORINGS,
    attention_page_scores,
    attention_token_mass,
    check_score_layers,
    combine,
    default_score_layers,
    encode_document,
    page_bounds,
    page_fingerprint,
    question_queries,
    score_keys,
    select_pages,
    split_pages,
)
from ragcomp.kv.pages_types import LongDocument, PageStats
from ragcomp.kv.prefix import SharedPrefix
from ragcomp.kv.tiers import STORE_FAULTS, TieredKV
from ragcomp.kv.types import KVAnswer


class LongDocuments:
    """Long documents kept as KV pages, answered from the best pages (one per `KVCache`).

    Args:
        engine: the model's engine.
        layout: token ids, prefix ids and entry keys of the cache's prompts.
        prefix: the shared prefix's KV, as the cache holds it.
        tiers: the GPU/CPU tiers and the store the pages live in.
        stop_ids: token ids that end an answer.
        prefill_chunk: tokens per forward pass while encoding a document.
        score_layers: layers whose keys score pages (default: four layers spread over the
            upper 60% of the depth, `pages_score.default_score_layers`).
        embedder: text embedder for page embeddings (offline alias or path).
    """

    def __init__(self, engine: KVEngine, layout: PromptLayout, prefix: SharedPrefix, tiers: TieredKV,
                 stop_ids: Sequence[int], prefill_chunk: int = 1024,
                 score_layers: Sequence[int] | None = None, embedder: str = "minilm") -> None:
        self.engine = engine
        self.layout = layout
        self.prefix = prefix
        self.tiers = tiers
        self.stop_ids = list(stop_ids)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        layers = default_score_layers(self.engine.num_layers) if score_layers is None else score_layers
        self.score_layers = check_score_layers(self.engine, layers)
        self.embedder_name = embedder
        self._embedder: Any = None
        self._docs: dict[str, LongDocument] = {}
        self._score_keys: dict[str, Any] = {}
        self._indexes: dict[str, Any] = {}
        self._priors: dict[str, Any] = {}
        self._prefix_score: Any = None

    # -- keys -----------------------------------------------------------------------------
    def _doc_key(self, doc_id: str) -> str:
        layout = json.dumps([self.engine.model_fp, self.layout.prefix_hash, "long"])
        digest = hashlib.blake2b(f"{layout}\x00{doc_id}".encode(), digest_size=16).hexdigest()
        return f"{self.layout.namespace}:longdoc:{digest}"

    def _score_fp(self, doc: LongDocument) -> str:
        return json.dumps({"kind": "page-score-keys", "model": self.engine.model_fp,
                           "prefix": self.layout.prefix_hash, "doc": ids_hash(doc.ids),
                           "layers": self.score_layers}, sort_keys=True)

    def _page_keys(self, doc: LongDocument) -> list[str]:
        return [self.layout.key(fp) for fp in doc.fingerprints]

    # -- adding ---------------------------------------------------------------------------
    def _layout(self, doc_id: str, ids: list[int], page_tokens: int) -> LongDocument:
        bounds = page_bounds(len(ids), page_tokens)
        fps = [page_fingerprint(self.engine, self.layout.prefix_ids, ids, s, e) for s, e in bounds]
        return LongDocument(doc_id, ids, page_tokens, bounds, fps)

    def add(self, doc_id: str, text: str | Sequence[int], page_tokens: int = 64, keep: bool = True
            ) -> LongDocument:
        """Encode `text` (or token ids) once and store it as pages; nothing is encoded again
        when the store already holds every page of this exact text."""
        if not isinstance(doc_id, str) or not doc_id:
            raise ValueError("document id must be a non-empty string")
        if isinstance(text, str):
            if not text.strip():
                raise ValueError(f"document {doc_id!r} is empty")
            ids = self.layout.encode(text)
        else:
            ids = [int(t) for t in text]
            if not ids:
                raise ValueError(f"document {doc_id!r} has no tokens")
        doc = self._layout(doc_id, ids, page_tokens)
        prefix = self.prefix.get()
        keys = self._page_keys(doc)
        tiers = self.tiers
        listed = tiers.stored_keys(self.layout.namespace + ":")  # one listing, not one read per page

        def held(key: str) -> bool:
            if key in tiers.cpu or key in tiers.gpu:
                return True
            return (key in listed) if listed is not None else tiers.contains(key)

        have = all(held(k) for k in keys)
        if not (have and self._load_score_keys(doc) is not None):
            self._encode(doc, prefix, keep)
        self._docs[doc_id] = doc
        self._remember(doc)
        # Scoring data now, not on the first question: page embeddings and the prior.
        self._page_index(doc)
        sk = self._load_score_keys(doc)
        if sk is not None:
            self._prior(doc, sk)
        return doc

    def _encode(self, doc: LongDocument, prefix: ChunkKV, keep: bool) -> list[ChunkKV]:
        """Encode the document, store its pages and its score keys; returns the pages."""
        k, v = encode_document(self.engine, prefix, doc.ids, self.prefill_chunk)
        pages = split_pages(self.engine, self.layout.prefix_ids, doc.ids, k, v, doc.page_tokens)
        sk = score_keys(self.engine, k, self.score_layers, len(prefix))
        del k, v
        self.tiers.put_many(list(zip(self._page_keys(doc), pages, strict=True)), keep=keep)
        self._score_keys[doc.cache_key] = sk
        if self.tiers.store_available():
            entry = ChunkKV(doc.ids, sk.cpu(), sk[:, :, :0].cpu(), len(prefix), self._score_fp(doc))
            with contextlib.suppress(*STORE_FAULTS):  # kept in memory; another process re-encodes
                self.tiers.store.set(self.layout.key(self._score_fp(doc)), encode_entry(entry))
        return pages

    def _remember(self, doc: LongDocument) -> None:
        if not self.tiers.store_available():
            return
        record = json.dumps({"id": doc.id, "ids": doc.ids, "page_tokens": doc.page_tokens}).encode()
        with contextlib.suppress(*STORE_FAULTS):  # the id then resolves in this process only
            self.tiers.store.set(self._doc_key(doc.id), record)

    def document(self, doc_id: str) -> LongDocument:
        """A document added here or, by id, in another process sharing the store."""
        if doc_id in self._docs:
            return self._docs[doc_id]
        raw = None
        if self.tiers.store_available():
            try:
                raw = self.tiers.store.get(self._doc_key(doc_id))
            except STORE_FAULTS:
                raw = None
        if raw is not None:
            try:
                rec = json.loads(raw)
                if rec.get("id") == doc_id:
                    doc = self._layout(doc_id, [int(t) for t in rec["ids"]], int(rec["page_tokens"]))
                    self._docs[doc_id] = doc
                    return doc
            except (ValueError, KeyError, TypeError):
                pass
        raise KeyError(f"long document {doc_id!r} was never added to this cache; call add_long() first")

    # -- scoring data ---------------------------------------------------------------------
    def _load_score_keys(self, doc: LongDocument) -> Any:
        sk = self._score_keys.get(doc.cache_key)
        if sk is not None:
            return sk
        if not self.tiers.store_available():
            return None
        try:
            raw = self.tiers.store.get(self.layout.key(self._score_fp(doc)))
        except STORE_FAULTS:
            return None
        if raw is None:
            return None
        try:
            entry = decode_entry(raw, verify=True)
        except CorruptEntryError:
            return None
        if entry.fingerprint != self._score_fp(doc) or entry.ids != doc.ids:
            return None
        sk = entry.keys.clone().to(self.engine.device)
        self._score_keys[doc.cache_key] = sk
        return sk

    def _prefix_score_keys(self) -> Any:
        if self._prefix_score is None:
            pk, _ = self.prefix.get().dequantized(self.engine.dtype)
            self._prefix_score = score_keys(self.engine, pk.to(self.engine.device), self.score_layers, 0)
        return self._prefix_score

    def _prior(self, doc: LongDocument, sk: Any) -> Any:
        """What a content-free question attends to in this document (once per document)."""
        if doc.cache_key not in self._priors:
            self._priors[doc.cache_key] = self._mass(self.layout.encode(NULL_QUESTION), sk)
        return self._priors[doc.cache_key]

    def _mass(self, ids: list[int], sk: Any) -> Any:
        q = question_queries(self.engine, self.prefix.get(), ids, self.score_layers)
        return attention_token_mass(q, self._prefix_score_keys(), sk)

    def page_texts(self, doc: LongDocument) -> list[str]:
        tok = self.layout.tokenizer
        return [tok.decode(doc.ids[s:e], skip_special_tokens=True) for s, e in doc.bounds]

    def _embedder_obj(self) -> Any:
        if self._embedder is None:
            from ragcomp.embeddings import shared_embedder

            self._embedder = shared_embedder(self.embedder_name)
        return self._embedder

    def _page_index(self, doc: LongDocument) -> Any:
        """A FAISS index of the document's page-text embeddings (ids: page numbers)."""
        index = self._indexes.get(doc.cache_key)
        if index is None:
            from ragcomp.stores.faiss import FaissIndex

            emb = self._embedder_obj()
            index = FaissIndex(emb.dim, info={"document": doc.id})
            index.add([str(i) for i in range(doc.n_pages)], emb.embed(self.page_texts(doc)))
            self._indexes[doc.cache_key] = index
        return index

    def scores(self, question: str, doc: LongDocument, scoring: str, stats: PageStats | None = None) -> Any:
        """One float per page (higher: more relevant) by `scoring`."""
        torch = self.engine.torch
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        att = emb = None
        if scoring in ("attention", "hybrid"):
            sk = self._load_score_keys(doc)
            if sk is None:
                self._encode(doc, self.prefix.get(), keep=True)
                sk = self._score_keys[doc.cache_key]
            if stats is not None:
                stats.bytes_score += sk.numel() * sk.element_size()
            mass = self._mass(self.layout.encode(question), sk)
            att = attention_page_scores(mass, self._prior(doc, sk), doc.page_tokens)
        if scoring in ("embedding", "hybrid"):
            index = self._page_index(doc)
            qv = self._embedder_obj().embed_one(question)
            emb = torch.zeros(doc.n_pages, dtype=torch.float32)
            for pid, score in index.search(qv, doc.n_pages)[0]:
                emb[int(pid)] = score
            if stats is not None:
                stats.bytes_score += doc.n_pages * index.dim * 4
        if scoring == "attention":
            return att
        if scoring == "embedding":
            return emb
        return combine(att, emb)

    # -- answering ------------------------------------------------------------------------
    def ask(self, question: str, doc_id: str, page_budget_tokens: int | None = 1024, scoring: str = "hybrid",
            max_new_tokens: int = 64) -> KVAnswer:
        """Answer from the prefix, the best pages within `page_budget_tokens` (the last page
        included) and the question. None, or a budget covering the document, keeps every page
        (full-context decoding from the stored KV). The question is never cut: the budget
        counts document tokens only."""
        t0 = time.perf_counter()
        eng, tiers = self.engine, self.tiers
        stats = PageStats(scoring=scoring)
        doc = self.document(doc_id)
        q_ids = self.layout.question_ids(question)
        if page_budget_tokens is not None:
            if isinstance(page_budget_tokens, bool) or not isinstance(page_budget_tokens, int):
                raise TypeError(f"page_budget_tokens must be an int or None, got {page_budget_tokens!r}")
            if page_budget_tokens < min(doc.page_tokens, len(doc.ids)):
                raise ValueError(f"page_budget_tokens={page_budget_tokens} is smaller than one page "
                                 f"({doc.page_tokens} tokens) of document {doc_id!r} "
                                 f"({len(doc.ids)} tokens): no page fits")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        prefix = self.prefix.for_answer(stats)
        lengths = [e - s for s, e in doc.bounds]
        everything = page_budget_tokens is None or page_budget_tokens >= len(doc.ids)
        t = time.perf_counter()
        if everything:
            stats.scoring = "none (all pages)"
            kept = list(range(doc.n_pages))
        else:
            scores = self.scores(question, doc, scoring, stats).tolist()
            kept = select_pages(scores, lengths, page_budget_tokens)
        stats.seconds_score = time.perf_counter() - t
        keys = self._page_keys(doc)
        pending = [tiers.lookup(keys[i], doc.fingerprints[i], doc.ids[s:e], stats)
                   for i, (s, e) in ((i, doc.bounds[i]) for i in kept)]
        t = time.perf_counter()
        pages = [p.result() if isinstance(p, Future) else p for p in pending]
        stats.seconds_load = time.perf_counter() - t
        if any(p is None for p in pages):
            # An evicted or lost page cannot be encoded alone (it needs the text before it):
            # encode the document again, once.
            t = time.perf_counter()
            stats.misses += sum(p is None for p in pages)
            every = self._encode(doc, prefix, keep=True)
            pages = [every[i] if p is None else p for i, p in zip(kept, pages, strict=True)]
            stats.seconds_compute_misses = time.perf_counter() - t
        pages = [tiers.to_gpu(keys[i], p) for i, p in zip(kept, pages, strict=True)]
        stats.bytes_pages = sum(p.nbytes for p in pages)
        stats.bytes_all_pages = round(sum(lengths) * _page_bytes_per_token(pages))
        total = len(prefix) + sum(len(p) for p in pages)
        eng.check_length(total + len(q_ids) + max_new_tokens)
        stats.document_tokens, stats.page_tokens = len(doc.ids), doc.page_tokens
        stats.pages_total, stats.pages_kept, stats.kept_pages = doc.n_pages, len(kept), kept
        stats.kept_tokens = sum(len(p) for p in pages)
        stats.context_tokens, stats.question_tokens = total, len(q_ids)
        stats.seconds_prepare = time.perf_counter() - t0 - stats.seconds_score - stats.seconds_load
        t = time.perf_counter()
        room = len(q_ids) + max_new_tokens  # question and answer fill buffer space, no concatenation
        if eng.device.type == "cuda":
            asm, cache, logits = eng.prefill_streamed(prefix, pages, q_ids, reserve=room)
        else:
            def on_rotate(dt: float) -> None:
                stats.seconds_rotate += dt

            asm = eng.assemble(prefix, pages, on_rotate=on_rotate, reserve=room)
            cache = eng.make_cache(asm.keys, asm.values, grow=True)
            logits = eng.prefill(cache, q_ids, total)
        int(logits.argmax())
        stats.seconds_prefill_question = time.perf_counter() - t
        stats.ttft = time.perf_counter() - t0
        t = time.perf_counter()
        out = eng.decode(cache, logits, total + len(q_ids), max_new_tokens, self.stop_ids)
        stats.seconds_decode = time.perf_counter() - t
        stats.new_tokens = len(out)
        tiers.warn_faults(stats)
        text = self.layout.tokenizer.decode(out, skip_special_tokens=True).strip()
        return KVAnswer(text, out, asm.ids + q_ids, stats)


def _page_bytes_per_token(pages: Sequence[ChunkKV]) -> float:
    n = sum(len(p) for p in pages)
    return sum(p.nbytes for p in pages) / n if n else 0.0
