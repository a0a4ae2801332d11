"""Provence: prune each passage to the sentences an encoder marks as needed and rerank passages.

- `compressor.py`: `ProvenceCompressor` (windows, sentence rounding, reranking, launch groups).
- `config.py`: `ProvenceRuntime`, the compressor's runtime settings declared in one object.
- `inputs.py`: the CPU-side inputs (passage LRU, tokenising, launch groups, batch arrays, `WindowFold`).
- `model.py`: `ProvenceModel` (published layout and ours, safetensors only); needs torch.

Importing this package does not import torch: the model module loads when a compressor first scores.
"""

from ragcomp.compressors.provence.compressor import PassageScores, ProvenceCompressor
from ragcomp.compressors.provence.config import ProvenceRuntime

__all__ = ["PassageScores", "ProvenceCompressor", "ProvenceRuntime"]
