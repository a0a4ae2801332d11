"""Accelerator code that serves several methods: a DeBERTa-v2/v3 inference forward on HF's own
parameters (`deberta_fast.py`, its FlexAttention and whole-layer compile variants in
`deberta_flex.py`) and CUDA-graph replay of any encoder forward (`graphed.py`).

Leaf modules: they import torch / transformers and nothing of ragcomp but `_optional`.
"""
