"""ragcomp for LlamaIndex: a local causal LM as a LlamaIndex LLM (offline SmolLM2 by default).

    from ragcomp.integrations.llama_index import LocalLLM
    engine = index.as_query_engine(llm=LocalLLM(max_new_tokens=64))

Re-exported by `ragcomp.integrations.llama_index`; needs `pip install 'ragcomp[llama-index]'`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from ragcomp._optional import require

require("llama_index.core", "llama-index")  # fail here, with the install hint, not deep inside

from llama_index.core.base.llms.types import (  # noqa: E402
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback  # noqa: E402
from llama_index.core.llms.custom import CustomLLM  # noqa: E402

__all__ = ["LocalLLM"]


# LlamaIndex roles that chat templates of open models do not know, mapped to ones they do.
_ROLES = {"developer": "system", "chatbot": "assistant", "model": "assistant", "function": "tool"}

class LocalLLM(CustomLLM):
    """A local causal LM (offline SmolLM2-135M-Instruct by default) as a LlamaIndex LLM.

    Greedy decoding, `max_new_tokens` new tokens at most. Prompts go through the model's chat
    template (it is an instruct model), so it reports itself as a chat model and query engines
    send it their chat QA prompt. Safe to call from several threads: the model carries a lock.
    """

    model_name: str = Field(default="smollm2-135m", description="LM alias, hub id or local path.")
    max_new_tokens: int = Field(default=256, gt=0, description="Most new tokens per answer.")
    device: str | None = Field(default=None, description="torch device; None picks cuda when present.")
    dtype: str | None = Field(default=None, description="fp32, bf16 or fp16; None picks per device.")
    context_window: int | None = Field(
        default=None, description="Tokens the model may see; None reads it from the model config."
    )

    _lm: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "RagcompLocalLLM"

    @property
    def lm(self) -> Any:
        """The loaded ragcomp CausalLM (loaded on first use, shared in the process)."""
        with self._lock:
            if self._lm is None:
                from ragcomp.models import load_causal_lm

                self._lm = load_causal_lm(self.model_name, self.device, self.dtype)
            return self._lm

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self.lm.max_context,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=self.model_name,
        )

    # -- prompt ids ----------------------------------------------------------------
    def _ids(self, messages: Sequence[ChatMessage], max_new_tokens: int) -> list[int]:
        lm = self.lm
        turns = [
            {"role": _ROLES.get(m.role.value, m.role.value), "content": m.content or ""} for m in messages
        ]
        with lm.lock:  # fast tokenizers are not safe to share across threads
            ids = lm.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        window = self.metadata.context_window
        if len(ids) + max_new_tokens > window:
            raise ValueError(
                f"prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"context window of {self.model_name} ({window} tokens): compress or shorten the context"
            )
        return ids

    def _completion_messages(self, prompt: str) -> list[ChatMessage]:
        user = ChatMessage(role=MessageRole.USER, content=prompt)
        if self.system_prompt:
            return [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt), user]
        return [user]

    def _generate(self, messages: Sequence[ChatMessage], **kwargs: Any) -> str:
        n = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        return self.lm.generate(self._ids(messages, n), max_new_tokens=n)

    def _stream(self, messages: Sequence[ChatMessage], **kwargs: Any) -> Generator[str, None, None]:
        """Yield new text pieces as the model produces them (generation runs in a worker thread)."""
        transformers = require("transformers", "models")
        torch = require("torch", "models")
        n = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        lm = self.lm
        ids = self._ids(messages, n)
        streamer = transformers.TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()  # set when the consumer walks away, so the model lock is freed soon

        class _StopWhenAsked(transformers.StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        failure: list[BaseException] = []

        def run() -> None:
            try:
                with lm.lock, torch.inference_mode():
                    x = torch.tensor([ids], device=lm.device)
                    lm.model.generate(
                        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                        pad_token_id=lm.tokenizer.eos_token_id, streamer=streamer,
                        stopping_criteria=transformers.StoppingCriteriaList([_StopWhenAsked()]),
                    )
            except BaseException as e:  # surfaced in the consumer's thread below
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True, name="ragcomp-llm-stream")
        worker.start()
        started = False
        try:
            for piece in streamer:
                if not started:  # match complete(), which strips leading whitespace
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    yield piece
        finally:
            stop.set()
            worker.join()
        if failure:
            raise failure[0]

    # -- LlamaIndex LLM interface ----------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._generate(self._completion_messages(prompt), **kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        messages = self._completion_messages(prompt)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in self._stream(messages, **kwargs):
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text = self._generate(messages, **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            text = ""
            for piece in self._stream(messages, **kwargs):
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)

        return gen()

    # Async: run generation in a worker thread so the event loop stays free.
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text = await asyncio.to_thread(self._generate, self._completion_messages(prompt), **kwargs)
        return CompletionResponse(text=text)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text = await asyncio.to_thread(self._generate, list(messages), **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        messages = self._completion_messages(prompt)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for piece in _aiter_thread(self._stream(messages, **kwargs)):
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        msgs = list(messages)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for piece in _aiter_thread(self._stream(msgs, **kwargs)):
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)

        return gen()


async def _aiter_thread(gen: Generator[str, None, None]) -> AsyncGenerator[str, None]:
    """Drain a blocking generator from a worker thread, one item at a time."""
    done = object()
    try:
        while True:
            item = await asyncio.to_thread(next, gen, done)
            if item is done:
                return
            yield item  # type: ignore[misc]
    finally:
        await asyncio.to_thread(gen.close)
