"""Token-level pruning by a causal LM's self-information (LLMLingua / Selective-Context family),
conditioned on the question (LongLLMLingua).

What is implemented:

- Every passage token gets a score from the LM, in batched forward passes (passages longer than
  the window are read in windows whose first quarter is context carried over from the previous
  window, scored once each). `condition` picks the score:
  - `"none"`: self-information -log p(token | preceding passage text) (Selective-Context,
    LLMLingua's token level);
  - `"question"` (default): -log p(token | question, preceding text): the same, read after the
    question, so words the question already gives away (its own terms) score lower;
  - `"contrastive"`: LongLLMLingua's contrastive perplexity, -log p(token | preceding) minus
    -log p(token | question, preceding): how much the question raises the token's probability
    (two forward passes per passage).
- Tokens are summed into whole words (a run of non-space characters; each CJK ideograph or kana
  is a word of its own), mapped through the tokenizer's character offsets, so what is kept is
  made of exact substrings of the passage and `spans` point into it. A space token belongs to the
  word that follows it.
- Words are kept best score first, across all passages of the query, until the target is met:
  `rate` (kept tokens / input tokens) or `target_tokens`, counted with the step's named tokenizer
  on the final context, separators included. The bound is exact: the kept prefix of the ranking is
  found by binary search on the real count. `keep_digits` / `keep_entities` force-keep words with
  a digit / capitalised words not at a sentence start (and numbers); they are kept even when they
  alone exceed the target (the only case where the target is not met).
- Kept words come back in document order; adjacent kept words form one span (with the original
  whitespace between them), spans are joined by a space. Not implemented: LongLLMLingua's coarse
  passage ranking, dynamic per-passage rates and iterative (segment-by-segment) compression.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

import numpy as np

from ragcomp._optional import require
from ragcomp.base import Compressor
from ragcomp.compressors._common import check_choice, check_fraction, check_int
from ragcomp.models import CausalLM, load_causal_lm
from ragcomp.text import split_sentences
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage

CONDITIONS = ("none", "question", "contrastive")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_MODES = {"none": ("self",), "question": ("question",), "contrastive": ("self", "question")}
_QUESTION_PREFIX = "Question: {}\nPassage:\n"
Offset = tuple[int, int]
_HEAD_ROWS = 512  # positions per output-projection chunk: bounds the [rows, vocab] logits memory


@dataclass(frozen=True)
class Word:
    start: int
    end: int
    score: float
    forced: bool


@dataclass
class _Row:
    """One forward input: `prefix + context + scored`; scores go to passage tokens [lo, lo+len(scored))."""

    passage: int
    mode: str  # "self" or "question"
    ids: list[int]
    n_scored: int
    lo: int


class LinguaCompressor(Compressor):
    """Drop the words a causal LM finds least informative (given the question) to a token target.

    - `model`: alias (`smollm2-135m`), hub id, local path of any causal LM, or a loaded `CausalLM`.
    - `rate` in (0, 1]: keep at most this share of the input tokens (default 0.5); or
      `target_tokens` >= 0: at most this many tokens (give one or the other).
    - `condition`: "none", "question" or "contrastive" (see the module doc).
    - `keep_digits`, `keep_entities`: force-keep numbers / capitalised words inside sentences.
    - `max_length`: window in tokens, question prefix included (default min(model window, 1024)).
    - `batch_size`, `batch_tokens`: rows and padded tokens per forward pass.
    - `tokenizer`: the counter the target is honoured in (default whitespace words; eval passes
      the reader's tokenizer).
    """

    name = "lingua"

    def __init__(
        self,
        model: str | CausalLM | None = None,
        rate: float | None = None,
        target_tokens: int | None = None,
        condition: str = "question",
        keep_digits: bool = False,
        keep_entities: bool = False,
        max_length: int | None = None,
        batch_size: int = 16,
        batch_tokens: int = 8192,
        device: str | None = None,
        dtype: str | None = None,
        tokenizer: str | TokenCounter | None = None,
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        if rate is not None and target_tokens is not None:
            raise ValueError("give either rate or target_tokens, not both")
        # rate 0.5 unless a token target is given instead
        self.rate = None if target_tokens is not None else \
            check_fraction("rate", 0.5 if rate is None else rate, low_open=True)
        self.target_tokens = check_int("target_tokens", target_tokens, 0)
        self.condition = check_choice("condition", condition, CONDITIONS)
        self.max_length = check_int("max_length", max_length, 32)
        self.batch_size = check_int("batch_size", batch_size, 1, allow_none=False)
        self.batch_tokens = check_int("batch_tokens", batch_tokens, 64, allow_none=False)
        self.keep_digits = bool(keep_digits)
        self.keep_entities = bool(keep_entities)
        self.model = model.name if isinstance(model, CausalLM) else model
        self.device = device
        self.dtype = dtype
        self._lm = model if isinstance(model, CausalLM) else None
        self._load_lock = threading.Lock()

    @property
    def lm(self) -> CausalLM:
        with self._load_lock:
            if self._lm is None:
                self._lm = load_causal_lm(self.model or "smollm2-135m", self.device, self.dtype)
            return self._lm

    @property
    def limit(self) -> int:
        return self.max_length or min(self.lm.max_context, 1024)

    # -- scores ---------------------------------------------------------------------------
    def token_scores(self, query: str, passages: list[Passage]) -> list[tuple[np.ndarray, list[Offset]]]:
        """Per passage: the score of each of its tokens (see `condition`) and their character offsets."""
        tok = self.lm.tokenizer
        with self.lm.lock:  # a fast tokenizer must not be shared across threads
            encoded = [tok(p.text, add_special_tokens=False, return_offsets_mapping=True) for p in passages]
        ids = [list(e["input_ids"]) for e in encoded]
        offsets = [[tuple(o) for o in e["offset_mapping"]] for e in encoded]
        modes = _MODES[self.condition]
        with self.lm.lock:
            prefixes = {m: self._prefix(query if m == "question" else None) for m in modes}
        rows = [r for m in modes for pi, p_ids in enumerate(ids)
                for r in self._rows(pi, m, prefixes[m], p_ids)]
        per_mode = {m: [np.zeros(len(x), np.float32) for x in ids] for m in modes}
        for row, values in zip(rows, self._surprisal(rows), strict=True):
            per_mode[row.mode][row.passage][row.lo : row.lo + row.n_scored] = values
        if self.condition == "contrastive":
            scores = [a - b for a, b in zip(per_mode["self"], per_mode["question"], strict=True)]
        else:
            scores = per_mode[modes[0]]
        return list(zip(scores, offsets, strict=True))

    def _prefix(self, query: str | None) -> list[int]:
        """Ids every row starts with: a start token, then the question when conditioning on it."""
        tok = self.lm.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        head = [start] if start is not None else []
        if query is None:
            return head or list(tok.encode("\n", add_special_tokens=False))
        q_ids = list(tok.encode(query, add_special_tokens=False))[: self.limit // 4]  # a huge query: its head
        before, after = _QUESTION_PREFIX.split("{}")
        return head + list(tok.encode(before, add_special_tokens=False)) + q_ids + \
            list(tok.encode(after, add_special_tokens=False))

    def _rows(self, passage: int, mode: str, prefix: list[int], ids: list[int]) -> list[_Row]:
        room = self.limit - len(prefix)
        if room < 8:
            raise ValueError(f"max_length={self.limit} leaves no room for a passage after the question")
        carry = room // 4  # tokens of context a window repeats from the one before (not scored again)
        step = room - carry
        rows = []
        for lo in range(0, len(ids), step):
            ctx = ids[max(0, lo - carry) : lo]
            scored = ids[lo : lo + step]
            rows.append(_Row(passage, mode, prefix + ctx + scored, len(scored), lo))
        return rows

    def _surprisal(self, rows: list[_Row]) -> list[np.ndarray]:
        """-log p of each row's scored tokens, rows batched by length (right padding)."""
        torch = require("torch", "models")
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        batches, cur = [], []
        for i in order:
            width = len(rows[i].ids)  # sorted: the last row is the widest
            if cur and (len(cur) >= self.batch_size or (len(cur) + 1) * width > self.batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        lm = self.lm
        with lm.lock, torch.inference_mode():
            model = lm.model
            pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
            for batch in batches:
                width = max(len(rows[i].ids) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, i in enumerate(batch):
                    ids[b, : len(rows[i].ids)] = torch.tensor(rows[i].ids)
                    mask[b, : len(rows[i].ids)] = 1
                hidden = model.get_decoder()(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                             use_cache=False).last_hidden_state
                # Position t predicts token t+1: gather only the positions before scored tokens.
                pick_b, pick_t, targets, sizes = [], [], [], []
                for b, i in enumerate(batch):
                    r = rows[i]
                    first = len(r.ids) - r.n_scored
                    pick_b += [b] * r.n_scored
                    pick_t += range(first - 1, len(r.ids) - 1)
                    targets += r.ids[first:]
                    sizes.append(r.n_scored)
                states = hidden[torch.tensor(pick_b), torch.tensor(pick_t)]
                tgt = torch.tensor(targets, device=states.device)
                values = []
                for a in range(0, len(targets), _HEAD_ROWS):
                    logits = model.get_output_embeddings()(states[a : a + _HEAD_ROWS]).float()
                    logp = torch.log_softmax(logits, dim=-1)
                    values.append(-logp.gather(1, tgt[a : a + _HEAD_ROWS, None])[:, 0])
                flat = torch.cat(values).cpu().numpy() if values else np.zeros(0, np.float32)
                for i, part in zip(batch, np.split(flat, np.cumsum(sizes)[:-1]), strict=True):
                    out[i] = part.astype(np.float32)
        return out

    # -- words and selection ---------------------------------------------------------------
    def words(self, query: str, passages: list[Passage]) -> list[list[Word]]:
        """Every word of every passage with its score (sum over its tokens) and forced flag."""
        out = []
        for p, (scores, offsets) in zip(passages, self.token_scores(query, passages), strict=True):
            out.append(self._words_of(p.text, scores, offsets))
        return out

    def _words_of(self, text: str, scores: np.ndarray, offsets: list[Offset]) -> list[Word]:
        spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        if not spans:
            return []
        starts = np.array([a for a, _ in spans])
        total = np.zeros(len(spans), np.float64)
        for s, (a, b) in zip(scores, offsets, strict=True):
            # The word holding the token's first non-space character; a pure-space token goes
            # to the word right after it ("1889" is tokenized as " ", "1", "8", ...).
            pos = a
            while pos < b and text[pos].isspace():
                pos += 1
            j = int(np.searchsorted(starts, pos, side="right")) - 1
            if j >= 0 and spans[j][0] <= pos < spans[j][1]:
                total[j] += float(s)
        sentence_starts = {s.start for s in split_sentences(text)}
        return [Word(a, b, float(total[j]), self._forced(text, a, b, sentence_starts))
                for j, (a, b) in enumerate(spans)]

    def _forced(self, text: str, a: int, b: int, sentence_starts: set[int]) -> bool:
        word = text[a:b]
        has_digit = any(c.isdigit() for c in word)
        if (self.keep_digits or self.keep_entities) and has_digit:
            return True
        if self.keep_entities and a not in sentence_starts:
            first = next((c for c in word if c.isalpha()), "")
            return first.isupper()
        return False

    def target(self, passages: list[Passage]) -> int:
        """The token target for this query's passages, in the step's tokenizer."""
        if self.target_tokens is not None:
            return self.target_tokens
        tokens_in = self.counter.count(self.separator.join(p.text for p in passages))
        return math.floor(tokens_in * (self.rate or 1.0) + 1e-9)

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        live = [i for i, p in enumerate(passages) if p.text.strip()]
        words: list[list[Word]] = [[] for _ in passages]
        if live:
            for i, ws in zip(live, self.words(query, [passages[i] for i in live]), strict=True):
                words[i] = ws
        budget = self.target(passages)
        flat = [(pi, wi) for pi, ws in enumerate(words) for wi in range(len(ws))]
        # Forced words first, then best score first (ties: document order).
        ranking = sorted(flat, key=lambda k: (not words[k[0]][k[1]].forced, -words[k[0]][k[1]].score))
        n_forced = sum(words[pi][wi].forced for pi, wi in flat)

        def build(k: int) -> list[Compressed]:
            chosen = set(ranking[: max(k, n_forced)])
            return [self._item(p, ws, {wi for pj, wi in chosen if pj == pi})
                    for pi, (p, ws) in enumerate(zip(passages, words, strict=True))]

        def fits(items: list[Compressed]) -> bool:
            context = self.build_context(items)
            return (self.counter.count(context) if context else 0) <= budget

        # Largest prefix of the ranking whose real count fits (counts grow with k, bar rare merges).
        lo, hi = n_forced, len(ranking)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(build(mid)):
                lo = mid
            else:
                hi = mid - 1
        items = build(lo)
        while lo > n_forced and not fits(items):  # a non-monotone count: step down until it fits
            lo -= 1
            items = build(lo)
        return items

    def _item(self, p: Passage, words: list[Word], keep: set[int]) -> Compressed:
        score = float(np.mean([w.score for w in words])) if words else None
        if not keep:
            return Compressed.dropped(p, score)
        spans: list[tuple[int, int]] = []
        prev = -2
        for wi in sorted(keep):
            if wi == prev + 1:  # neighbours in the passage: one span, original whitespace kept
                spans[-1] = (spans[-1][0], words[wi].end)
            else:
                spans.append((words[wi].start, words[wi].end))
            prev = wi
        text = " ".join(p.text[a:b] for a, b in spans)
        return Compressed(p, text, spans, score, True)
