"""Repair of cross-chunk attention after independently encoded chunks are assembled.

Each chunk was encoded after the shared prefix only, so its KV never saw the chunks before
it. A repair recomputes the KV of chosen context tokens at every layer, in one forward pass
that attends to the whole assembled cache (CacheBlend's partial recompute); the rest stays
as cached. What differs is which tokens are chosen:

- "first:N"     the first N tokens of every chunk after the first.
- "deviation:F" CacheBlend: layers 0-1 recomputed over the whole context; the share F of
                chunk tokens whose layer-1 keys moved most is recomputed.
- "attention:F" the share F of chunk tokens the question attends to most (its query vectors
                after the prefix against the cached keys, RoPE taken out of both, at three
                layers; helpers from `ragcomp.kv.pages_score`). Errors only matter where the
                question looks. Costs a question-length forward instead of two layers over
                the whole context.

Measured on SmolLM2-135M fp32, 12 qa_dev questions with top-10 passages (`ragcomp bench kv
--part quality`): first-answer-token KL from the full prefill 0.49 without repair, 0.12 with
"deviation:0.15", 0.09 with "attention:0.15"; greedy 32-token answers still diverge from the
full prefill's at 15% on this small model, so repair stays off by default.

A share of 1.0 recomputes every token after the first chunk: the result equals a full prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragcomp.hf_cache import cache_arg
from ragcomp.kv.codec import ChunkKV
from ragcomp.kv.engine_core import EngineCore
from ragcomp.kv.ops import Assembled, StopForward, stop_forward
from ragcomp.kv.pages_score import attention_token_mass, question_queries, unrotated

MODES = ("first", "deviation", "attention")


@dataclass
class Repair:
    """How to repair attention between independently encoded chunks (see the module doc).

    mode "first" uses `tokens`; "deviation" and "attention" use `share` (of the tokens
    after the first chunk, which is already exact).
    """

    mode: str
    tokens: int = 16
    share: float = 0.15

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"repair mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.tokens < 0 or not 0.0 <= self.share <= 1.0:
            raise ValueError("repair tokens must be >= 0 and share within [0, 1]")

    @classmethod
    def parse(cls, spec: str | Repair | None) -> Repair | None:
        """None, a Repair, or text: 'none', 'first:16', 'deviation:0.15', 'attention:0.15'."""
        if spec is None or isinstance(spec, Repair):
            return spec
        spec = spec.strip().lower()
        if spec in ("", "none", "off"):
            return None
        mode, _, arg = spec.partition(":")
        try:
            if mode == "first":
                return cls("first", tokens=int(arg or 16))
            if mode in ("deviation", "blend", "cacheblend"):
                return cls("deviation", share=float(arg or 0.15))
            if mode in ("attention", "question"):
                return cls("attention", share=float(arg or 0.15))
        except ValueError as e:
            if "repair" in str(e):
                raise
            raise ValueError(f"repair {spec!r}: {arg!r} is not a number") from e
        raise ValueError(f"unknown repair {spec!r}: use 'none', 'first:N', 'deviation:SHARE' "
                         "or 'attention:SHARE'")

    def __str__(self) -> str:
        return f"first:{self.tokens}" if self.mode == "first" else f"{self.mode}:{self.share:g}"


def candidates(asm: Assembled) -> list[int]:
    """Positions a repair may recompute: every chunk after the first (prefix + chunk 1 are exact)."""
    return [p for s, e in asm.spans[2:] for p in range(s, e)]


def select(engine: EngineCore, asm: Assembled, repair: Repair, question_ids: Sequence[int] | None = None
           ) -> list[int]:
    """Sorted positions to recompute for `repair`."""
    cand = candidates(asm)
    if not cand:
        return []
    if repair.mode == "first":
        return [p for s, e in asm.spans[2:] for p in range(s, min(e, s + repair.tokens))]
    n = round(repair.share * len(cand))
    if n == 0:
        return []
    if n >= len(cand):
        return cand  # everything: no need to score
    if repair.mode == "deviation":
        score = _deviation(engine, asm, cand)
    else:
        if not question_ids:
            raise ValueError("repair 'attention' ranks tokens by the question's attention: pass question_ids")
        score = _question_attention(engine, asm, cand, question_ids)
    torch = engine.torch
    top = torch.topk(score, n).indices.cpu()
    return sorted(torch.tensor(cand)[top].tolist())


def _deviation(engine: EngineCore, asm: Assembled, cand: list[int]) -> Any:
    """Per candidate: how far its layer-1 keys move once layers 0-1 see the whole context."""
    torch = engine.torch
    if engine.num_layers < 2:
        return torch.arange(len(cand), 0, -1, dtype=torch.float32)  # no deviation to read: earliest first
    cache = engine.make_cache()
    # The hook lives on the shared model: attach it only while holding the model's lock.
    with engine.lock, torch.inference_mode():
        handle = engine.decoder.layers[1].register_forward_hook(stop_forward)
        try:
            engine.decoder(input_ids=torch.tensor([asm.ids], device=engine.device),
                           **cache_arg(engine.decoder, cache),
                           position_ids=engine.positions(0, len(asm.ids)), use_cache=True)
        except StopForward:
            pass
        finally:
            handle.remove()
    fresh = cache.layers[1].keys[0].to(torch.float32)  # [heads, tokens, dim]
    idx = torch.tensor(cand, device=engine.device)
    return (fresh[:, idx] - asm.keys[1][:, idx].to(torch.float32)).norm(dim=-1).sum(0)


def score_layers(num_layers: int) -> list[int]:
    """Layers whose attention ranks tokens: a quarter, half and three quarters of the depth."""
    return sorted({max(0, min(num_layers - 1, round(num_layers * f))) for f in (0.25, 0.5, 0.75)})


def _question_attention(engine: EngineCore, asm: Assembled, cand: list[int],
                        question_ids: Sequence[int]) -> Any:
    """Per candidate: the softmax mass the question's queries put on its cached keys."""
    torch = engine.torch
    plen = asm.spans[0][1]
    layers = score_layers(engine.num_layers)
    # Copies, not views: a cache made over a view of the assembled buffers may write the
    # question into what looks like spare room after the prefix (the context itself).
    prefix = ChunkKV(asm.ids[:plen], asm.keys[:, :, :plen].contiguous(), asm.values[:, :, :plen].contiguous(),
                     0, "", "native")
    with torch.inference_mode():
        queries = question_queries(engine, prefix, question_ids, layers)
        prefix_keys = unrotated(engine, asm.keys[layers, :, :plen], 0)
        context_keys = unrotated(engine, asm.keys[layers, :, plen:], plen)
        mass = attention_token_mass(queries, prefix_keys, context_keys).cpu()
    return mass[torch.tensor(cand) - plen]


