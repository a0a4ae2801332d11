"""The one compressor interface, the pipeline that chains steps, and the token budget step."""

from __future__ import annotations

import asyncio
import contextvars
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ragcomp.text import split_sentences
from ragcomp.tokens import TokenCounter, counter_from
from ragcomp.types import Compressed, CompressionResult, Passage, StepStats

PassageLike = Passage | str


def as_passages(passages: Sequence[PassageLike] | None) -> list[Passage]:
    """Accept Passages or plain strings (ids become their position)."""
    if passages is None:
        return []
    if isinstance(passages, (str, Passage)):
        raise TypeError("passages must be a list of Passage or str, not a single item")
    out = []
    for i, p in enumerate(passages):
        if isinstance(p, Passage):
            out.append(p)
        elif isinstance(p, str):
            out.append(Passage(str(i), p))
        else:
            raise TypeError(f"passage {i} must be a Passage or str, got {type(p).__name__}")
    return out


class _Deferred:
    """A result computed at most once: now, or when first asked for."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn: Callable[[], Any] | None = fn
        self._value: Any = None

    def run(self) -> None:
        if self._fn is not None:
            self._value, self._fn = self._fn(), None

    def value(self) -> Any:
        self.run()
        return self._value


# Bookkeeping `compress_batch` needs only after the step (input token counts), which a step whose
# device computes asynchronously runs while it waits (`run_while_waiting`): off the critical path.
_PENDING: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar("ragcomp_pending", default=None)


def run_while_waiting() -> None:
    """Run the calling `compress_batch`'s pending bookkeeping now; steps call it while their GPU
    computes (a cl100k count of 20 passages is about 1 ms that would otherwise follow the wait)."""
    pending = _PENDING.get()
    if pending is not None:
        pending.run()


class Compressor(ABC):
    """A step on the data path: `compress(query, passages) -> CompressionResult`.

    Subclasses implement `_compress(query, passages) -> list[Compressed]`, one item per
    input passage (kept or not), in the order the step ranks them. The base class
    validates input, times the step, counts tokens with the named tokenizer and builds
    the context. Override `_compress_batch` when the method can batch across queries.
    """

    name: ClassVar[str] = "compressor"
    # How kept spans are joined inside one passage's text; None when the kept text is not
    # made of spans of the original (abstractive steps), so spans cannot be composed.
    span_separator: ClassVar[str | None] = " "

    def __init__(self, tokenizer: str | TokenCounter | None = None, separator: str = "\n\n") -> None:
        self.tokenizer = tokenizer
        self.separator = separator
        self._counter: TokenCounter | None = None

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = counter_from(self.tokenizer)
        return self._counter

    # -- to implement ---------------------------------------------------------------
    @abstractmethod
    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]: ...

    def _compress_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[Compressed]]:
        return [self._compress(q, ps) for q, ps in zip(queries, passages_per_query, strict=True)]

    # -- public API -------------------------------------------------------------------
    def compress(self, query: str, passages: Sequence[PassageLike]) -> CompressionResult:
        return self.compress_batch([query], [passages])[0]

    def compress_batch(
        self, queries: Sequence[str], passages_per_query: Sequence[Sequence[PassageLike]]
    ) -> list[CompressionResult]:
        if len(queries) != len(passages_per_query):
            raise ValueError(
                f"compress_batch got {len(queries)} queries but {len(passages_per_query)} passage lists"
            )
        queries = [_check_query(q) for q in queries]
        lists = [as_passages(ps) for ps in passages_per_query]
        counts_in = _Deferred(lambda: [self._count_input(ps) for ps in lists])
        t0 = time.perf_counter()
        todo = [i for i, ps in enumerate(lists) if ps]
        outputs: list[list[Compressed]] = [[] for _ in lists]
        if todo:
            token = _PENDING.set(counts_in)
            try:
                done = self._compress_batch([queries[i] for i in todo], [lists[i] for i in todo])
            finally:
                _PENDING.reset(token)
            for i, items in zip(todo, done, strict=True):
                outputs[i] = items
        per_query = (time.perf_counter() - t0) / max(len(lists), 1)
        return [self._result(ps, items, per_query, n_in)
                for ps, items, n_in in zip(lists, outputs, counts_in.value(), strict=True)]

    async def acompress(self, query: str, passages: Sequence[PassageLike]) -> CompressionResult:
        # Models are guarded by locks, so a worker thread keeps the event loop free.
        return await asyncio.to_thread(self.compress, query, passages)

    async def acompress_batch(
        self, queries: Sequence[str], passages_per_query: Sequence[Sequence[PassageLike]]
    ) -> list[CompressionResult]:
        return await asyncio.to_thread(self.compress_batch, queries, passages_per_query)

    def build_context(self, items: list[Compressed]) -> str:
        return self.separator.join(c.text for c in items if c.kept and c.text)

    def _count_input(self, passages: list[Passage]) -> int:
        return self.counter.count(self.separator.join(p.text for p in passages)) if passages else 0

    def _result(self, passages: list[Passage], items: list[Compressed], seconds: float,
                tokens_in: int) -> CompressionResult:
        counter = self.counter
        context = self.build_context(items)
        tokens_out = counter.count(context) if context else 0
        stats = StepStats(self.name, tokens_in, tokens_out, seconds, counter.name)
        empty = not any(c.kept for c in items)
        return CompressionResult(items, context, empty, tokens_in, tokens_out, counter.name, [stats])

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict[str, Any]:
        """Public settings, for repr, eval reports and framework serialisation."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and _plain(v)}


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, tuple, list))


