"""EXIT scoring in one forward: the layout of `method="single_pass"`.

On a GPU a small model's forward costs about the same whatever its width (Python and kernel
launches, not FLOPs), so the count of forwards is what counts. Here a question's shared part
(template, query, "Full context:"), every window's own prefix (title, context) and every
sentence row go into ONE sequence (a "pack"); a block mask lets each token see exactly what it
sees in the per-sentence prompt, and position ids restart as they would there:

    [shared][rest of prefix 1][row 1.1][row 1.2]...[rest of prefix 2][row 2.1]...
    shared:    causal over itself                       positions 0 .. s-1
    prefix i:  shared + causal over itself              positions s .. len(prefix i)-1
    row i.j:   shared + prefix i + causal over itself   positions len(prefix i) ...

Packs of several questions run side by side in one right-padded batch. No KV cache is kept:
the prefix is encoded in the same forward that scores the rows. The mask is dense, so masked-out
keys still cost FLOPs: right for accelerators, not for a CPU (there `batched` keeps the
token-saving cached path).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragcomp._optional import require

# (start in the pack, length, key ranges [a, b) seen in full); a segment is also causal over itself.
_Segment = tuple[int, int, tuple[tuple[int, int], ...]]


@dataclass
class Pack:
    """One packed sequence: prompt pieces of one question, ready for one row of a batch."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[_Segment] = field(default_factory=list)
    last: list[int] = field(default_factory=list)  # index of each scored row's last token
    owners: list[tuple[int, int, int]] = field(default_factory=list)  # (question, unit, row) per `last`

    def add(self, ids: list[int], first_position: int, sees: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        """Append a segment; returns its range in the pack."""
        start = len(self.ids)
        self.ids += ids
        self.positions += range(first_position, first_position + len(ids))
        self.segments.append((start, len(ids), sees))
        return start, start + len(ids)

    def allowed(self, width: int) -> np.ndarray:
        """Boolean (width, width) mask; padding after the pack sees only itself (finite, never seen)."""
        allowed = np.zeros((width, width), dtype=bool)
        for start, n, sees in self.segments:
            for a, b in sees:
                allowed[start : start + n, a:b] = True
            allowed[start : start + n, start : start + n] = np.tri(n, dtype=bool)
        pad = np.arange(len(self.ids), width)
        allowed[pad, pad] = True
        return allowed


def build_packs(questions: list[tuple[list[Any], int]], budget: int) -> list[Pack]:
    """Packs for each question's (units, shared length), in order, each at most sqrt(budget)
    tokens long unless a single sentence row needs more (a question may span several packs;
    each repeats the shared part)."""
    packs: list[Pack] = []
    for qi, (units, shared) in enumerate(questions):
        pack: Pack | None = None
        blocks: dict[int, tuple[int, int]] = {}  # unit -> its prefix rest's range in `pack`
        for ui, unit in enumerate(units):
            for ri, row in enumerate(unit.rows):
                need = len(row) + (0 if ui in blocks else len(unit.prefix) - shared)
                if pack is not None and (len(pack.ids) + need) ** 2 > budget:
                    pack = None
                if pack is None:
                    pack, blocks = Pack(), {}
                    packs.append(pack)
                    pack.add(unit.prefix[:shared], 0, ())
                if ui not in blocks:
                    blocks[ui] = pack.add(unit.prefix[shared:], shared, ((0, shared),))
                pack.add(row, len(unit.prefix), ((0, shared), blocks[ui]))
                pack.last.append(len(pack.ids) - 1)
                pack.owners.append((qi, ui, ri))
    return packs


def group_packs(packs: list[Pack], budget: int, multiple: int = 8) -> list[tuple[list[Pack], int]]:
    """Consecutive packs per forward with their padded width: batch x width^2 stays within
    `budget` (one pack always fits). Widths round up to `multiple` (aligned masks keep
    memory-efficient attention kernels usable)."""

    def width(group: list[Pack]) -> int:
        return -(-max(len(p.ids) for p in group) // multiple) * multiple

    groups: list[list[Pack]] = []
    for p in packs:
        if groups and (len(groups[-1]) + 1) * width([*groups[-1], p]) ** 2 <= budget:
            groups[-1].append(p)
        else:
            groups.append([p])
    return [(g, width(g)) for g in groups]


def batch_inputs(group: list[Pack], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids and positions (batch, width) and the boolean mask (batch, width, width)."""
    ids = np.full((len(group), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(group), width), dtype=np.int64)
    for b, p in enumerate(group):
        ids[b, : len(p.ids)] = p.ids
        pos[b, : len(p.ids)] = p.positions
    return ids, pos, np.stack([p.allowed(width) for p in group])


# -- attention masks and cache views shared by the batched and single-pass paths ---------------
def additive_mask(allowed: np.ndarray, dtype: Any, device: Any) -> Any:
    """(batch, queries, keys) booleans -> a (batch, 1, queries, keys) additive mask on `device`:
    0 where allowed, the dtype's minimum elsewhere."""
    torch = require("torch", "models")
    blocked = torch.from_numpy(~allowed).to(device, non_blocking=False)
    mask = torch.zeros(blocked.shape, dtype=dtype, device=device)
    return mask.masked_fill_(blocked, torch.finfo(dtype).min)[:, None]


def view_cache(cache: Any, batch: int) -> Any:
    """A batch-1 cache seen as `batch` rows (a view, no copy: the next update copies once).

    Layer objects are shallow-copied so the source cache is never extended, and layer types
    keep their own settings.
    """
    return _with_layers(cache, [(lay.keys.expand(batch, *lay.keys.shape[1:]),
                                 lay.values.expand(batch, *lay.values.shape[1:])) for lay in cache.layers])


def custom_masks(model: Any) -> bool:
    """Whether packed rows can run: the kernel takes an arbitrary additive 4D mask, and no layer
    has a sliding window (its cache may hold fewer tokens than the mask assumes)."""
    cfg = model.config
    sliding = any("sliding" in str(t) for t in getattr(cfg, "layer_types", None) or [])
    return getattr(cfg, "_attn_implementation", "eager") in ("sdpa", "eager") and not sliding


def concat_caches(caches: list[Any]) -> Any:
    """Batch-1 caches one after another along the tokens (one cache: a view, else one copy)."""
    if len(caches) == 1:
        return view_cache(caches[0], 1)
    torch = require("torch", "models")
    kv = [(torch.cat([c.layers[i].keys for c in caches], dim=2),
           torch.cat([c.layers[i].values for c in caches], dim=2)) for i in range(len(caches[0].layers))]
    return _with_layers(caches[0], kv)


def _with_layers(cache: Any, kv: list[tuple[Any, Any]]) -> Any:
    new = copy.copy(cache)
    new.layers = []
    for lay, (k, v) in zip(cache.layers, kv, strict=True):
        lay = copy.copy(lay)
        lay.keys, lay.values = k, v
        new.layers.append(lay)
    return new
