"""`PromptLayout`, the token-id side of a `KVCache` (which holds one): the prompt layout (the chat
template split around the user message, the shared prefix's ids, the question's ids, a passage's
ids cut into chunks of at most `max_chunk_tokens`), the store keys of chunk entries, and the
passage index (passage id -> chunk token ids, kept in memory and in the store so another process
can ask by id). Everything here turns text and ids into token ids and keys; `KVCache` turns those
into KV.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from ragcomp.kv.config import PromptConfig
from ragcomp.kv.engine_core import EngineCore
from ragcomp.kv.fingerprint import entry_key, ids_hash
from ragcomp.kv.tiers import STORE_FAULTS, TieredKV
from ragcomp.types import Passage

log = logging.getLogger("ragcomp.kv")

_SENTINEL = "\x00RAGCOMP_USER\x00"

PassageOrId = Passage | str


class PromptLayout:
    """Prompt layout, entry keys and the passage index of one cache.

    Args:
        tokenizer: the model's tokenizer; its chat template, if any, frames the prompt.
        engine: names entries (model fingerprint, storage kind).
        tiers: the store behind them, which also keeps the passage index.
        config: the prompt's parts and the chunk size.
        namespace: the first part of every store key.
    """

    def __init__(self, tokenizer: Any, engine: EngineCore, tiers: TieredKV, config: PromptConfig,
                 namespace: str) -> None:
        self.tokenizer = tokenizer
        self.engine = engine
        self.tiers = tiers
        self.config = config
        self.namespace = namespace
        head, self.tail = self._chat_parts(config.system_prompt)
        self.prefix_ids = self.encode(head + config.instruction, special=not self.has_template)
        self.prefix_hash = ids_hash(self.prefix_ids)
        self._index: dict[str, list[list[int]]] = {}
        self._lock = threading.RLock()

    # -- prompt layout ---------------------------------------------------------------------
    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _chat_parts(self, system_prompt: str) -> tuple[str, str]:
        """Text before and after the user message in the model's chat template."""
        if not self.has_template:
            return f"{system_prompt}\n\n", "\nAnswer:"
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, _, tail = text.partition(_SENTINEL)
        return head, tail

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def question_ids(self, question: str) -> list[int]:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        return self.encode(self.config.question_template.format(question=question) + self.tail)

    def passage_chunks(self, passage: Passage) -> list[list[int]]:
        """Token ids of a passage's chunks (split every max_chunk_tokens tokens)."""
        text = self.config.doc_template.format(text=passage.text, id=passage.id,
                                               title=passage.metadata.get("title", ""))
        ids = self.encode(text)
        step = self.config.max_chunk_tokens
        return [ids[i : i + step] for i in range(0, len(ids), step)] or [[]]

    def prompt_ids(self, question: str, passages_or_ids: Sequence[PassageOrId]) -> list[int]:
        """The exact token ids both the cached and the full-prefill paths answer from."""
        chunks = [c for cs in self.resolve(passages_or_ids) for c in cs]
        return self.prefix_ids + [t for c in chunks for t in c] + self.question_ids(question)

    # -- keys and the passage index --------------------------------------------------------
    def fingerprint(self, ids: Sequence[int]) -> str:
        """The fingerprint of a chunk's KV encoded after this layout's prefix."""
        return self.engine.fingerprint(self.prefix_ids, ids)

    def key(self, fp: str) -> str:
        """The store key of the entry with fingerprint `fp`."""
        return entry_key(self.namespace, fp)

    def prefix_fingerprint(self) -> str:
        return self.engine.fingerprint([], self.prefix_ids, "native")

    def _index_key(self, passage_id: str) -> str:
        layout = json.dumps([self.engine.model_fp, self.config.doc_template, self.config.max_chunk_tokens])
        digest = hashlib.blake2b(f"{layout}\x00{passage_id}".encode(), digest_size=16).hexdigest()
        return f"{self.namespace}:idx:{digest}"

    def remember(self, records: Sequence[tuple[Passage, list[list[int]]]]) -> None:
        """Passage id -> chunk token ids, here and in the store (so another process can ask by id)."""
        with self._lock:
            for p, chunks in records:
                self._index[p.id] = chunks
        if records and self.tiers.store_available():
            entries = [(self._index_key(p.id), json.dumps({"id": p.id, "chunks": c}).encode())
                       for p, c in records]
            try:
                self.tiers.store.set_many(entries)
            except STORE_FAULTS as e:
                log.warning("could not record %d passage ids in the store: %s", len(entries), e)

    def _lookup_id(self, passage_id: str) -> list[list[int]] | None:
        with self._lock:
            if passage_id in self._index:
                return self._index[passage_id]
        if not self.tiers.store_available():
            return None
        try:
            raw = self.tiers.store.get(self._index_key(passage_id))
        except STORE_FAULTS:
            return None
        if raw is None:
            return None
        try:
            rec = json.loads(raw)
            chunks = [[int(t) for t in c] for c in rec["chunks"]]
        except (ValueError, KeyError, TypeError):
            return None
        if rec.get("id") != passage_id:
            return None
        with self._lock:
            self._index[passage_id] = chunks
        return chunks

    def resolve(self, items: Sequence[PassageOrId]) -> list[list[list[int]]]:
        """Chunk token ids per item: Passages are tokenised, strings are ids added earlier.

        A string that is not a known id is an error, not silently treated as text: pass
        `Passage(id, text)` (or call `add`) for new text.
        """
        if isinstance(items, (str, Passage)):
            raise TypeError("passages_or_ids must be a list of Passage or passage-id strings")
        out = []
        for item in items:
            if isinstance(item, Passage):
                out.append(self.passage_chunks(item))
            elif isinstance(item, str):
                chunks = self._lookup_id(item)
                if chunks is None:
                    raise KeyError(f"passage id {item!r} was never added to this cache; pass a Passage "
                                   "with its text or call add() first")
                out.append(chunks)
            else:
                raise TypeError(f"expected a Passage or a passage id, got {type(item).__name__}")
        return out
