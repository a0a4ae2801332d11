"""EXIT: a causal LM judges each sentence useful or not, given the query and the full passage.

- `compressor.py`: `ExitCompressor` (batched shared-prefix, single-pass packed, per-sentence).
- `batch.py`: the single-pass packing and the attention masks / cache views the paths share.
- `prompt.py`: the prompt as token-id pieces, context windows, the PEFT adapter merged in.
"""

from ragcomp.compressors.exit.compressor import (
    METHODS,
    TRAINED_THRESHOLD,
    ZERO_SHOT_TOP_SHARE,
    ExitCompressor,
)

__all__ = ["METHODS", "TRAINED_THRESHOLD", "ZERO_SHOT_TOP_SHARE", "ExitCompressor"]
