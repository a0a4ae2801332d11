"""xRAG's bridge: a projector from the retriever's embedding space to the LLM's input embeddings, and
generation through `inputs_embeds` with one placeholder token per document.

Facts about the published checkpoint (Hannibal046/xrag-7b, code: github.com/Hannibal046/xRAG,
src/model/xMistral/modeling_xmistral.py), which `load_projector` reads without running its code:

- config.json is a MistralConfig plus `projector_type` ("mlp2x_gelu") and `retriever_hidden_size`
  (4096: SFR-Embedding-Mistral); the projector maps it to `hidden_size`.
- `Projector.projector = nn.Sequential(Linear(retriever_hidden_size, hidden_size), GELU(),
  Linear(hidden_size, hidden_size))` ("mlpNx_gelu": N linears, GELU between), held by the model as
  `self.projector`, so the weights are `projector.projector.0.{weight,bias}` and
  `projector.projector.2.{weight,bias}`, stored beside the LLM's own keys (sharded safetensors with
  model.safetensors.index.json). The tokenizer has an added `<xRAG>` token whose input embedding is
  replaced, position by position, by the projected document embeddings (their count must match).

Our own format is the same layout, small: config.json (`retriever_hidden_size`, `hidden_size`,
`projector_type`, plus `ragcomp_embedder` / `ragcomp_lm`: what it was trained with) and
projector.safetensors holding only the `projector.projector.*` keys. Nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.llm.base import system_prompt, user_prompt

torch = require("torch", "models")
nn = torch.nn

# The placeholder written in prompts where one document's projected embedding goes (xRAG's name).
XRAG_TOKEN = "<xRAG>"
FORMAT = "ragcomp-xrag"
KEY_PREFIX = "projector.projector."
WEIGHTS_FILE = "projector.safetensors"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "xrag-minilm-smollm2"


class Projector(nn.Module):
    """xRAG's `mlpNx_gelu` projector; state-dict keys `projector.{0,2,...}.{weight,bias}`."""

    def __init__(self, retriever_hidden_size: int, hidden_size: int,
                 projector_type: str = "mlp2x_gelu") -> None:
        super().__init__()
        match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"unsupported projector_type {projector_type!r}: xRAG uses 'mlp<N>x_gelu'")
        layers: list[Any] = [nn.Linear(retriever_hidden_size, hidden_size)]
        for _ in range(1, int(match.group(1))):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        self.projector = nn.Sequential(*layers)
        self.retriever_hidden_size = int(retriever_hidden_size)
        self.hidden_size = int(hidden_size)
        self.projector_type = projector_type
        self.info: dict[str, Any] = {}

    def forward(self, embeddings: Any) -> Any:
        if embeddings.shape[-1] != self.retriever_hidden_size:
            raise ValueError(f"document embedding has size {embeddings.shape[-1]} but the xrag projector "
                             f"takes {self.retriever_hidden_size} (retriever_hidden_size)")
        return self.projector(embeddings)

    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "retriever_hidden_size": self.retriever_hidden_size,
                "hidden_size": self.hidden_size, "projector_type": self.projector_type,
                **{f"ragcomp_{k}": v for k, v in self.info.items()}}

    def save(self, folder: str | Path, dtype: Any = None) -> Path:
        """config.json + projector.safetensors (keys as in the published checkpoint)."""
        safetensors_torch = require("safetensors.torch", "models")
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        state = {f"projector.{k}": v.detach().to("cpu", dtype or v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        safetensors_torch.save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        return path


def load_projector(path: str | Path | None = None, device: str = "cpu") -> Projector:
    """A projector from our folder, a published xRAG model folder (only the projector keys are read,
    through safetensors' lazy reader), or a .safetensors file with config.json beside it."""
    safetensors = require("safetensors", "models")
    where = Path(DEFAULT_DIR if path is None else path).expanduser()
    folder = where.parent if where.suffix == ".safetensors" else where
    if not where.exists():
        hint = (" (the packaged default projector is not installed: train one with `ragcomp train xrag "
                "--out DIR` and pass projector=DIR)") if path is None else ""
        raise FileNotFoundError(f"xrag projector not found at {where}{hint}")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"xrag projector folder {folder} has no config.json")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    missing = [k for k in ("retriever_hidden_size", "hidden_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"{cfg_file} lacks {', '.join(missing)}: not an xRAG projector config")
    files = [where] if where.suffix == ".safetensors" else _weight_files(folder)
    state: dict[str, Any] = {}
    for file in files:
        with safetensors.safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                if key.startswith(KEY_PREFIX):
                    state[key[len("projector."):]] = f.get_tensor(key)
    proj = Projector(cfg["retriever_hidden_size"], cfg["hidden_size"],
                     cfg.get("projector_type", "mlp2x_gelu"))
    expected = proj.state_dict()
    absent = sorted(set(expected) - set(state))
    if absent:
        names = ", ".join("projector." + k for k in absent)
        raise ValueError(f"xrag projector weights in {folder} lack {names}")
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise ValueError(f"xrag projector weight projector.{key} has shape {tuple(state[key].shape)}, "
                             f"config.json implies {tuple(want.shape)}")
    proj.load_state_dict({k: v.float() for k, v in state.items() if k in expected})
    proj.info = {k[len("ragcomp_"):]: v for k, v in cfg.items() if k.startswith("ragcomp_")}
    return proj.to(device).eval()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded (published): open only the shards holding projector keys
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        names = sorted({v for k, v in weight_map.items() if k.startswith(KEY_PREFIX)})
        if not names:
            raise ValueError(f"{index} maps no {KEY_PREFIX}* weights: not an xRAG model")
        return [folder / n for n in names]
    ours = folder / WEIGHTS_FILE
    files = [ours] if ours.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"xrag projector folder {folder} has no .safetensors file")
    return files


# -- the LLM side ---------------------------------------------------------------------------------

def input_embeddings(model: Any) -> Any:
    """The model's input embedding module, or an error naming what is missing."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except NotImplementedError:
        emb = None
    if emb is None or not hasattr(emb, "weight") or getattr(emb.weight, "ndim", 0) != 2:
        raise TypeError(f"model {type(model).__name__} has no input embedding matrix "
                        "(get_input_embeddings()); xrag needs one to place document embeddings")
    return emb


def hidden_size(model: Any) -> int:
    return int(input_embeddings(model).weight.shape[1])


def placeholder_id(tokenizer: Any, token: str = XRAG_TOKEN) -> int:
    """Id of the placeholder: `<xRAG>` when the tokenizer has it as one token (published xRAG), else
    the unknown/end-of-text token. Its own embedding is never read: every occurrence is replaced."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    for cand in (tokenizer.unk_token_id, tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    raise ValueError("tokenizer has no <xRAG>, unk or eos token to use as the xrag placeholder")


def chat_with_placeholders(tokenizer: Any, user: str, system: str | None, pid: int,
                           assistant: str | None = None) -> list[int]:
    """Token ids of a chat prompt in which every `<xRAG>` in the text becomes the placeholder id.

    The rendered template is split at the marker and each piece tokenised alone, so the marker
    is exactly one token whatever the tokenizer does with the string."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if assistant is not None:
        text += assistant
    ids: list[int] = []
    for i, piece in enumerate(text.split(XRAG_TOKEN)):
        if i:
            ids.append(pid)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def reader_prompt_ids(tokenizer: Any, question: str, n_docs: int, pid: int) -> list[int]:
    """The reader's short-answer prompt with one placeholder per document where the text would be."""
    context = "\n\n".join([XRAG_TOKEN] * n_docs)
    return chat_with_placeholders(tokenizer, user_prompt(question, context or None),
                                  system_prompt(context), pid)


def splice(model: Any, input_ids: Any, doc_embeddings: Any, pid: int, attention_mask: Any = None) -> Any:
    """inputs_embeds: the token embeddings with the placeholder rows (inside the mask) replaced by
    `doc_embeddings` (n, hidden), in reading order. Counts must match."""
    emb = input_embeddings(model)
    hidden = emb.weight.shape[1]
    if doc_embeddings.ndim != 2 or doc_embeddings.shape[1] != hidden:
        raise ValueError(f"projected document embeddings have shape {tuple(doc_embeddings.shape)} but "
                         f"{type(model).__name__}'s hidden size is {hidden}: projector and LLM do not match")
    where = input_ids == pid
    if attention_mask is not None:
        where = where & attention_mask.bool()
    n_slots = int(where.sum())
    if n_slots != doc_embeddings.shape[0]:
        raise ValueError(f"prompt has {n_slots} xrag placeholder token(s) but {doc_embeddings.shape[0]} "
                         "document embedding(s) were given")
    embeds = emb(input_ids)  # a fresh tensor: writing into it leaves the embedding matrix alone
    embeds[where] = doc_embeddings.to(embeds.dtype)
    return embeds


def generate_with_embeddings(lm: Any, prompts: Sequence[list[int]], doc_embeddings: Sequence[np.ndarray],
                             pid: int, max_new_tokens: int = 32, stop_at_line: bool = False) -> list[str]:
    """Greedy decoding of left-padded prompts whose placeholders take the given embeddings (new text only)."""
    if len(prompts) != len(doc_embeddings):
        raise ValueError(f"{len(prompts)} prompts but {len(doc_embeddings)} embedding sets")
    if not prompts:
        return []
    from ragcomp.models import first_line_done, left_padded

    tok = lm.tokenizer
    ids, mask = left_padded(prompts, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    vecs = torch.from_numpy(np.concatenate([np.asarray(e, dtype=np.float32) for e in doc_embeddings]))
    extra: dict[str, Any] = {}
    if stop_at_line:
        transformers = require("transformers", "models")
        # With inputs_embeds, generate returns only new tokens: the prompt width is 0.
        extra["stopping_criteria"] = transformers.StoppingCriteriaList([first_line_done(tok, 0)])
    with lm.lock, torch.inference_mode():
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        embeds = splice(lm.model, ids, vecs.to(lm.device), pid, mask)
        out = lm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad, **extra)
    return [tok.decode(row, skip_special_tokens=True).strip() for row in out]
