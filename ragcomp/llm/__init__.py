"""Readers: the LLM that answers a question from a (compressed) context.

`load_reader("none" | "smollm2-135m" | "openai:MODEL", base_url=...)` gives an object with
`answer(question, context) -> str | None` and `tokenizer` (the token-counter name that
matches the reader, so compression is measured in the reader's own tokens). All readers
share one short-answer prompt, so answers are comparable across readers.
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


def load_reader(
    spec: str | Reader | None = "none",
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    device: str | None = None,
    tokenizer: str | None = None,
    max_new_tokens: int = 32,
    timeout: float = 60.0,
    max_retries: int = 4,
) -> Reader:
    """A reader by name: `none`, a local causal LM alias/path (`smollm2-135m`), or
    `openai:MODEL` for any OpenAI-compatible chat endpoint at `base_url`."""
    if isinstance(spec, Reader):
        return spec
    if spec is None or spec == "none":
        return NoReader(tokenizer)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reader must be 'none', a local model name or 'openai:MODEL', got {spec!r}")
    if spec.startswith("openai:"):
        from ragcomp.llm.openai import OpenAIReader

        model = spec[len("openai:") :]
        if not model:
            raise ValueError("reader 'openai:' needs a model name, e.g. openai:gpt-4o-mini")
        return OpenAIReader(
            model, base_url=base_url, api_key=api_key, tokenizer=tokenizer,
            max_tokens=max_new_tokens, timeout=timeout, max_retries=max_retries,
        )
    if base_url is not None:
        raise ValueError(f"base_url is only for 'openai:MODEL' readers, not {spec!r}")
    from ragcomp.llm.local import LocalReader

    return LocalReader(spec, device=device, tokenizer=tokenizer, max_new_tokens=max_new_tokens)


__all__ = [
    "NO_CONTEXT_SYSTEM_PROMPT",
    "SYSTEM_PROMPT",
    "NoReader",
    "Reader",
    "clean_answer",
    "load_reader",
    "system_prompt",
    "user_prompt",
]
