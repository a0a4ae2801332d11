"""Provence's CPU-side inputs: encoder windows, the per-passage work that depends only on the text
(token ids, sentences, the sentence of each token) with its LRU, batch arrays, and sentence means of
token keep probabilities."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragcomp.accel.graphed import round_up
from ragcomp.text import Sentence, split_sentences


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


def passage_windows(query_ids: list[int], passage_ids: list[int], size: int, stride: int | None,
                    cls_id: int | None, sep_id: int | None) -> list[Window]:
    """`[CLS] query [SEP] passage[lo:hi] [SEP]` windows of at most `size` tokens covering the passage;
    consecutive windows share `stride` passage tokens (None: a quarter of the room)."""
    if cls_id is None or sep_id is None:
        raise ValueError("the encoder's tokenizer needs [CLS] and [SEP] (input: [CLS] q [SEP] p [SEP])")
    q = query_ids[: size // 2]  # a long query never leaves the passage less than half the window
    head = [cls_id, *q, sep_id]
    room = size - len(head) - 1
    overlap = room // 4 if stride is None else min(stride, room - 1)
    step = max(1, room - overlap)
    out, lo, n_tokens = [], 0, len(passage_ids)
    while lo < n_tokens:
        hi = min(lo + room, n_tokens)
        ids = [*head, *passage_ids[lo:hi], sep_id]
        types = [0] * len(head) + [1] * (hi - lo + 1)
        out.append(Window(ids, types, lo, hi, len(head)))
        if hi == n_tokens:
            break
        lo += step
    return out


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

    def bind(self, tokenizer: Any) -> None:
        """Hold work of `tokenizer` from now on (another tokenizer's entries are dropped)."""
        with self._lock:
            self._bind_locked(tokenizer)

    def _bind_locked(self, tokenizer: Any) -> None:
        if tokenizer is not self._tokenizer:
            self._items.clear()
            self._tokenizer = tokenizer

    def get(self, tokenizer: Any, text: str) -> PassageWork | None:
        with self._lock:
            self._bind_locked(tokenizer)
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


def prepare_passages(cache: PassageCache, tok: Any, lock: Any, texts: list[str], batch_size: int) -> None:
    """Token ids, sentences and the sentence of each token of `texts` into `cache`, tokenised
    `batch_size` texts per call under the tokenizer's `lock`: the same work a question does for a
    passage it has not seen, done ahead."""
    cache.bind(tok)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        with lock:
            ids, offsets = encode_texts(tok, chunk)
        for text, text_ids, offs in zip(chunk, ids, offsets, strict=True):
            sents = split_sentences(text)
            cache.put(tok, text, PassageWork(text_ids, sents, token_sentences(sents, offs)))


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
    output equals the wrapper's), else None. (The wrapper's own call clears such settings, so only
    a tokenizer's first call goes through it.)"""
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


class WindowFold:
    """How window outputs fold back into passages, planned from the windows alone (so it is built
    while the GPU runs) and applied after the wait in a few whole-array steps: keep probabilities
    averaged where windows overlap, ranking = best window, sentence score = mean keep probability
    of the sentence's tokens (a sentence with no token gets its passage's mean). Same numbers as
    folding each passage on its own (`mean_by_sentence`), in float64 sums, float32 results."""

    def __init__(self, work: list[PassageWork], windows: list[Window], owner: list[int]) -> None:
        self.owner = owner
        n_tokens = np.array([len(w.ids) for w in work], np.int64)
        n_sents = np.array([len(w.sentences) for w in work], np.int64)
        self.token_starts = np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int64)
        self.sentence_starts = np.concatenate([[0], np.cumsum(n_sents)]).astype(np.int64)
        parts = [np.arange(w.lo, w.hi) + self.token_starts[j] for w, j in zip(windows, owner, strict=True)]
        self.token_index = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.token_counts = np.maximum(np.bincount(self.token_index, minlength=int(self.token_starts[-1])), 1)
        sentence = (np.concatenate([w.token_sentence for w in work]).astype(np.int64) if work
                    else np.zeros(0, np.int64))
        in_sentence = sentence >= 0
        self.sentence_tokens = np.flatnonzero(in_sentence)
        self.sentence_index = (sentence + np.repeat(self.sentence_starts[:-1], n_tokens))[in_sentence]
        count = np.bincount(self.sentence_index, minlength=int(self.sentence_starts[-1]))
        self.sentence_counts = np.maximum(count, 1)
        self.tokenless = np.flatnonzero(count == 0)  # sentences scored by their passage's mean
        self.spans: list[list[tuple[int, int]]] = [[] for _ in work]
        for w, j in zip(windows, owner, strict=True):
            self.spans[j].append((w.lo, w.hi))

    def apply(self, ranks: list[float], probs: list[np.ndarray]) -> tuple[
            list[float | None], list[np.ndarray], list[np.ndarray]]:
        """(ranking, token keep probabilities, sentence scores) of each passage, from each window's
        ranking and keep probabilities of its passage tokens."""
        values = np.concatenate(probs).astype(np.float32) if probs else np.zeros(0, np.float32)
        sums = np.bincount(self.token_index, weights=values, minlength=len(self.token_counts))
        token_probs = (sums / self.token_counts).astype(np.float32)
        totals = np.bincount(self.sentence_index, weights=token_probs[self.sentence_tokens],
                             minlength=len(self.sentence_counts))
        scores = totals / self.sentence_counts
        if len(self.tokenless):
            passage = np.searchsorted(self.sentence_starts, self.tokenless, side="right") - 1
            for s, j in zip(self.tokenless, passage, strict=True):
                own = token_probs[self.token_starts[j] : self.token_starts[j + 1]]
                scores[s] = float(own.mean()) if len(own) else 0.0
        scores = scores.astype(np.float32)
        best: list[float | None] = [None] * (len(self.token_starts) - 1)
        for j, r in zip(self.owner, ranks, strict=True):
            best[j] = r if best[j] is None else max(best[j], r)  # type: ignore[type-var]
        ts, ss = self.token_starts, self.sentence_starts
        return (best, [token_probs[ts[j] : ts[j + 1]] for j in range(len(best))],
                [scores[ss[j] : ss[j + 1]] for j in range(len(best))])