def recompute(engine: EngineCore, asm: Assembled, positions: Sequence[int]) -> None:
    """Recompute KV at `positions` in one forward pass, in place.

    The selected tokens are appended after the context with their own positions and a
    4-D mask: each attends to the cached tokens before it that are not selected, and to
    the selected tokens at or before it (CacheBlend's partial recompute). Their fresh
    keys and values then overwrite the cached ones.
    """
    if not positions:
        return
    torch = engine.torch
    if engine.attn_impl.startswith("flash"):
        raise ValueError("repair needs an attention implementation with custom masks (sdpa or eager)")
    total = len(asm.ids)
    if min(positions) < 0 or max(positions) >= total:
        raise ValueError(f"repair positions must lie within the {total} context tokens")
    sel = torch.tensor(sorted(set(positions)), device=engine.device)
    chosen = torch.zeros(total, dtype=torch.bool, device=engine.device)
    chosen[sel] = True
    cols = torch.arange(total, device=engine.device)
    old = (cols[None, :] <= sel[:, None]) & ~chosen[None, :]
    new = sel[None, :] <= sel[:, None]
    allowed = torch.cat([old, new], dim=1)[None, None]
    if engine.attn_impl == "eager":
        mask = torch.zeros(allowed.shape, dtype=engine.dtype, device=engine.device)
        mask.masked_fill_(~allowed, torch.finfo(engine.dtype).min)
    else:
        mask = allowed
    ids = torch.tensor(asm.ids, device=engine.device)[sel][None]
    with engine.lock, torch.inference_mode():
        cache = engine.make_cache(asm.keys, asm.values)
        engine.decoder(input_ids=ids, position_ids=sel[None], attention_mask=mask,
                       **cache_arg(engine.decoder, cache), use_cache=True)
        for i in range(engine.num_layers):
            asm.keys[i][:, sel] = cache.layers[i].keys[0, :, total:]
            asm.values[i][:, sel] = cache.layers[i].values[0, :, total:]
