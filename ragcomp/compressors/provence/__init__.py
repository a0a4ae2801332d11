"""Provence: prune each passage to the sentences an encoder marks as needed and rerank passages.

- `compressor.py`: `ProvenceCompressor` (windows, sentence rounding, reranking, launch groups).
- `inputs.py`: the CPU-side inputs (passage LRU, tokenising, launch groups, batch arrays, `WindowFold`).
- `model.py`: `ProvenceModel` (published layout and ours, safetensors only); needs torch.

Importing this package does not import torch: the model module loads when a compressor first scores.
"""

from ragcomp.compressors.provence.compressor import PassageScores, ProvenceCompressor

__all__ = ["PassageScores", "ProvenceCompressor"]
