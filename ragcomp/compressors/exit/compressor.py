"""EXIT (Hwang et al., 2024): context-aware extractive compression.

A causal LM reads the query, the full passage and one of its sentences, and is asked "Is this
sentence useful in answering the query? Answer only "Yes" or "No"." The sentence's score is
P(Yes) after a softmax over the Yes/No next-token logits; sentences scoring at least
`threshold` are kept in document order. EXIT ships a LoRA adapter for Gemma-2B-it; here the
same prompt runs zero-shot on SmolLM2, or on any causal LM with an adapter loaded via peft.

Everything before the sentence (template, query, full context) is the same for every sentence
of a passage, so `method="batched"` encodes it once, keeps its KV cache, and scores all the
sentences in packed batches on top of it (fewest tokens: the CPU default).
`method="single_pass"` puts a question's prefixes and sentence rows in one block-masked
sequence and questions side by side in one padded batch: one forward per batch of questions
(fewest forwards: the CUDA default; see `batch.py`). `method="per_sentence"` runs one full
forward per sentence, as the published code does. All see exactly the same token ids: the prompt
is built by concatenating separately tokenized pieces, never by re-tokenizing a joined string.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.base import Compressor
from ragcomp.compressors._common import check_choice, check_int
from ragcomp.compressors.exit.batch import (
    additive_mask,
    batch_inputs,
    build_packs,
    concat_caches,
    custom_masks,
    group_packs,
    view_cache,
)
from ragcomp.compressors.exit.prompt import (
    PromptUnit,
    Template,
    build_template,
    load_with_adapter,
    prompt_units,
)
from ragcomp.compressors.selection import SentenceSelection, kept_items
from ragcomp.hf_cache import cache_arg, returned_cache
from ragcomp.models import CausalLM, load_causal_lm
from ragcomp.text import Sentence, split_sentences
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage

# Cap on queries x keys per packed forward. A custom mask makes attention dense: on CPU every
# masked-out key still costs FLOPs, so packs stay small (measured ~8% faster than 2M on qa_dev
# top-3); on GPU fewer, wider forwards win, bounded by the scores' memory per head.
_MAX_MASK = {"cpu": 300_000, "other": 4_000_000}
# single_pass: cap on batch x width^2 per forward (its mask covers prefixes and rows together).
_MAX_PACKED = {"cpu": 2_000_000, "other": 16_000_000}
METHODS = ("auto", "batched", "per_sentence", "single_pass")
# EXIT's threshold, for its trained classifier (used with an adapter and no threshold given).
TRAINED_THRESHOLD = 0.5
# Zero-shot default (no adapter, no threshold, no top_share): keep this share of a question's
# sentences, best P(Yes) first. Untrained P(Yes) is not calibrated (SmolLM2's median ~0.15: at
# 0.5 it kept nothing for 96.5% of qa_dev questions); its ranking is weak, so the default
# leans to recall. Picked on 30 qa_dev questions x top-10 (see the class docstring).
ZERO_SHOT_TOP_SHARE = 0.6
_Row = tuple[int, list[int]]  # (unit index, sentence ids + template tail)


@functools.lru_cache(maxsize=65536)
def _sentences(text: str) -> tuple[Sentence, ...]:
    return tuple(split_sentences(text))


class ExitCompressor(Compressor):
    """Keep the sentences a causal LM judges useful for the query, given the full passage.

    - `model`: alias (`smollm2-135m`), hub id, local path or a loaded `CausalLM`; with an
      `adapter` and no model, the adapter config's base model.
    - `adapter`: a PEFT LoRA adapter folder (EXIT's Gemma-2B adapter, for instance), merged
      into a private copy of the base model (needs `pip install peft`).
    - `threshold`: minimum P(Yes) to keep a sentence; 0 keeps every sentence, 1 keeps none.
      Given, it is honoured exactly. Left out: EXIT's 0.5 with an `adapter` (its trained
      classifier); zero-shot (no adapter), no threshold and the top-share rule below.
    - `top_share`: keep at most this share of the query's sentences (over all its passages,
      rounded up, at least one), best P(Yes) first; with a threshold, both must pass.
      Zero-shot default: with no adapter, no threshold and no top_share, the top
      `ZERO_SHOT_TOP_SHARE` (0.6) of sentences are kept, so the result is never empty. Why:
      untrained P(Yes) is not calibrated (SmolLM2-135M: median ~0.15; at 0.5 nothing was kept
      for 96.5% of qa_dev questions) and ranks sentences only a little better than chance
      (evidence kept ~ share of tokens kept, at every share). 0.6 is where evidence recall
      beat the share of tokens kept by the most (73% of evidence in 65% of the tokens, 1.5x
      compression), sweeping this one parameter (0.1 to 0.8) on the first 30 qa_dev
      questions x top-10 wiki passages. With a trained classifier, pass `threshold`.
    - `max_sentences`: keep at most this many sentences per query, best P(Yes) first.
    - `max_length`: prompt limit in tokens (default: min(model window, 4096)). A passage too
      long for one prompt is scored in windows of consecutive sentences; each window is the
      "full context" of its own sentences. A query is cut to its first max_length/4 tokens and
      a sentence, as the model sees it, too (its kept text stays whole).
    - `method`: "auto" ("single_pass" on CUDA, "batched" elsewhere), "batched" (shared-prefix
      KV cache, fewest tokens), "single_pass" (one block-masked forward per batch of queries,
      fewest forwards; `compress_batch` puts several queries in one forward) or
      "per_sentence" (one forward per sentence, the published way). Attention kernels without
      custom masks (flash attention) or sliding windows run "batched" in padded batches.
    - `batch_size`: sentence rows per forward of "batched" ("single_pass" is bounded by its
      mask size instead).

    A passage's score is its best sentence's P(Yes). When nothing passes, the result is
    `empty` (EXIT's selective augmentation).
    """

    name = "exit"

    def __init__(
        self,
        model: str | CausalLM | None = None,
        adapter: str | None = None,
        threshold: float | None = None,
        method: str = "auto",
        batch_size: int = 16,
        top_share: float | None = None,
        max_sentences: int | None = None,
        max_length: int | None = None,
        use_title: bool = True,
        device: str | None = None,
        dtype: str | None = None,
        tokenizer: str | TokenCounter | None = None,
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        # threshold, top_share and max_sentences are checked by the shared selector below.
        check_choice("method", method, METHODS)
        check_int("batch_size", batch_size, 1, allow_none=False)
        check_int("max_length", max_length, 64)
        if adapter is not None and isinstance(model, CausalLM):
            raise ValueError("pass a model name with `adapter`, not a loaded CausalLM (it would be modified)")
        self.model = model.name if isinstance(model, CausalLM) else model
        self.adapter = adapter
        zero_shot_default = threshold is None and top_share is None and adapter is None
        self.threshold = TRAINED_THRESHOLD if threshold is None and adapter is not None else threshold
        self.top_share = ZERO_SHOT_TOP_SHARE if zero_shot_default else top_share
        self.method = method
        self.batch_size = batch_size
        self.max_sentences = max_sentences
        self.selection  # noqa: B018 - checks the selection parameters now, not at the first call
        self.max_length = max_length
        self.use_title = use_title
        self.device = device
        self.dtype = dtype
        self._lm = model if isinstance(model, CausalLM) else None
        self._template: Template | None = None
        self._load_lock = threading.Lock()

    # -- model and prompt -------------------------------------------------------------
    @property
    def lm(self) -> CausalLM:
        with self._load_lock:
            if self._lm is None:
                if self.adapter is not None:
                    self._lm = load_with_adapter(self.model, self.adapter, self.device, self.dtype)
                else:
                    self._lm = load_causal_lm(self.model or "smollm2-135m", self.device, self.dtype)
            return self._lm

    @property
    def template(self) -> Template:
        if self._template is None:
            self._template = build_template(self.lm.tokenizer)
        return self._template

    @property
    def limit(self) -> int:
        return self.max_length or min(self.lm.max_context, 4096)

    def _ids(self, text: str) -> list[int]:
        return list(self.lm.tokenizer.encode(text, add_special_tokens=False))

    def units(self, query: str, passages: list[Passage]) -> tuple[list[PromptUnit], int]:
        """Prompt pieces per context window, and how many prefix tokens all units share."""
        return prompt_units(self.template, self.limit, self._ids, query, passages, _sentences, self.use_title)


    # -- scoring --------------------------------------------------------------------------
    def score(self, query: str, passages: list[Passage], method: str | None = None) -> list[np.ndarray]:
        """P(Yes) for every sentence of every passage (in `split_sentences` order)."""
        return self.score_batch([query], [passages], method)[0]

    def score_batch(self, queries: list[str], passages_per_query: list[list[Passage]],
                    method: str | None = None) -> list[list[np.ndarray]]:
        """`score` for several queries; "single_pass" runs them in shared forwards."""
        method = self.resolve_method(method or self.method)
        if any(not q.strip() for q in queries):
            raise ValueError("EXIT needs a non-empty query: it asks whether a sentence helps answer it")
        outs = [[np.zeros(len(_sentences(p.text)), np.float32) for p in ps] for ps in passages_per_query]
        questions = [self.units(q, ps) for q, ps in zip(queries, passages_per_query, strict=True)]
        if not any(units for units, _ in questions):
            return outs
        torch = require("torch", "models")
        with self.lm.lock, torch.inference_mode():
            if method == "single_pass":
                probs = self._single_pass(questions)
            elif method == "batched":
                probs = [self._batched(units, shared) if units else [] for units, shared in questions]
            else:
                probs = [[self._per_sentence(u) for u in units] for units, _ in questions]
        for out, (units, _), per_q in zip(outs, questions, probs, strict=True):
            for u, pr in zip(units, per_q, strict=True):
                out[u.passage][u.sentences] = pr
        return outs

    def resolve_method(self, method: str) -> str:
        """The scoring path "auto" (or a path the model's attention cannot take) stands for."""
        check_choice("method", method, METHODS)
        if method in ("auto", "single_pass") and not custom_masks(self.lm.model):
            return "batched"  # no custom 4D masks: batched falls back to padded batches
        if method == "auto":
            return "single_pass" if str(self.lm.device).startswith("cuda") else "batched"
        return method

    def _yes_prob(self, hidden: Any) -> np.ndarray:
        """P(Yes) from last-position hidden states [rows, dim], softmax over Yes/No only."""
        torch = require("torch", "models")
        t, model = self.template, self.lm.model
        logits = model.get_output_embeddings()(hidden)[:, [t.yes, t.no]].float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma-2 caps logits before sampling; the classifier was trained on those
            logits = torch.tanh(logits / cap) * cap
        return torch.softmax(logits, dim=-1)[:, 0].cpu().numpy()

    def _per_sentence(self, unit: PromptUnit) -> np.ndarray:
        """The published way: one full forward over the whole prompt per sentence."""
        torch = require("torch", "models")
        dec, dev = self.lm.model.get_decoder(), self.lm.device
        probs = []
        for row in unit.rows:
            ids = torch.tensor([unit.prefix + row], device=dev)
            hidden = dec(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
            probs.append(self._yes_prob(hidden)[0])
        return np.asarray(probs, np.float32)

    def _batched(self, units: list[PromptUnit], shared: int) -> list[np.ndarray]:
        """Encode the query part once, each unit's context once on top of it, then score the
        sentences of all units in packed batches over those caches."""
        torch = require("torch", "models")
        model = self.lm.model
        dec, dev = model.get_decoder(), self.lm.device
        base = dec(input_ids=torch.tensor([units[0].prefix[:shared]], device=dev), use_cache=True)
        caches = []
        for u in units:
            rest = torch.tensor([u.prefix[shared:]], device=dev)
            pos = torch.arange(shared, len(u.prefix), device=dev).unsqueeze(0)
            out = dec(input_ids=rest, position_ids=pos, use_cache=True,
                      **cache_arg(dec, view_cache(returned_cache(base), 1)))
            caches.append(returned_cache(out))
        if not custom_masks(model):
            # Kernels without custom masks (flash attention): padded batches, one unit at a time.
            return [self._padded(u, c) for u, c in zip(units, caches, strict=True)]
        rows = [(ui, r) for ui, u in enumerate(units) for r in u.rows]
        dtype, probs = next(model.parameters()).dtype, []
        for chunk in self._chunks(units, rows):
            owners = list(dict.fromkeys(ui for ui, _ in chunk))
            start, n_cache = {}, 0
            for ui in owners:
                start[ui], n_cache = n_cache, n_cache + len(units[ui].prefix)
            n_new = sum(len(r) for _, r in chunk)
            # All rows packed into one sequence: a row sees its own unit's prefix and its own
            # earlier tokens, nothing else; positions continue from its prefix. No padding.
            # Built as booleans in numpy: triu_ on bf16 slices of a CPU tensor cost ~15 ms a call.
            allowed = np.zeros((n_new, n_cache + n_new), dtype=bool)
            ids, pos, last, q = [], [], [], 0
            for ui, r in chunk:
                n_pre, a = len(units[ui].prefix), start[ui]
                allowed[q : q + len(r), a : a + n_pre] = True
                allowed[q : q + len(r), n_cache + q : n_cache + q + len(r)] = np.tri(len(r), dtype=bool)
                ids += r
                pos += range(n_pre, n_pre + len(r))
                q += len(r)
                last.append(q - 1)
            cache = concat_caches([caches[ui] for ui in owners])
            hidden = dec(input_ids=torch.tensor([ids], device=dev),
                         attention_mask=additive_mask(allowed[None], dtype, dev),
                         position_ids=torch.tensor([pos], device=dev), **cache_arg(dec, cache),
                         use_cache=True).last_hidden_state[0]
            probs.append(self._yes_prob(hidden[torch.tensor(last, device=hidden.device)]))
        flat = np.concatenate(probs).astype(np.float32)
        return np.split(flat, np.cumsum([len(u.rows) for u in units])[:-1])

    def _single_pass(self, questions: list[tuple[list[PromptUnit], int]]) -> list[list[np.ndarray]]:
        """Every question's prefixes and sentence rows in block-masked packs, packs side by
        side in padded batches: one forward per batch (see `batch.py`)."""
        torch = require("torch", "models")
        model = self.lm.model
        dec, dev = model.get_decoder(), self.lm.device
        dtype = next(model.parameters()).dtype
        budget = _MAX_PACKED["cpu" if str(dev).startswith("cpu") else "other"]
        probs = [[np.zeros(len(u.rows), np.float32) for u in units] for units, _ in questions]
        for group, width in group_packs(build_packs(questions, budget), budget):
            ids, pos, allowed = batch_inputs(group, width, self._pad_id())
            hidden = dec(input_ids=torch.from_numpy(ids).to(dev), position_ids=torch.from_numpy(pos).to(dev),
                         attention_mask=additive_mask(allowed, dtype, dev),
                         use_cache=False).last_hidden_state
            rows = torch.tensor([b for b, p in enumerate(group) for _ in p.last], device=hidden.device)
            cols = torch.tensor([i for p in group for i in p.last], device=hidden.device)
            owners = [o for p in group for o in p.owners]
            for (qi, ui, ri), pr in zip(owners, self._yes_prob(hidden[rows, cols]), strict=True):
                probs[qi][ui][ri] = pr
        return probs

    def _chunks(self, units: list[PromptUnit], rows: list[_Row]) -> list[list[_Row]]:
        """Rows in order, at most `batch_size` per forward and a bounded mask (queries x keys)."""
        budget = _MAX_MASK["cpu" if str(self.lm.device).startswith("cpu") else "other"]
        chunks: list[list[_Row]] = []
        cur: list[_Row] = []
        for ui, r in rows:
            cand = [*cur, (ui, r)]
            n_new = sum(len(x) for _, x in cand)
            n_keys = n_new + sum(len(units[u].prefix) for u in dict.fromkeys(u for u, _ in cand))
            if cur and (len(cand) > self.batch_size or n_new * n_keys > budget):
                chunks.append(cur)
                cand = [(ui, r)]
            cur = cand
        return [*chunks, cur] if cur else chunks

    def _padded(self, unit: PromptUnit, cache: Any) -> np.ndarray:
        """Right-padded rows over one unit's cache: a real token never attends to the pads after it."""
        torch = require("torch", "models")
        dec, dev, pad = self.lm.model.get_decoder(), self.lm.device, self._pad_id()
        n_pre, probs = len(unit.prefix), []
        for start in range(0, len(unit.rows), self.batch_size):
            rows = unit.rows[start : start + self.batch_size]
            n, width = len(rows), max(len(r) for r in rows)
            ids = torch.full((n, width), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
            pos = torch.arange(n_pre, n_pre + width).unsqueeze(0).expand(n, width)
            hidden = dec(input_ids=ids.to(dev), position_ids=pos.to(dev),
                         **cache_arg(dec, view_cache(cache, n)), use_cache=True).last_hidden_state
            last = torch.tensor([len(r) - 1 for r in rows], device=hidden.device)
            probs.append(self._yes_prob(hidden[torch.arange(n, device=hidden.device), last]))
        return np.concatenate(probs)

    def _pad_id(self) -> int:
        # Pads are never attended to, so any real id works; base models often lack a pad token.
        tok = self.lm.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # -- selection ------------------------------------------------------------------------
    def _compress_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[Compressed]]:
        scores = self.score_batch(queries, passages_per_query)
        return [self._select(ps, s) for ps, s in zip(passages_per_query, scores, strict=True)]

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        return self._compress_batch([query], [passages])[0]

    @property
    def selection(self) -> SentenceSelection:
        """The shared sentence selector: P(Yes) >= threshold (1 keeps nothing), at most
        `top_share` of the query's sentences (rounded up) and `max_sentences`, best first."""
        return SentenceSelection(threshold=self.threshold, top_share=self.top_share,
                                 max_sentences=self.max_sentences)

    def _select(self, passages: list[Passage], scores: list[np.ndarray]) -> list[Compressed]:
        masks = self.selection.select(scores)
        best = [float(s.max()) if len(s) else None for s in scores]
        sents = [_sentences(p.text) for p in passages]
        return kept_items(passages, sents, masks, best, self.span_separator)  # type: ignore[arg-type]
