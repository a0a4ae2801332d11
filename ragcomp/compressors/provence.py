"""Provence: prune each passage to the sentences an encoder marks as needed, and rerank the
passages by the same encoder's score, in one pass over (query, passage).

The model and the published checkpoint's layout are in `provence_model.py`. Here: the input
`[CLS] query [SEP] passage [SEP]`; passages longer than the window are read in overlapping windows
(keep probabilities averaged where windows overlap, ranking score = best window); token decisions
rounded to whole sentences (a sentence is kept when the mean keep probability of its tokens is
above `threshold`, the published rule, default 0.1); kept sentences returned verbatim with spans.

Not confirmed from the published code (assumptions): whether its `process()` normalises the
question (the candle port lower-cases it and strips punctuation; we pass it unchanged) and how it
splits contexts longer than 512 tokens (we use token windows with overlap, described above).
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.base import Compressor, PassageLike, as_passages
from ragcomp.compressors._common import check_fraction, check_int
from ragcomp.models import default_device, resolve_dtype
from ragcomp.text import Sentence, split_sentences
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage

_SHARED: dict[tuple[str, str, str], tuple[Any, Any, threading.Lock]] = {}
_SHARED_LOCK = threading.Lock()


@dataclass
class Window:
    """One encoder input: `input_ids[offset + i]` is passage token `lo + i`, for i < hi - lo."""

    input_ids: list[int]
    token_type_ids: list[int]
    lo: int
    hi: int
    offset: int


@dataclass
class PassageScores:
    """What the model said about one passage (ranking None when it has no tokens)."""

    passage: Passage
    ranking: float | None
    sentences: list[Sentence]
    sentence_scores: np.ndarray
    token_probs: np.ndarray
    windows: list[tuple[int, int]] = field(default_factory=list)


class ProvenceCompressor(Compressor):
    """Keep the sentences Provence marks as needed; rerank passages by its ranking score.

    `threshold` in [0, 1] sets how much is kept (0 keeps every sentence, 1 none); the amount adapts
    to each passage and may be nothing (the result is then `empty`). `rerank` orders passages by the
    ranking logit (best first); `top_k` keeps at most that many passages, best ranked. `window` is
    the encoder input length in tokens (default: the model's, at most 512); `stride` is how many
    passage tokens consecutive windows share (default a quarter of the room). `always_select_title`
    keeps a passage's first sentence whenever another of its sentences is kept (published option).
    `min_sentences` is a floor on recall: when fewer sentences than that pass the threshold over all
    passages, the best-scoring others are added (0, the default, is the published adaptive rule that
    may keep nothing); `max_sentences` caps the total, keeping the best-scoring ones.
    `model` is "provence-minilm" (default: a MiniLM pruner trained here, shipped in the package),
    a folder or hub id (our format or the published layout, e.g. "naver/provence-reranker-debertav3-v1")
    or a `ProvenceModel`, then
    with `encoder_tokenizer`. `tokenizer` names the token counter for the result's statistics.
    """

    name = "provence"

    def __init__(
        self,
        model: Any = "provence-minilm",
        threshold: float = 0.1,
        rerank: bool = True,
        top_k: int | None = None,
        always_select_title: bool = False,
        min_sentences: int = 0,
        max_sentences: int | None = None,
        window: int | None = None,
        stride: int | None = None,
        batch_size: int = 16,
        device: str | None = None,
        dtype: Any = None,
        encoder_tokenizer: Any = None,
        tokenizer: str | TokenCounter | None = None,
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        threshold = check_fraction("threshold", threshold)
        check_int("top_k", top_k, 0)
        check_int("min_sentences", min_sentences, 0, allow_none=False)
        check_int("max_sentences", max_sentences, 1)
        if max_sentences is not None and min_sentences > max_sentences:
            raise ValueError(f"min_sentences ({min_sentences}) is above max_sentences ({max_sentences})")
        check_int("window", window, 8)
        check_int("stride", stride, 0)
        check_int("batch_size", batch_size, 1, allow_none=False)
        self.model = model if isinstance(model, str) else type(model).__name__
        self.threshold = float(threshold)
        self.rerank = rerank
        self.top_k = top_k
        self.always_select_title = always_select_title
        self.min_sentences = min_sentences
        self.max_sentences = max_sentences
        self.window = window
        self.stride = stride
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self._model_obj = None if isinstance(model, str) else model
        self._encoder_tokenizer = encoder_tokenizer
        self._lock = threading.Lock()

    # -- model -----------------------------------------------------------------------------
    def _load(self) -> tuple[Any, Any, threading.Lock]:
        """The model, its tokenizer and the lock that guards the model (shared per model/device/dtype)."""
        if self._model_obj is not None:
            if self._encoder_tokenizer is None:
                raise ValueError("a ProvenceModel object needs encoder_tokenizer= (a tokenizer or its path)")
            net, lock = self._model_obj, self._lock
        else:
            from ragcomp.compressors.provence_model import ProvenceModel, resolve_folder

            device = self.device or default_device()
            dtype = resolve_dtype(self.dtype, device)
            key = (self.model, device, str(dtype))
            with _SHARED_LOCK:
                if key not in _SHARED:
                    folder = resolve_folder(self.model)
                    net = ProvenceModel.from_pretrained(folder, device=device, dtype=dtype)
                    _SHARED[key] = (net, _tokenizer(str(folder), net), threading.Lock())
                net, folder_tok, lock = _SHARED[key]
            if self._encoder_tokenizer is None:
                return net, folder_tok, lock
        if isinstance(self._encoder_tokenizer, str):
            self._encoder_tokenizer = _tokenizer(self._encoder_tokenizer, net)
        return net, self._encoder_tokenizer, lock

    def _window_size(self, net: Any, tok: Any) -> int:
        if self.window is not None:
            return self.window
        limits = [512, getattr(net.backbone_config, "max_position_embeddings", 512) or 512]
        if 0 < (getattr(tok, "model_max_length", 0) or 0) < 100_000:
            limits.append(int(tok.model_max_length))
        return min(limits)

    # -- encoding ----------------------------------------------------------------------------
    def encode_windows(
        self, query_ids: list[int], passage_ids: list[int], tok: Any, size: int
    ) -> list[Window]:
        """`[CLS] query [SEP] passage[lo:hi] [SEP]` windows of at most `size` tokens covering the passage."""
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        if cls_id is None or sep_id is None:
            raise ValueError("the encoder's tokenizer needs [CLS] and [SEP] (input: [CLS] q [SEP] p [SEP])")
        q = query_ids[: size // 2]  # a long query never leaves the passage less than half the window
        head = [cls_id, *q, sep_id]
        room = size - len(head) - 1
        overlap = room // 4 if self.stride is None else min(self.stride, room - 1)
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

    def _forward(self, net: Any, lock: threading.Lock, pad_id: int, windows: list[Window]) -> tuple[
            list[float], list[np.ndarray]]:
        torch = require("torch", "models")
        device = next(net.parameters()).device
        ranks: list[float] = [0.0] * len(windows)
        probs: list[np.ndarray] = [np.zeros(0, np.float32)] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))  # less padding
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(windows[i].input_ids) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            types = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                w = windows[i]
                ids[row, : len(w.input_ids)] = torch.tensor(w.input_ids)
                types[row, : len(w.input_ids)] = torch.tensor(w.token_type_ids)
                mask[row, : len(w.input_ids)] = 1
            with lock, torch.inference_mode():
                training = net.training  # a model lent during training: no dropout here, mode restored
                if training:  # .eval() walks every submodule (~10 ms for DeBERTa-large): only when needed
                    net.eval()
                try:
                    out = net(ids.to(device), attention_mask=mask.to(device), token_type_ids=types.to(device))
                finally:
                    if training:
                        net.train(True)
                keep = net.keep_probs(out.token_logits).cpu().numpy()
                rank = out.ranking_logits.float().cpu().numpy()
            for row, i in enumerate(chunk):
                w = windows[i]
                ranks[i] = float(rank[row])
                probs[i] = keep[row, w.offset : w.offset + w.hi - w.lo]
        return ranks, probs

    # -- scoring -------------------------------------------------------------------------------
    def score_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[PassageScores]]:
        """Ranking score, sentences, sentence scores and token keep probabilities of every passage."""
        net, tok, lock = self._load()
        if not getattr(tok, "is_fast", False):
            raise ValueError("the encoder's tokenizer must be a fast tokenizer (it needs character offsets)")
        size = self._window_size(net, tok)
        flat = [(qi, p) for qi, ps in enumerate(passages_per_query) for p in ps]
        with lock:  # fast tokenizers are not safe to share across threads either
            q_ids = tok(list(queries), add_special_tokens=False, verbose=False)["input_ids"]
            enc = tok([p.text for _, p in flat], add_special_tokens=False, return_offsets_mapping=True,
                      verbose=False) if flat else {"input_ids": [], "offset_mapping": []}
        windows: list[Window] = []
        owner: list[int] = []
        for j, (qi, _) in enumerate(flat):
            ws = self.encode_windows(q_ids[qi], enc["input_ids"][j], tok, size)
            windows.extend(ws)
            owner.extend([j] * len(ws))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ranks, probs = self._forward(net, lock, pad_id, windows) if windows else ([], [])
        sums = [np.zeros(len(enc["input_ids"][j]), np.float64) for j in range(len(flat))]
        counts = [np.zeros(len(enc["input_ids"][j]), np.float64) for j in range(len(flat))]
        best: list[float | None] = [None] * len(flat)
        spans: list[list[tuple[int, int]]] = [[] for _ in flat]
        for w, j, r, pr in zip(windows, owner, ranks, probs, strict=True):
            sums[j][w.lo : w.hi] += pr
            counts[j][w.lo : w.hi] += 1
            best[j] = r if best[j] is None else max(best[j], r)  # type: ignore[type-var]
            spans[j].append((w.lo, w.hi))
        out: list[list[PassageScores]] = [[] for _ in queries]
        for j, (qi, p) in enumerate(flat):
            token_probs = (sums[j] / np.maximum(counts[j], 1)).astype(np.float32)
            sents = split_sentences(p.text)
            sent_scores = _sentence_means(sents, enc["offset_mapping"][j], token_probs)
            out[qi].append(PassageScores(p, best[j], sents, sent_scores, token_probs, spans[j]))
        return out

    def score(self, query: str, passages: list[PassageLike]) -> list[PassageScores]:
        return self.score_batch([query], [as_passages(passages)])[0]

    # -- selection ------------------------------------------------------------------------------
    def _compress_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[Compressed]]:
        return [self._select(s) for s in self.score_batch(queries, passages_per_query)]

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        return self._compress_batch([query], [passages])[0]

    def _select(self, scored: list[PassageScores]) -> list[Compressed]:
        by_rank = sorted(range(len(scored)), key=lambda i: -math.inf if scored[i].ranking is None
                         else scored[i].ranking, reverse=True)  # stable: ties keep the input order
        allowed = set(by_rank if self.top_k is None else by_rank[: self.top_k])
        allowed = {i for i in allowed if scored[i].ranking is not None}
        keeps = {i: self._keep_mask(scored[i]) for i in allowed}
        self._apply_counts(scored, keeps)
        items = []
        for i in by_rank if self.rerank else range(len(scored)):
            s = scored[i]
            keep = keeps.get(i)
            if keep is None or not keep.any():
                items.append(Compressed.dropped(s.passage, s.ranking))
                continue
            kept = [sent for sent, k in zip(s.sentences, keep, strict=True) if k]
            text = self.span_separator.join(sent.text for sent in kept)  # type: ignore[union-attr]
            items.append(Compressed(s.passage, text, [(x.start, x.end) for x in kept], s.ranking, True))
        return items

    def _keep_mask(self, s: PassageScores) -> np.ndarray:
        keep = s.sentence_scores > self.threshold
        if self.threshold == 0.0:
            keep[:] = True  # 0 keeps everything, even a probability that underflowed to 0
        if self.always_select_title and keep[1:].any():
            keep[0] = True
        return keep

    def _apply_counts(self, scored: list[PassageScores], keeps: dict[int, np.ndarray]) -> None:
        """Enforce min_sentences / max_sentences over all passages, by sentence score (in place)."""
        kept = sum(int(k.sum()) for k in keeps.values())
        if kept < self.min_sentences:
            # Best-scoring sentences not yet kept, ties broken by the passage's ranking score.
            spare = sorted(((scored[i].sentence_scores[j], scored[i].ranking, i, j)
                            for i, k in keeps.items() for j in np.flatnonzero(~k)), reverse=True)
            for *_, i, j in spare[: self.min_sentences - kept]:
                keeps[i][j] = True
        elif self.max_sentences is not None and kept > self.max_sentences:
            ranked = sorted(((scored[i].sentence_scores[j], scored[i].ranking, i, j)
                             for i, k in keeps.items() for j in np.flatnonzero(k)), reverse=True)
            for *_, i, j in ranked[self.max_sentences:]:
                keeps[i][j] = False


def _tokenizer(name_or_path: str, net: Any) -> Any:
    # Passing the backbone's config keeps AutoTokenizer from reading config.json: the published one
    # has an auto_map to remote code, which would prompt for trust_remote_code.
    transformers = require("transformers", "models")
    return transformers.AutoTokenizer.from_pretrained(name_or_path, config=net.backbone_config,
                                                      trust_remote_code=False)


def _sentence_means(sents: list[Sentence], offsets: list[tuple[int, int]], probs: np.ndarray) -> np.ndarray:
    """Mean keep probability of each sentence's tokens (a token belongs to the sentence holding its
    last character, so a leading space in a token's offsets does not move it to the previous one)."""
    starts = [s.start for s in sents]
    total = np.zeros(len(sents), np.float64)
    count = np.zeros(len(sents), np.float64)
    for (a, b), pr in zip(offsets, probs, strict=True):
        if b <= a:
            continue
        k = bisect.bisect_right(starts, b - 1) - 1
        if k >= 0 and b - 1 < sents[k].end:
            total[k] += pr
            count[k] += 1
    # A sentence with no token of its own (rare: characters the tokenizer drops) gets the passage mean.
    fallback = float(probs.mean()) if len(probs) else 0.0
    return np.where(count > 0, total / np.maximum(count, 1), fallback).astype(np.float32)
