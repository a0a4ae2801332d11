"""`KVEngine`: the engine a `KVCache` drives, `EngineCore`'s primitives (encode, move, assemble,
prefill, decode) joined with the steps built on them: the GPU's streamed assembly
(`ragcomp.kv.streamed`) and the repair of cross-chunk attention (`ragcomp.kv.repair`). Those
modules take an `EngineCore` and never import this one, so the dependencies run one way:
ops -> engine_core -> streamed, repair -> engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragcomp.kv.codec import ChunkKV
from ragcomp.kv.engine_core import EngineCore
from ragcomp.kv.ops import Assembled
from ragcomp.kv.repair import Repair, recompute, select
from ragcomp.kv.streamed import prefill_streamed


class KVEngine(EngineCore):
    """Encode and reuse chunk KV for one loaded model (thread-safe through `lock`); see
    `EngineCore` for the arguments."""

    # -- streamed assembly (GPU, ragcomp.kv.streamed): copies overlap the question's forward pass --
    def prefill_streamed(self, prefix: ChunkKV, chunks: Sequence[ChunkKV], q_ids: Sequence[int],
                         groups: int = 8, timings: dict[str, float] | None = None, reserve: int | None = None
                         ) -> tuple[Assembled, Any, Any]:
        """Assemble and prefill the question in one go: (assembled, cache, next-token logits).

        Layers are split into `groups`. A copy stream moves every chunk's slice of a group's
        layers into a staging buffer (host-to-GPU from pinned memory, or GPU-to-GPU); a
        compute stream then gathers the group into token order, rotates its keys, fills the
        cache's layers and records an event; the question's forward pass waits on that event
        just before the group's first layer. So the copy engine moves group g+1 while group
        g is rotated and while the question runs through earlier layers. The arithmetic is
        the same as `assemble` + `prefill`, operation for operation. On a CPU the same steps
        simply run in order. `reserve` (default: the question's length) is room kept after the
        context for the question and answer tokens (see `new_buffers`).
        """
        return prefill_streamed(self, prefix, chunks, q_ids, groups, timings, reserve)

    # -- repair (ragcomp.kv.repair) ---------------------------------------------------------
    def select_for_repair(self, asm: Assembled, repair: Repair,
                          question_ids: Sequence[int] | None = None) -> list[int]:
        """Positions to recompute. The prefix and the first chunk are already exact."""
        return select(self, asm, repair, question_ids)

    def repair(self, asm: Assembled, positions: Sequence[int]) -> None:
        """Recompute KV at `positions` in one forward pass, in place (see `repair.recompute`)."""
        recompute(self, asm, positions)