def _check_query(q: Any) -> str:
    if not isinstance(q, str):
        raise TypeError(f"query must be str, got {type(q).__name__}")
    return q


class TokenBudget(Compressor):
    """Keep passages in their given order while they fit `max_tokens` of the named tokenizer.

    The passage that crosses the budget is cut at a sentence boundary (`truncate="sentences"`),
    at a token boundary (`"tokens"`), or dropped (`"none"`). The final context, separators
    included, is guaranteed to count at most `max_tokens`.
    """

    name = "budget"

    def __init__(
        self,
        max_tokens: int,
        tokenizer: str | TokenCounter | None = None,
        truncate: str = "sentences",
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        if truncate not in ("sentences", "tokens", "none"):
            raise ValueError(f"truncate must be 'sentences', 'tokens' or 'none', got {truncate!r}")
        self.max_tokens = max_tokens
        self.truncate = truncate

    def _fits(self, texts: list[str]) -> bool:
        return self.counter.count(self.separator.join(texts)) <= self.max_tokens

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        kept_texts: list[str] = []
        items: list[Compressed] = []
        full = False
        for p in passages:
            if full or not p.text.strip():
                items.append(Compressed.dropped(p, p.score))
                continue
            if self._fits([*kept_texts, p.text]):
                kept_texts.append(p.text)
                items.append(Compressed.whole(p))
                continue
            full = True
            cut = self._cut(p, kept_texts)
            if cut is not None:
                kept_texts.append(cut.text)
                items.append(cut)
            else:
                items.append(Compressed.dropped(p, p.score))
        return items

    def _cut(self, p: Passage, kept_texts: list[str]) -> Compressed | None:
        if self.truncate == "none":
            return None
        if self.truncate == "sentences":
            end = None
            for s in split_sentences(p.text):
                if not self._fits([*kept_texts, p.text[: s.end]]):
                    break
                end = s.end
            if end is None:
                return None
            return Compressed(p, p.text[:end], [(0, end)], p.score, True)
        # Token cut: shrink until the joined context fits (separators can merge tokens).
        room = self.max_tokens - self.counter.count(self.separator.join([*kept_texts, ""]))
        while room > 0:
            text = self.counter.truncate(p.text, room).rstrip()
            if text and self._fits([*kept_texts, text]):
                return Compressed(p, text, [(0, len(text))], p.score, True)
            room -= 1
        return None


class Pipeline(Compressor):
    """Chain steps: each step sees the kept text of the one before.

    Spans in the final result always point into the ORIGINAL passage text, and each
    result item carries the original Passage, so citations survive any number of steps.
    """

    name = "pipeline"

    def __init__(
        self,
        steps: Sequence[Compressor],
        tokenizer: str | TokenCounter | None = None,
        separator: str | None = None,
    ) -> None:
        if not steps:
            raise ValueError("Pipeline needs at least one step")
        last = steps[-1]
        super().__init__(tokenizer if tokenizer is not None else last.tokenizer,
                         separator if separator is not None else last.separator)
        self.steps = list(steps)

    def params(self) -> dict[str, Any]:
        return {"steps": [repr(s) for s in self.steps]}

    def compress_batch(
        self, queries: Sequence[str], passages_per_query: Sequence[Sequence[PassageLike]]
    ) -> list[CompressionResult]:
        if len(queries) != len(passages_per_query):
            raise ValueError(
                f"compress_batch got {len(queries)} queries but {len(passages_per_query)} passage lists"
            )
        originals = [as_passages(ps) for ps in passages_per_query]
        # For each query: current Passage object id -> (original passage, spans in original).
        origin: list[dict[int, tuple[Passage, list[tuple[int, int]] | None]]] = [
            {id(p): (p, [(0, len(p.text))]) for p in ps} for ps in originals
        ]
        current = originals
        step_stats: list[list[StepStats]] = [[] for _ in originals]
        results: list[CompressionResult] = []
        dropped: list[list[Compressed]] = [[] for _ in originals]
        for step in self.steps:
            results = step.compress_batch(queries, current)
            nxt = []
            for qi, res in enumerate(results):
                step_stats[qi].extend(res.steps)
                mapped = []
                new_origin: dict[int, tuple[Passage, list[tuple[int, int]] | None]] = {}
                for item in res.items:
                    orig, prev_spans = origin[qi][id(item.passage)]
                    sep = step.span_separator
                    spans = _compose_spans(prev_spans, item.spans, None if sep is None else len(sep))
                    if not item.kept:
                        dropped[qi].append(Compressed(orig, "", [], item.score, False))
                        continue
                    mapped.append(Passage(orig.id, item.text, item.score, dict(orig.metadata)))
                    new_origin[id(mapped[-1])] = (orig, spans)
                origin[qi] = new_origin
                nxt.append(mapped)
            current = nxt
        out = []
        counter = self.counter
        for qi, ps in enumerate(current):
            items = []
            for p in ps:
                orig, spans = origin[qi][id(p)]
                items.append(Compressed(orig, p.text, spans or [], p.score, True))
            items.extend(dropped[qi])
            context = self.build_context(items)
            tin = counter.count(self.separator.join(p.text for p in originals[qi]))
            tout = counter.count(context) if context else 0
            out.append(CompressionResult(items, context, not ps, tin, tout, counter.name, step_stats[qi]))
        return out

    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:  # pragma: no cover
        raise NotImplementedError("Pipeline overrides compress_batch")


def _compose_spans(
    prev: list[tuple[int, int]] | None, new: list[tuple[int, int]], sep_len: int | None
) -> list[tuple[int, int]] | None:
    """Map spans in an intermediate text back to the original.

    The intermediate text is the previous spans of the original joined with a separator of
    `sep_len` characters. None means the text is not a function of the original (abstractive).
    """
    if prev is None or sep_len is None:
        return None
    segments = []  # (start in intermediate, length, start in original)
    pos = 0
    for a, b in prev:
        segments.append((pos, b - a, a))
        pos += (b - a) + sep_len
    out = []
    for a, b in new:
        for seg_start, length, orig_start in segments:
            lo, hi = max(a, seg_start), min(b, seg_start + length)
            if lo < hi:
                out.append((orig_start + lo - seg_start, orig_start + hi - seg_start))
    return out
