"""Readers: the LLM that answers a question from a (compressed) context.

`load_reader("none" | "smollm2-135m" | "openai:MODEL", base_url=...)` gives an object with
`answer(question, context) -> str | None` and `tokenizer` (the token-counter name that
matches the reader, so compression is measured in the reader's own tokens). All readers
share one short-answer prompt, so answers are comparable across readers.
"""

from __future__ import annotations

from ragcomp.llm.base import (
    NO_CONTEXT_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    NoReader,
    Reader,
    clean_answer,
    system_prompt,
    user_prompt,
)


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
