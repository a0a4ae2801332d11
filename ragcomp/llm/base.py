"""The readers' shared part: the short-answer prompt, answer cleaning, `Reader` and `NoReader`.

A leaf of `ragcomp.llm`: the reader modules (`local`, `openai`) import it, and the package's
`load_reader` imports them, so nothing imports back.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

SYSTEM_PROMPT = (
    "Answer the question using the context. Reply with only the short answer "
    "(a name, number, date or short phrase), not a sentence."
)
NO_CONTEXT_SYSTEM_PROMPT = (
    "Answer the question. Reply with only the short answer "
    "(a name, number, date or short phrase), not a sentence."
)


def user_prompt(question: str, context: str | None) -> str:
    """The user turn: context first (when there is any), then the question and the format."""
    if context and context.strip():
        return (
            f"Context:\n{context.strip()}\n\nQuestion: {question.strip()}\n"
            "Answer with a few words only, taken from the context."
        )
    return f"Question: {question.strip()}\nAnswer with a few words only."


def system_prompt(context: str | None) -> str:
    return SYSTEM_PROMPT if context and context.strip() else NO_CONTEXT_SYSTEM_PROMPT


_LEADS = re.compile(
    r"^(?:the\s+)?(?:short\s+|final\s+)?answer(?:\s+is\b|\s*[:\-])\s*[:\-]?\s*", re.IGNORECASE
)


def clean_answer(text: str | None) -> str:
    """Reduce a generation to the answer: first non-empty line, no 'Answer:' lead, no quotes,
    no trailing period (small models often wrap the answer in a sentence or a label)."""
    if not text:
        return ""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    prev = None
    while prev != line:  # small models may repeat the label ("The answer is: The answer is: ...")
        prev, line = line, _LEADS.sub("", line).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`*":
        line = line[1:-1].strip()
    line = line.strip("*").strip()
    # One trailing period, unless it ends an abbreviation or initial ("Washington D.C.").
    if line.endswith(".") and not re.search(r"(?:\b[A-Za-z]\.)+$", line):
        line = line[:-1].rstrip()
    return line


class Reader(ABC):
    """Answers a question from a context; `tokenizer` names the counter for its tokens."""

    name: str = "reader"
    tokenizer: str = "cl100k"

    @abstractmethod
    def answer(self, question: str, context: str | None) -> str | None:
        """The short answer (cleaned), or None for a reader that does not generate."""

    def answer_batch(self, items: list[tuple[str, str | None]]) -> list[str | None]:
        """Answers for several (question, context) pairs; readers that can batch override it."""
        return [self.answer(q, c) for q, c in items]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer": self.tokenizer}

    def check(self) -> None:  # noqa: B027 - optional hook
        """Fail fast before a long run when the reader cannot work (e.g. unreachable server)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class NoReader(Reader):
    """Measure context only: no generation, no EM/F1. Tokens counted with cl100k by default."""

    name = "none"

    def __init__(self, tokenizer: str | None = None) -> None:
        self.tokenizer = tokenizer or "cl100k"

    def answer(self, question: str, context: str | None) -> None:
        return None
