"""What a KV-cached answer returns: the text and what it cost, per call."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

TIERS = ("gpu", "cpu", "store")


def _zero_tiers() -> dict[str, int]:
    return dict.fromkeys(TIERS, 0)


@dataclass
class KVStats:
    """Per-call accounting.

    hits: chunks (prefix included) served by each tier; misses: chunks encoded in this call.
    bytes_loaded: bytes of KV read from each tier. seconds_*: wall time of each stage;
    ttft: from the call's start to the first generated token.
    """

    hits: dict[str, int] = field(default_factory=_zero_tiers)
    misses: int = 0
    bytes_loaded: dict[str, int] = field(default_factory=_zero_tiers)
    seconds_prepare: float = 0.0
    seconds_load: float = 0.0
    seconds_compute_misses: float = 0.0
    seconds_rotate: float = 0.0
    seconds_repair: float = 0.0
    seconds_prefill_question: float = 0.0
    seconds_decode: float = 0.0
    ttft: float = 0.0
    context_tokens: int = 0
    question_tokens: int = 0
    new_tokens: int = 0
    repaired_tokens: int = 0
    store_errors: int = 0
    corrupt_entries: int = 0
    # reuse="exact" (ragcomp.kv.chain): blocks (prefix included) and tokens loaded as they are vs
    # prefilled (the question counts as prefilled tokens); chain_breaks: a block missing or
    # corrupt before later cached ones, so everything from it on was recomputed.
    blocks_loaded: int = 0
    tokens_loaded: int = 0
    blocks_prefilled: int = 0
    tokens_prefilled: int = 0
    chain_breaks: int = 0

    @property
    def chunks(self) -> int:
        return sum(self.hits.values()) + self.misses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KVAnswer:
    """A generated answer, its token ids, the prompt it was generated from, and its stats."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: KVStats

    def __str__(self) -> str:
        return self.text
