"""ragcomp: make retrieved context smaller and cheaper without losing the answer."""

from ragcomp.base import Compressor, Pipeline, TokenBudget, as_passages
from ragcomp.registry import available_methods, load_compressor, register
from ragcomp.text import Sentence, split_sentences
from ragcomp.types import Compressed, CompressionResult, Passage, StepStats

__version__ = "0.1.0"

__all__ = [
    "Compressed",
    "CompressionResult",
    "Compressor",
    "Passage",
    "Pipeline",
    "Sentence",
    "StepStats",
    "TokenBudget",
    "as_passages",
    "available_methods",
    "load_compressor",
    "register",
    "split_sentences",
]
