"""What several benches share: the project's data folder and qa_dev questions, passages retrieved for
them, a median that tolerates no samples, and, for the GPU benches (`bench kv --part gpu`, `bench pages
--part gpu`), the device check, the synchronised timer and random models of real shapes.

A leaf: it imports no other bench module, so the benches import it and never each other."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The project's shared data folder beside the checkout (qa_dev.jsonl, wiki_summaries_en.json).
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
QA_DEFAULT = DATA / "qa_dev.jsonl"


def median(xs: list[float]) -> float:
    """The median of `xs`, NaN when there is none (a row with no samples still prints)."""
    return statistics.median(xs) if xs else float("nan")


def read_questions(path: str, n: int) -> list[dict[str, Any]]:
    """The first `n` records of a qa_dev-style JSONL file (question, answers, ...)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"questions file {path} not found (pass --qa)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


def retrieve_passages(questions: list[dict[str, Any]], k: int) -> list[list[Any]]:
    """The top-`k` passages of the packaged wiki corpus for each question (MiniLM, FAISS)."""
    from ragcomp.retrieval import CorpusRetriever

    retriever = CorpusRetriever.for_corpus("wiki", progress=False)
    return retriever.retrieve_batch([q["question"] for q in questions], k)


# -- GPU benches ---------------------------------------------------------------------------------

# Real shapes (config.json of the published checkpoints); weights are random.
GPU_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768),
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, rope_theta=1e4,
                       tie_word_embeddings=False, max_position_embeddings=4096),  # dry runs
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=5e5, tie_word_embeddings=False, max_position_embeddings=8192 * 4),
}


def random_model(shape: str, device: Any) -> tuple[Any, Any]:
    """(model, config): random bf16 weights of one of GPU_SHAPES, built on `device`."""
    import torch
    import transformers

    spec = dict(GPU_SHAPES[shape])
    mtype, theta = spec.pop("model_type"), spec.pop("rope_theta")
    cfg = transformers.AutoConfig.for_model(mtype, **spec, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": theta})
    t = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    print(f"{shape}: random weights in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return model, cfg


def gpu_bench_device(name: str | None) -> Any:
    """The torch device a GPU bench runs on: CUDA by default, another device only as a dry run."""
    import torch

    dev = torch.device(name or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--part gpu needs a CUDA device (or --device cpu for a dry run)")
    return dev


def synced_median(fn: Any, repeat: int, device: Any) -> tuple[float, Any]:
    """(median seconds of `fn()` over `repeat` calls after one warm-up call, its last output), the
    device synchronised around each call so that the time covers the work, not its launch."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = fn()  # warm-up (kernels, allocator)
    sync()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return median(times), out
