"""A local causal LM as reader: greedy decoding with the shared short-answer prompt."""

from __future__ import annotations

from typing import Any

from ragcomp.llm.base import Reader, clean_answer, system_prompt, user_prompt
from ragcomp.models import CausalLM, load_causal_lm


class LocalReader(Reader):
    """Answers with a local chat model (default SmolLM2-135M-Instruct, offline).

    The context is cut (at a token boundary) when prompt plus answer would exceed the
    model's context window, so a long uncompressed context degrades instead of crashing.
    An xrag `EmbeddingContext` is read as one placeholder token per document whose input
    embedding is the document's projected embedding (generation through `inputs_embeds`).
    """

    accepts_embeddings = True

    def __init__(
        self,
        model: str | CausalLM = "smollm2-135m",
        device: str | None = None,
        tokenizer: str | None = None,
        max_new_tokens: int = 32,
        dtype: Any = None,
    ) -> None:
        self.lm = model if isinstance(model, CausalLM) else load_causal_lm(model, device=device, dtype=dtype)
        self.name = self.lm.name
        # The model's own tokenizer by default: compression is measured in the tokens it reads.
        self.tokenizer = tokenizer or self.lm.name
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.truncated = 0  # how many prompts had their context cut to fit

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer": self.tokenizer, "device": str(self.lm.device),
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}

    def prompt_ids(self, question: str, context: str | None) -> list[int]:
        ids = self.lm.chat_ids(user_prompt(question, context), system=system_prompt(context))
        room = self.lm.max_context - self.max_new_tokens
        if len(ids) <= room or not context:
            return ids
        self.truncated += 1
        tok = self.lm.tokenizer
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        keep = max(len(ctx_ids) - (len(ids) - room), 0)
        cut = tok.decode(ctx_ids[:keep], skip_special_tokens=True)
        return self.lm.chat_ids(user_prompt(question, cut), system=system_prompt(cut))

    def generate_raw(self, question: str, context: str | None) -> str:
        return self.lm.generate(self.prompt_ids(question, context), max_new_tokens=self.max_new_tokens,
                                stop_at_line=True)

    def answer(self, question: str, context: str | None) -> str:
        if _has_embeddings(context):
            return self.answer_batch([(question, context)])[0] or ""
        return clean_answer(self.generate_raw(question, context))

    def answer_batch(self, items: list[tuple[str, str | None]]) -> list[str | None]:
        """One left-padded greedy batch (same answers as one at a time, up to float rounding)."""
        xrag = [i for i, (_, c) in enumerate(items) if _has_embeddings(c)]
        text = [i for i in range(len(items)) if i not in set(xrag)]
        out: list[str | None] = [None] * len(items)
        if text:
            prompts = [self.prompt_ids(*items[i]) for i in text]
            texts = self.lm.generate_batch(prompts, max_new_tokens=self.max_new_tokens, stop_at_line=True)
            for i, t in zip(text, texts, strict=True):
                out[i] = clean_answer(t)
        if xrag:
            # Through the context object: it knows how a model reads it, so no reader imports a compressor.
            pairs: list[Any] = [items[i] for i in xrag]
            texts = pairs[0][1].generate_batch(self.lm, pairs, self.max_new_tokens, stop_at_line=True)
            for i, t in zip(xrag, texts, strict=True):
                out[i] = clean_answer(t)
        return out


def _has_embeddings(context: str | None) -> bool:
    # An xrag context with at least one document; with none it is plain (empty) text.
    return getattr(context, "n_docs", 0) > 0
