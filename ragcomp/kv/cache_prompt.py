"""The token-id side of `KVCache` (`PromptLayout`, a base class of it): the prompt layout
(the chat template split around the user message, the question's ids, a passage's ids cut into
chunks of at most `max_chunk_tokens`), the store keys of chunk entries, and the passage index
(passage id -> chunk token ids, kept in memory and in the store so another process can ask by
id). Everything here turns text and ids into token ids; `KVCache` turns those into KV.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

from ragcomp.kv.fingerprint import entry_key
from ragcomp.kv.tiers import _FAULTS
from ragcomp.types import Passage

log = logging.getLogger("ragcomp.kv")

_SENTINEL = "\x00RAGCOMP_USER\x00"

PassageOrId = Passage | str


class PromptLayout:
    """Prompt layout, entry keys and the passage index of a `KVCache`.

    Reads what `KVCache.__init__` sets: tokenizer, doc_template, question_template, _tail,
    max_chunk_tokens, prefix_ids, namespace, engine, tiers, store, _index and _lock.
    """

    # -- prompt layout ---------------------------------------------------------------------
    @property
    def _has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _chat_parts(self, system_prompt: str) -> tuple[str, str]:
        """Text before and after the user message in the model's chat template."""
        if not self._has_template:
            return f"{system_prompt}\n\n", "\nAnswer:"
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, _, tail = text.partition(_SENTINEL)
        return head, tail

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def question_ids(self, question: str) -> list[int]:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        return self._encode(self.question_template.format(question=question) + self._tail)

    def passage_chunks(self, passage: Passage) -> list[list[int]]:
        """Token ids of a passage's chunks (split every max_chunk_tokens tokens)."""
        text = self.doc_template.format(text=passage.text, id=passage.id,
                                        title=passage.metadata.get("title", ""))
        ids = self._encode(text)
        step = self.max_chunk_tokens
        return [ids[i : i + step] for i in range(0, len(ids), step)] or [[]]

    def prompt_ids(self, question: str, passages_or_ids: Sequence[PassageOrId]) -> list[int]:
        """The exact token ids both the cached and the full-prefill paths answer from."""
        chunks = [c for cs in self._resolve(passages_or_ids) for c in cs]
        return self.prefix_ids + [t for c in chunks for t in c] + self.question_ids(question)

    # -- keys and the passage index --------------------------------------------------------
    def _fp(self, ids: Sequence[int]) -> str:
        return self.engine.fingerprint(self.prefix_ids, ids)

    def _key(self, fp: str) -> str:
        return entry_key(self.namespace, fp)

    def _prefix_fp(self) -> str:
        return self.engine.fingerprint([], self.prefix_ids, "native")

    def _index_key(self, passage_id: str) -> str:
        layout = json.dumps([self.engine.model_fp, self.doc_template, self.max_chunk_tokens])
        digest = hashlib.blake2b(f"{layout}\x00{passage_id}".encode(), digest_size=16).hexdigest()
        return f"{self.namespace}:idx:{digest}"

    def _remember(self, records: Sequence[tuple[Passage, list[list[int]]]]) -> None:
        """Passage id -> chunk token ids, here and in the store (so another process can ask by id)."""
        with self._lock:
            for p, chunks in records:
                self._index[p.id] = chunks
        if records and self.tiers.store_available():
            entries = [(self._index_key(p.id), json.dumps({"id": p.id, "chunks": c}).encode())
                       for p, c in records]
            try:
                self.store.set_many(entries)
            except _FAULTS as e:
                log.warning("could not record %d passage ids in the store: %s", len(entries), e)

    def _lookup_id(self, passage_id: str) -> list[list[int]] | None:
        with self._lock:
            if passage_id in self._index:
                return self._index[passage_id]
        if not self.tiers.store_available():
            return None
        try:
            raw = self.store.get(self._index_key(passage_id))
        except _FAULTS:
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

    def _resolve(self, items: Sequence[PassageOrId]) -> list[list[list[int]]]:
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
