"""Provence's CPU-side inputs: encoder windows, the per-passage work that depends only on the text
(token ids, sentences, the sentence of each token) with its LRU, batch arrays, and sentence means of
token keep probabilities."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragcomp.compressors.graphed import round_up
from ragcomp.text import Sentence


@dataclass
class Window:
    """One encoder input: `input_ids[offset + i]` is passage token `lo + i`, for i < hi - lo."""

    input_ids: list[int]
    token_type_ids: list[int]
    lo: int
    hi: int
    offset: int


@dataclass
class PassageWork:
    """The CPU work on one passage that depends only on its text (and the tokenizer)."""

    ids: list[int]
    sentences: list[Sentence]
    token_sentence: np.ndarray  # the sentence each token belongs to, -1 for none


class PassageCache:
    """Bounded LRU of `PassageWork` by passage text, for one tokenizer (a new one empties it).

    Tokens and sentences are pure functions of the text, so an entry is never stale; a corpus
    passage that comes back in a later question skips tokenising and sentence splitting."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, PassageWork] = OrderedDict()
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def get(self, tokenizer: Any, text: str) -> PassageWork | None:
        with self._lock:
            if tokenizer is not self._tokenizer:
                self._items.clear()
                self._tokenizer = tokenizer
            work = self._items.get(text)
            if work is None:
                self.misses += 1
            else:
                self.hits += 1
                self._items.move_to_end(text)
            return work

    def put(self, tokenizer: Any, text: str, work: PassageWork) -> None:
        if self.size <= 0:
            return
        with self._lock:
            if tokenizer is not self._tokenizer:
                return  # computed with a tokenizer that another call has replaced meanwhile
            self._items[text] = work
            self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def encode_texts(tok: Any, texts: list[str]) -> tuple[list[list[int]], list[Any]]:
    """Token ids and character offsets of each text, no special tokens. Straight from the Rust
    tokenizer when it carries no truncation or padding setting (the HF wrapper's per-call Python
    costs about a third of the time); through the wrapper otherwise."""
    if not texts:
        return [], []
    backend = _plain_backend(tok)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return enc["input_ids"], enc["offset_mapping"]


def encode_ids(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: the same ids as `encode_texts`, without the
    character offsets (the Rust tokenizer's `encode_batch_fast` skips tracking them, about 40%
    less time), for the part of the work the GPU waits on."""
    if not texts:
        return []
    backend = _plain_backend(tok)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return encode_texts(tok, texts)[0]


def _plain_backend(tok: Any) -> Any:
    """The Rust tokenizer behind `tok` when it carries no truncation or padding setting (so its
    output equals the wrapper's), else None."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return backend
    return None


def batch_inputs(windows: list[Window], pad_id: int, width_multiple: int) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, types) int64 arrays [len(windows), width] for one batch, width rounded up."""
    width = round_up(max(len(w.input_ids) for w in windows), width_multiple)
    ids = np.full((len(windows), width), pad_id, np.int64)
    mask = np.zeros((len(windows), width), np.int64)
    types = np.zeros((len(windows), width), np.int64)
    for row, w in enumerate(windows):
        n = len(w.input_ids)
        ids[row, :n] = w.input_ids
        mask[row, :n] = 1
        types[row, w.offset : n] = 1  # the passage segment, closing [SEP] included (as token_type_ids)
    return ids, mask, types


def token_sentences(sents: list[Sentence], offsets: Any) -> np.ndarray:
    """Index of the sentence each token belongs to, -1 for none: the sentence holding the token's last
    character, so a leading space in a token's offsets does not move it to the previous sentence."""
    spans = np.asarray(offsets, np.int64).reshape(-1, 2)
    if not sents:
        return np.full(len(spans), -1, np.int64)
    starts = np.array([s.start for s in sents], np.int64)
    ends = np.array([s.end for s in sents], np.int64)
    last = spans[:, 1] - 1
    owner = np.searchsorted(starts, last, side="right") - 1
    valid = (spans[:, 1] > spans[:, 0]) & (owner >= 0)
    valid &= last < ends[np.maximum(owner, 0)]
    return np.where(valid, owner, -1)


def sentence_means(sents: list[Sentence], offsets: Any, probs: np.ndarray) -> np.ndarray:
    """Mean keep probability of each sentence's tokens (tokens given by character offsets)."""
    return mean_by_sentence(token_sentences(sents, offsets), len(sents), probs)


def mean_by_sentence(token_sentence: np.ndarray, n_sentences: int, probs: np.ndarray) -> np.ndarray:
    """Mean keep probability of each sentence's tokens (`token_sentence` from `token_sentences`)."""
    valid = token_sentence >= 0
    total = np.bincount(token_sentence[valid], weights=probs[valid], minlength=n_sentences)
    count = np.bincount(token_sentence[valid], minlength=n_sentences)
    # A sentence with no token of its own (rare: characters the tokenizer drops) gets the passage mean.
    fallback = float(probs.mean()) if len(probs) else 0.0
    return np.where(count > 0, total / np.maximum(count, 1), fallback).astype(np.float32)


def launch_groups(n_passages: int, batch_size: int) -> list[list[int]]:
    """Consecutive passage indices in the fewest groups of at most `batch_size`, sizes as even as
    possible (20 passages in batches of 16: 10 and 10, not 16 and 4, so the first launch waits for
    half of the tokenising and both batches keep the GPU as busy)."""
    if n_passages <= 0:
        return []
    n_groups = -(-n_passages // batch_size)
    base, extra = divmod(n_passages, n_groups)
    out, start = [], 0
    for g in range(n_groups):
        size = base + (g < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def add_offsets(tok: Any, lock: Any, texts: list[str], fresh: dict[int, tuple[list[int], Any]]) -> None:
    """Character offsets for the texts tokenised for ids only (`fresh`: index into `texts` -> (ids,
    offsets or None)), in place, under the tokenizer's `lock`; their ids must come out the same, or
    the token-to-sentence map would be wrong."""
    order = list(fresh)
    with lock:
        ids, offsets = encode_texts(tok, [texts[j] for j in order])
    for j, again, offs in zip(order, ids, offsets, strict=True):
        if again != fresh[j][0]:
            raise RuntimeError("the tokenizer gave different ids in its second pass over a passage")
        fresh[j] = (again, offs)
