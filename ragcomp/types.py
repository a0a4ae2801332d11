"""Framework-neutral types that every step, store and integration shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Passage:
    """What a retriever returns: one piece of text with its id, score and metadata."""

    id: str
    text: str
    score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Passage.text must be str, got {type(self.text).__name__}")
        self.id = str(self.id)


@dataclass
class Compressed:
    """One passage after a step.

    `spans` are (start, end) character offsets into `passage.text` of what was kept, in
    order; `text` is what goes to the LLM for this passage (for extractive methods, the
    kept spans joined). Abstractive steps may keep text that has no spans.
    """

    passage: Passage
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    score: float | None = None
    kept: bool = True

    @classmethod
    def whole(cls, passage: Passage, score: float | None = None) -> Compressed:
        """The passage kept unchanged (its full text as one span)."""
        span = [(0, len(passage.text))] if passage.text else []
        return cls(passage, passage.text, span, passage.score if score is None else score, True)

    @classmethod
    def dropped(cls, passage: Passage, score: float | None = None) -> Compressed:
        return cls(passage, "", [], score, False)


@dataclass
class StepStats:
    """What one step did: tokens before/after (with the tokenizer named) and wall time."""

    name: str
    tokens_in: int
    tokens_out: int
    seconds: float
    tokenizer: str


@dataclass
class CompressionResult:
    """The output of a compressor or a pipeline.

    `empty` is the selective-augmentation signal: the step judged that nothing retrieved
    helps the query. It is not an error; the caller may answer without context.
    """

    items: list[Compressed]
    context: str
    empty: bool = False
    tokens_in: int = 0
    tokens_out: int = 0
    tokenizer: str = "whitespace"
    steps: list[StepStats] = field(default_factory=list)

    @property
    def kept(self) -> list[Compressed]:
        return [c for c in self.items if c.kept]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def ratio(self) -> float:
        """tokens_in / tokens_out (inf when everything was dropped)."""
        return self.tokens_in / self.tokens_out if self.tokens_out else float("inf")

    def passages(self) -> list[Passage]:
        """Kept items as new Passages (text rewritten, metadata copied) for the next step."""
        out = []
        for c in self.kept:
            meta = dict(c.passage.metadata)
            out.append(Passage(c.passage.id, c.text, c.score, meta))
        return out
