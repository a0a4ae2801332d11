"""How Provence runs, declared in one place: `ProvenceRuntime` groups the settings that decide where and
how fast the encoder reads (device, dtype, fast forward, CUDA graphs, batch and window sizes, passage
cache), apart from what the method keeps (threshold, top_k, sentence counts: the constructor's own).

A leaf module without torch: the compressor imports it, and so can a caller that only builds settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ragcomp.compressors._common import check_int


@dataclass(frozen=True)
class ProvenceRuntime:
    """Runtime settings of `ProvenceCompressor` (each is also a constructor keyword of the same name).

    - `device`, `dtype`: where the model runs (default: CUDA when present; bf16 there, fp32 elsewhere).
    - `batch_size`: encoder windows per forward, and passages per launch group.
    - `window`: the encoder input length in tokens (None: the model's, at most 512); `stride`: how many
      passage tokens consecutive windows of a long passage share (None: a quarter of the room).
    - `fast_encoder`: runs a DeBERTa-v2/v3 backbone through `ragcomp.accel.deberta_fast`'s
      `FastDebertaV2Encoder` (same outputs, far less host work; other backbones keep their HF forward;
      "flex" selects its FlexAttention variant, compiled per shape, see `ragcomp.accel.deberta_flex`;
      "sdpa-compiled" compiles each whole layer; False: HF's forward).
    - `cuda_graphs`: replays the forward from CUDA graphs on CUDA (shapes bucketed, widths to a multiple
      of `graph_width_multiple`: smaller pads less, captures more graphs; see `ragcomp.accel.graphed`;
      ignored elsewhere).
    - `passage_cache`: keeps the tokens and sentences of that many recent passage texts (LRU; 0: none),
      so passages that come back in later questions skip that CPU work.
    """

    device: str | None = None
    dtype: Any = None
    batch_size: int = 16
    window: int | None = None
    stride: int | None = None
    fast_encoder: bool | str = True
    cuda_graphs: bool = True
    graph_width_multiple: int = 16
    passage_cache: int = 1024

    def __post_init__(self) -> None:
        # The constructor's order and wording, so errors read the same whichever way settings came in.
        check_int("window", self.window, 8)
        check_int("stride", self.stride, 0)
        check_int("batch_size", self.batch_size, 1, allow_none=False)
        check_int("passage_cache", self.passage_cache, 0, allow_none=False)
        check_int("graph_width_multiple", self.graph_width_multiple, 1, allow_none=False)

    @classmethod
    def of(cls, runtime: ProvenceRuntime | Mapping[str, Any] | None) -> ProvenceRuntime:
        """A runtime from an instance, a mapping of its fields (unknown keys named in the error) or None."""
        if runtime is None:
            return cls()
        if isinstance(runtime, cls):
            return runtime
        if isinstance(runtime, Mapping):
            unknown = sorted(set(runtime) - set(FIELDS))
            if unknown:
                raise TypeError(f"unknown runtime setting(s) {', '.join(map(repr, unknown))}; "
                                f"ProvenceRuntime has: {', '.join(FIELDS)}")
            return cls(**runtime)
        raise TypeError(f"runtime must be a ProvenceRuntime or a mapping of its fields, got "
                        f"{type(runtime).__name__}")

    def overridden(self, **settings: Any) -> ProvenceRuntime:
        """This runtime with the settings that differ from their defaults replaced: constructor keywords
        left at their defaults keep the runtime's value, the others win."""
        changed = {k: v for k, v in settings.items() if not _same(v, DEFAULTS[k])}
        return replace(self, **changed) if changed else self

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ProvenceRuntime))
DEFAULTS: dict[str, Any] = ProvenceRuntime().as_dict()


def _same(value: Any, default: Any) -> bool:
    # `is` first: a dtype object may not compare with None; True == 1 must not count as the default 1.
    return value is default or (type(value) is type(default) and value == default)
