"""Declared configuration of a `KVCache`, in groups: `PromptConfig` (how prompts are laid out in
token ids) and `TierConfig` (the GPU/CPU tiers and how the store is read). `KVCache` also takes
each field as a keyword of its own, as it always did; `with_options` folds those in.

    KVCache("smollm2-135m", "disk:/tmp/kv",
            prompt_config=PromptConfig(system_prompt="Be terse.", max_chunk_tokens=256),
            tier_config=TierConfig(cpu_bytes=2**30))
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

DEFAULT_SYSTEM = "You are a helpful assistant. Answer the question using the documents."
DEFAULT_INSTRUCTION = "Documents:\n\n"
DEFAULT_QUESTION = "Question: {question}\nAnswer briefly."


@dataclass(frozen=True)
class PromptConfig:
    """The prompt around the documents (see `ragcomp.kv.cache_prompt.PromptLayout`).

    system_prompt and instruction form the shared prefix (inside the model's chat template, if
    it has one); doc_template formats each passage ({text}, {id}, {title}); question_template
    the question ({question}). Passages longer than max_chunk_tokens become several chunks.
    """

    system_prompt: str = DEFAULT_SYSTEM
    instruction: str = DEFAULT_INSTRUCTION
    doc_template: str = "{text}\n\n"
    question_template: str = DEFAULT_QUESTION
    max_chunk_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens must be >= 1, got {self.max_chunk_tokens}")


@dataclass(frozen=True)
class TierConfig:
    """Where chunk KV is kept in front of the store (see `ragcomp.kv.tiers.TieredKV`).

    gpu_bytes, cpu_bytes: bounds of the two LRU tiers (the GPU tier exists on CUDA only).
    io_threads: threads reading the store. retry_after: seconds an unreachable store is
    skipped. verify: check each stored entry's checksum on read.
    """

    gpu_bytes: int = 4 * 2**30
    cpu_bytes: int = 8 * 2**30
    io_threads: int = 4
    retry_after: float = 5.0
    verify: bool = True


C = TypeVar("C", PromptConfig, TierConfig)


def with_options(config: C, options: dict[str, Any]) -> C:
    """`config` with the fields named in `options` replaced by their values; those keys are
    removed from `options`, so what is left there is no field of this config."""
    own = [f.name for f in fields(config) if f.name in options]
    return replace(config, **{name: options.pop(name) for name in own}) if own else config
