"""Provence: prune each passage to the sentences an encoder marks as needed, and rerank the
passages by the same encoder's score, in one pass over (query, passage).

The model and the published checkpoint's layout are in `model.py`. Here: the input
`[CLS] query [SEP] passage [SEP]`; passages longer than the window are read in overlapping windows
(keep probabilities averaged where windows overlap, ranking score = best window); token decisions
rounded to whole sentences (a sentence is kept when the mean keep probability of its tokens is
above `threshold`, the published rule, default 0.1); kept sentences returned verbatim with spans.

Not confirmed from the published code (assumptions): whether its `process()` normalises the
question (the candle port lower-cases it and strips punctuation; we pass it unchanged) and how it
splits contexts longer than 512 tokens (we use token windows with overlap, described above).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.accel.graphed import profile_range, to_host
from ragcomp.base import Compressor, PassageLike, as_passages, run_while_waiting
from ragcomp.compressors._common import check_fraction, check_int
from ragcomp.compressors.provence.config import ProvenceRuntime
from ragcomp.compressors.provence.inputs import (
    PassageCache,
    PassageWork,
    Window,
    WindowFold,
    add_offsets,
    batch_inputs,
    encode_ids,
    encode_texts,
    launch_groups,
    passage_windows,
    prepare_passages,
    token_sentences,
)
from ragcomp.compressors.selection import SentenceSelection, kept_items
from ragcomp.models import default_device, resolve_dtype
from ragcomp.text import Sentence, split_sentences
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage

_SHARED: dict[tuple[str, str, str], tuple[Any, Any, threading.Lock]] = {}
_SHARED_LOCK = threading.Lock()


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
    ranking logit (best first); `top_k` keeps at most that many passages, best ranked.
    `always_select_title` keeps a passage's first sentence whenever another of its sentences is kept
    (published option). `min_sentences` is a floor on recall: when fewer sentences than that pass the
    threshold over all passages, the best-scoring others are added (0, the default, is the published
    adaptive rule that may keep nothing); `max_sentences` caps the total, keeping the best-scoring ones.
    `model` is "provence-minilm" (default: a MiniLM pruner trained here, shipped in the package),
    a folder or hub id (our format or the published layout, e.g. "naver/provence-reranker-debertav3-v1")
    or a `ProvenceModel`, then with `encoder_tokenizer`. `tokenizer` names the token counter for the
    result's statistics.
    How it runs (`device`, `dtype`, `batch_size`, `window`, `stride`, `fast_encoder`, `cuda_graphs`,
    `graph_width_multiple`, `passage_cache`) is declared by `ProvenceRuntime` (config.py, which says
    what each does): pass `runtime=`, the same settings as keywords, or both (a keyword away from its
    default overrides that field of `runtime`). `runtime` gives the settings in effect.
    `prepare(corpus)` fills the passage cache ahead of questions.
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
        fast_encoder: bool | str = True,
        cuda_graphs: bool = True,
        passage_cache: int = 1024,
        graph_width_multiple: int = 16,
        runtime: ProvenceRuntime | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, separator)
        threshold = check_fraction("threshold", threshold)  # required here: None is not "no threshold"
        check_int("top_k", top_k, 0)  # passages, not sentences: Provence's own rule, before selection
        run = ProvenceRuntime.of(runtime).overridden(  # checks the runtime settings
            device=device, dtype=dtype, batch_size=batch_size, window=window, stride=stride,
            fast_encoder=fast_encoder, cuda_graphs=cuda_graphs, graph_width_multiple=graph_width_multiple,
            passage_cache=passage_cache)
        self.model = model if isinstance(model, str) else type(model).__name__
        self.threshold = float(threshold)
        self.rerank = rerank
        self.top_k = top_k
        self.always_select_title = always_select_title
        self.min_sentences = min_sentences
        self.max_sentences = max_sentences
        self.selection  # noqa: B018 - checks threshold, min/max_sentences now, not at the first call
        # Plain attributes, as before: the scoring path reads them on every call.
        self.window = run.window
        self.stride = run.stride
        self.batch_size = run.batch_size
        self.device = run.device
        self.dtype = run.dtype
        self._model_obj = None if isinstance(model, str) else model
        self._encoder_tokenizer = encoder_tokenizer
        self.fast_encoder = run.fast_encoder
        self.cuda_graphs = run.cuda_graphs
        self.graph_width_multiple = run.graph_width_multiple
        self.passage_cache = PassageCache(run.passage_cache)
        self._spent: Any = None  # see score_batch
        self._lock = threading.Lock()

    @property
    def runtime(self) -> ProvenceRuntime:
        """The runtime settings in effect (e.g. to build another compressor that runs the same way)."""
        return ProvenceRuntime(device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                               window=self.window, stride=self.stride, fast_encoder=self.fast_encoder,
                               cuda_graphs=self.cuda_graphs, graph_width_multiple=self.graph_width_multiple,
                               passage_cache=self.passage_cache.size)

    # -- model -----------------------------------------------------------------------------
    def load(self) -> tuple[Any, Any, threading.Lock]:
        """The model, its tokenizer and the lock that guards the model (loaded on first use, shared per
        model/device/dtype)."""
        # Here, not at the top: the model module needs torch, this one imports without it.
        from ragcomp.compressors.provence.model import ProvenceModel, encoder_tokenizer_for, resolve_folder

        if self._model_obj is not None:
            if self._encoder_tokenizer is None:
                raise ValueError("a ProvenceModel object needs encoder_tokenizer= (a tokenizer or its path)")
            net, lock = self._model_obj, self._lock
        else:
            device = self.device or default_device()
            dtype = resolve_dtype(self.dtype, device)
            key = (self.model, device, str(dtype))
            with _SHARED_LOCK:
                if key not in _SHARED:
                    folder = resolve_folder(self.model)
                    net = ProvenceModel.from_pretrained(folder, device=device, dtype=dtype)
                    _SHARED[key] = (net, encoder_tokenizer_for(str(folder), net), threading.Lock())
                net, folder_tok, lock = _SHARED[key]
            if self._encoder_tokenizer is None:
                return net, folder_tok, lock
        if isinstance(self._encoder_tokenizer, str):
            self._encoder_tokenizer = encoder_tokenizer_for(self._encoder_tokenizer, net)
        return net, self._encoder_tokenizer, lock

    def window_size(self, net: Any, tok: Any) -> int:
        """The encoder input length in tokens: `window`, else the model's and tokenizer's, at most 512."""
        if self.window is not None:
            return self.window
        limits = [512, getattr(net.backbone_config, "max_position_embeddings", 512) or 512]
        if 0 < (getattr(tok, "model_max_length", 0) or 0) < 100_000:
            limits.append(int(tok.model_max_length))
        return min(limits)

    # -- encoding ----------------------------------------------------------------------------
    def encode_windows(
        self, query_ids: list[int], passage_ids: list[int], tok: Any, size: int,
        specials: tuple[int | None, int | None] | None = None,
    ) -> list[Window]:
        """`[CLS] query [SEP] passage[lo:hi] [SEP]` windows of at most `size` tokens covering the passage
        (`specials`: the tokenizer's [CLS] and [SEP] ids when the caller read them already)."""
        # Read once per call by score_batch: each HF `*_token_id` read converts the token again.
        cls_id, sep_id = specials if specials is not None else (tok.cls_token_id, tok.sep_token_id)
        return passage_windows(query_ids, passage_ids, size, self.stride, cls_id, sep_id)

    def _launch(self, net: Any, lock: threading.Lock, pad_id: int, windows: list[Window]) -> Callable[
            [], tuple[list[float], list[np.ndarray]]]:
        """Start the forward of every window; the returned function waits and gives (rankings, keep
        probabilities per window). On CUDA the GPU runs while the caller does other CPU work."""
        torch = require("torch", "models")
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))  # less padding
        on_cuda = next(net.parameters()).device.type == "cuda"
        batches = []
        with lock, torch.inference_mode():
            training = net.training  # a model lent during training: no dropout here, mode restored
            if training:  # .eval() walks every submodule (~10 ms for DeBERTa-large): only when needed
                net.eval()
            try:
                run = net.runner(self.fast_encoder, self.cuda_graphs, pad_id, self.batch_size,
                                 self.graph_width_multiple)
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    with profile_range("provence.batch_arrays"):
                        inputs = batch_inputs([windows[i] for i in chunk], pad_id, 8 if on_cuda else 1)
                    with profile_range("provence.forward"):
                        keep, rank = run(*(torch.from_numpy(x) for x in inputs))
                    with profile_range("provence.d2h"):
                        batches.append((chunk, to_host(keep), to_host(rank)))
            finally:
                if training:
                    net.train(True)
            done = torch.cuda.Event() if on_cuda else None
            if done is not None:
                done.record()

        def collect() -> tuple[list[float], list[np.ndarray]]:
            if done is not None:
                done.synchronize()
            ranks: list[float] = [0.0] * len(windows)
            probs: list[np.ndarray] = [np.zeros(0, np.float32)] * len(windows)
            for chunk, keep, rank in batches:
                keep_np, rank_np = keep.numpy(), rank.numpy()
                for row, i in enumerate(chunk):
                    w = windows[i]
                    ranks[i] = float(rank_np[row])
                    probs[i] = keep_np[row, w.offset : w.offset + w.hi - w.lo]
            return ranks, probs

        return collect

    # -- scoring -------------------------------------------------------------------------------
    def score_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[PassageScores]]:
        """Ranking score, sentences, sentence scores and token keep probabilities of every passage.

        Passages go in launch groups of at most `batch_size` (balanced; one question's passages may
        span groups): each group is tokenised (one call: its questions not seen yet and its new
        passages) and launched before the next one is tokenised, so the GPU starts after a fraction
        of the tokenising, and the CPU work of later groups and the sentences run while it computes.
        On CUDA the launch waits for token ids only; the character offsets that map tokens to
        sentences come from a second tokenizer pass while the GPU runs."""
        net, tok, lock = self.load()
        if not getattr(tok, "is_fast", False):
            raise ValueError("the encoder's tokenizer must be a fast tokenizer (it needs character offsets)")
        size = self.window_size(net, tok)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        flat = [(qi, p) for qi, ps in enumerate(passages_per_query) for p in ps]
        work: list[PassageWork | None] = [self.passage_cache.get(tok, p.text) for _, p in flat]
        fresh: dict[int, tuple[list[int], Any]] = {}  # flat index -> (ids, offsets or None) tokenised now
        q_ids: dict[int, list[int]] = {}
        defer_offsets = self._defers_offsets(net)
        specials = (tok.cls_token_id, tok.sep_token_id)
        windows: list[Window] = []
        owner: list[int] = []
        collects: list[Callable[[], tuple[list[float], list[np.ndarray]]]] = []
        for js in launch_groups(len(flat), self.batch_size):
            new = [j for j in js if work[j] is None]
            new_qs = sorted({flat[j][0] for j in js} - q_ids.keys())
            with profile_range("provence.tokenize"), lock:  # fast tokenizers are not thread-safe either
                texts = [queries[qi] for qi in new_qs] + [flat[j][1].text for j in new]
                if defer_offsets:
                    ids, offsets = encode_ids(tok, texts), [None] * len(texts)
                else:
                    ids, offsets = encode_texts(tok, texts)
            q_ids.update(zip(new_qs, ids, strict=False))
            fresh.update((j, (ids[len(new_qs) + n], offsets[len(new_qs) + n])) for n, j in enumerate(new))
            with profile_range("provence.windows"):
                group_windows: list[Window] = []
                for j in js:
                    p_ids = fresh[j][0] if j in fresh else work[j].ids  # type: ignore[union-attr]
                    ws = self.encode_windows(q_ids[flat[j][0]], p_ids, tok, size, specials)
                    group_windows.extend(ws)
                    owner.extend([j] * len(ws))
            if group_windows:
                collects.append(self._launch(net, lock, pad_id, group_windows))
            windows.extend(group_windows)
        # CPU work while the GPU runs: sentences of the new passages, and which sentence each token is in.
        with profile_range("provence.sentences"):
            if defer_offsets and fresh:
                add_offsets(tok, lock, [p.text for _, p in flat], fresh)
            for j, (p_ids, offs) in fresh.items():
                sents = split_sentences(flat[j][1].text)
                work[j] = PassageWork(p_ids, sents, token_sentences(sents, offs))
                self.passage_cache.put(tok, flat[j][1].text, work[j])  # type: ignore[arg-type]
            fresh.clear()  # frees the offsets (thousands of small tuples, ~0.3 ms) before the wait, not after
        with profile_range("provence.fold_plan"):
            fold = WindowFold(work, windows, owner)  # type: ignore[arg-type]
        if defer_offsets:
            run_while_waiting()  # the caller's input token count, while the GPU computes
            self._spent = None  # the last call's per-passage objects, freed while the GPU computes
        ranks: list[float] = []
        probs: list[np.ndarray] = []
        with profile_range("provence.wait"):
            for collect in collects:
                r, pr = collect()
                ranks += r
                probs += pr
        with profile_range("provence.sentence_means"):
            best, token_probs, sentence_scores = fold.apply(ranks, probs)
            out: list[list[PassageScores]] = [[] for _ in queries]
            for j, (qi, p) in enumerate(flat):
                pw = work[j]
                # A copy of the cached list: callers may edit what they get.
                out[qi].append(PassageScores(p, best[j], list(pw.sentences),  # type: ignore[union-attr]
                                             sentence_scores[j], token_probs[j], fold.spans[j]))
            if defer_offsets:  # freeing thousands of small objects takes ~0.2 ms: not after the GPU
                self._spent = (work, windows, collects, fold, probs)
            return out

    @staticmethod
    def _defers_offsets(net: Any) -> bool:
        """Whether the launch waits for ids only: where the forward runs asynchronously (CUDA), so
        the offsets pass overlaps it; elsewhere one pass gives both."""
        return next(net.parameters()).device.type == "cuda"

    def prepare(self, passages: Iterable[PassageLike], batch_size: int = 256) -> int:
        """Tokenise and split into sentences, before any question, passages that questions will
        bring (a corpus): their CPU work then comes from `passage_cache` (on an H100, 12.5 ms p50
        instead of 14-15.6 for 20 passages with a DeBERTa-v3-large shape). Returns how many distinct
        texts were prepared; more than `passage_cache` holds is an error, not a silent partial."""
        # A lone str or Passage goes to as_passages as it is, which names the mistake.
        items = passages if isinstance(passages, (str, Passage)) else list(passages)
        texts = list(dict.fromkeys(p.text for p in as_passages(items)))
        if len(texts) > self.passage_cache.size:
            raise ValueError(f"{len(texts)} distinct passages do not fit passage_cache="
                             f"{self.passage_cache.size}; build the compressor with a larger passage_cache")
        check_int("batch_size", batch_size, 1, allow_none=False)
        _, tok, lock = self.load()
        prepare_passages(self.passage_cache, tok, lock, texts, batch_size)
        return len(texts)

    def score(self, query: str, passages: list[PassageLike]) -> list[PassageScores]:
        return self.score_batch([query], [as_passages(passages)])[0]

    # -- selection ------------------------------------------------------------------------------
    def _compress_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[Compressed]]:
        scored = self.score_batch(queries, passages_per_query)
        with profile_range("provence.select"):
            return [self._select(s) for s in scored]

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        return self._compress_batch([query], [passages])[0]

    @property
    def selection(self) -> SentenceSelection:
        """The shared sentence selector: Provence's strict `score > threshold` (0 keeps every
        sentence), then the min/max sentence counts over all passages, ties to the better-ranked."""
        key = (self.threshold, self.min_sentences, self.max_sentences)
        cached = self.__dict__.get("_selection_cache")
        if cached is None or cached[0] != key:  # built and checked once per setting, not per call
            cached = (key, SentenceSelection(threshold=key[0], inclusive=False, min_sentences=key[1],
                                             max_sentences=key[2]))
            self._selection_cache = cached
        return cached[1]

    def _select(self, scored: list[PassageScores]) -> list[Compressed]:
        by_rank = sorted(range(len(scored)), key=lambda i: -math.inf if scored[i].ranking is None
                         else scored[i].ranking, reverse=True)  # stable: ties keep the input order
        allowed = set(by_rank if self.top_k is None else by_rank[: self.top_k])
        eligible_passages = [i in allowed and s.ranking is not None for i, s in enumerate(scored)]
        selection = self.selection
        eligible = [self._keep_mask(selection, s) if ok else None
                    for s, ok in zip(scored, eligible_passages, strict=True)]
        scores = [s.sentence_scores for s in scored]
        rankings = [s.ranking for s in scored]
        masks = selection.select(scores, tie_break=rankings, eligible_passages=eligible_passages,
                                 eligible=eligible)
        return kept_items([s.passage for s in scored], [s.sentences for s in scored], masks, rankings,
                          self.span_separator,  # type: ignore[arg-type]
                          order=by_rank if self.rerank else None)

    def _keep_mask(self, selection: SentenceSelection, s: PassageScores) -> np.ndarray:
        keep = selection.passes(s.sentence_scores)
        if self.always_select_title and keep[1:].any():
            keep[0] = True
        return keep

