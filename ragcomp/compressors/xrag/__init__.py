"""xrag: each retrieved document becomes one token for the reader (its projected retrieval embedding).

- `compressor.py`: `XragCompressor` (embeddings reused from metadata, index or store) and
  `answer_with_xrag`, shared by the framework integrations.
- `context.py`: `EmbeddingContext`, the context a reader gets (text fallback + embeddings); no torch.
- `model.py`: the projector, placeholder prompts and generation through `inputs_embeds`; needs torch.

Importing this package does not import torch.
"""

from ragcomp.compressors.xrag.compressor import (
    EMBEDDING_KEY,
    XragCompressed,
    XragCompressor,
    answer_with_xrag,
)
from ragcomp.compressors.xrag.context import EmbeddingContext

__all__ = ["EMBEDDING_KEY", "EmbeddingContext", "XragCompressed", "XragCompressor", "answer_with_xrag"]
