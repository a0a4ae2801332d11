"""Provence's model: one encoder pass over `[CLS] query [SEP] passage [SEP]` gives a keep/drop
decision per token and a ranking score for the passage.

Facts about the published checkpoint `naver/provence-reranker-debertav3-v1`, which
`ProvenceModel.from_pretrained` loads without `trust_remote_code` (no code from the checkpoint runs):

- config.json: `"architectures": ["Provence"]`, `"model_type": "Provence"`, `auto_map` to
  `modeling_provence.ProvenceConfig` / `.Provence`; the rest is a DeBERTa-v3-large config (hidden 1024,
  24 layers, 16 heads, vocab 128100, relative attention, position_buckets 256, norm_rel_ebd
  layer_norm, position_biased_input false, type_vocab_size 0, max_position_embeddings 512,
  pooler_hidden_size 1024, pooler_hidden_act gelu, pooler_dropout 0) and ONE label in id2label.
  Source: hf.co/naver/provence-reranker-debertav3-v1/blob/main/config.json; the model card says
  430M parameters, context length 512 tokens, backbone naver/trecdl22-crossencoder-debertav3.
- weights (one model.safetensors, 1.74 GB): `deberta.*` (a DebertaV2Model), `pooler.dense.*`
  (DeBERTa's ContextPooler: hidden state of [CLS] -> dropout -> dense -> gelu), `classifier.*`
  (Linear(hidden, num_labels=1): the ranking logit; named so to start from a cross-encoder) and
  `token_classifier.*` (Linear(hidden, 2): drop/keep logits per token). Source: naver/bergen
  scripts/provence/modeling_provence.py (DebertaV2ForCompressionAndRanking) and the candle port
  matthewhaynesonline/provence-rs, which loads these four prefixes from the published file.
- ranking score = classifier(pooler(h))[:, 0]; keep probability of token t =
  softmax(token_classifier(h_t))[1]. Training (bergen train_provence.py): cross-entropy on 0/1
  labels per token (query, [CLS], [SEP] and padding labelled 0; a sentence's tokens share its
  label), plus MSE of the ranking score to a teacher reranker's score, weighted by `loss_weight`.
- input: `[CLS] query [SEP] passage [SEP]`, at most 512 tokens (bergen builds exactly this list).
- DeBERTa key names in transformers 5.x equal those of 4.45 that wrote the checkpoint (checked:
  embeddings.word_embeddings, embeddings.LayerNorm, encoder.layer.N.attention.self.{query,key,
  value}_proj, attention.output.{dense,LayerNorm}, intermediate.dense, output.{dense,LayerNorm},
  encoder.rel_embeddings, encoder.LayerNorm).

Assumption: every checkpoint marked "Provence" has a DeBERTa-v2/v3 backbone (the config does not
name its backbone type). To load another layout, edit `PUBLISHED_KEY_MAP` / `PUBLISHED_BACKBONE`.

Our own format (`save_pretrained`): config.json with `"model_type": "ragcomp-provence"`, the head
settings and the backbone's config under `"backbone"`; model.safetensors with `backbone.*`,
`pooler.dense.*`, `classifier.*`, `token_classifier.*`. Any AutoModel encoder works as backbone.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcomp._optional import require
from ragcomp.accel.deberta_fast import fast_encoder_for
from ragcomp.accel.graphed import GraphedForward

torch = require("torch", "models")
transformers = require("transformers", "models")
_activations = require("transformers.activations", "models")
_modeling_auto = require("transformers.models.auto.modeling_auto", "models")
nn = torch.nn

FORMAT = "ragcomp-provence"
PUBLISHED_MODEL = "naver/provence-reranker-debertav3-v1"
# Published name prefix -> ours. Longest prefixes first; an unmatched key is an error.
PUBLISHED_KEY_MAP: dict[str, str] = {
    "token_classifier.": "token_classifier.",
    "pooler.dense.": "pooler.dense.",
    "classifier.": "classifier.",
    "deberta.": "backbone.",
}
PUBLISHED_BACKBONE = "deberta-v2"
# Buffers some writers save and that are rebuilt at init.
_IGNORED_SUFFIXES = ("position_ids",)
_NOT_BACKBONE = {"architectures", "auto_map", "model_type", "_name_or_path", "id2label", "label2id",
                 "transformers_version", "torch_dtype", "dtype", "num_labels"}


@dataclass
class ProvenceOutput:
    """token_logits: [batch, seq, token_labels]; ranking_logits: [batch]; losses when labels given."""

    token_logits: Any
    ranking_logits: Any
    loss: Any = None
    token_loss: Any = None
    ranking_loss: Any = None


class ProvenceModel(nn.Module):
    """An encoder with a per-token keep/drop head and a passage ranking head."""

    def __init__(self, backbone_config: Any, token_labels: int = 2, pooler_act: str | None = None,
                 dropout: float | None = None, backbone: Any = None) -> None:
        super().__init__()
        if token_labels not in (1, 2):
            raise ValueError(f"token_labels must be 1 (sigmoid) or 2 (drop/keep), got {token_labels!r}")
        hidden = backbone_config.hidden_size
        if getattr(backbone_config, "pooler_hidden_size", hidden) != hidden:
            raise ValueError("pooler_hidden_size must equal hidden_size (as in the published checkpoint)")
        self.backbone_config = backbone_config
        self.token_labels = token_labels
        self.pooler_act = pooler_act or getattr(backbone_config, "pooler_hidden_act", None) or "gelu"
        self.dropout_p = float(backbone_config.hidden_dropout_prob if dropout is None else dropout)
        self.backbone = backbone if backbone is not None else transformers.AutoModel.from_config(
            backbone_config, **no_pooling(backbone_config))
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 1)
        self.token_classifier = nn.Linear(hidden, token_labels)
        self.dropout = nn.Dropout(self.dropout_p)
        self._act = _activations.ACT2FN[self.pooler_act]
        std = getattr(backbone_config, "initializer_range", 0.02)
        for layer in (self.pooler.dense, self.classifier, self.token_classifier):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    @property
    def uses_token_types(self) -> bool:
        # DeBERTa-v3 has type_vocab_size 0; BERT-style encoders mark the passage segment with 1.
        return int(getattr(self.backbone_config, "type_vocab_size", 0) or 0) >= 2

    def forward(
        self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
        labels: Any = None, ranking_labels: Any = None, ranking_weight: float = 1.0, fast: bool | str = False,
    ) -> ProvenceOutput:
        """labels: [batch, seq] 1 keep / 0 drop / -100 ignore; ranking_labels: [batch] teacher scores;
        `fast`: see `encode`."""
        h = self.encode(input_ids, attention_mask, token_type_ids, fast=fast)
        pooled = self._act(self.pooler.dense(h[:, 0]))
        ranking_logits = self.classifier(self.dropout(pooled))[:, 0]
        token_logits = self.token_classifier(self.dropout(h))
        out = ProvenceOutput(token_logits, ranking_logits)
        if labels is not None:
            labels = labels.to(token_logits.device)
            if self.token_labels == 2:
                out.token_loss = nn.functional.cross_entropy(
                    token_logits.reshape(-1, 2).float(), labels.reshape(-1).long(), ignore_index=-100)
            else:
                mask = labels != -100
                out.token_loss = nn.functional.binary_cross_entropy_with_logits(
                    token_logits[..., 0][mask].float(), labels[mask].float())
        if ranking_labels is not None:
            out.ranking_loss = nn.functional.mse_loss(
                ranking_logits.float(), ranking_labels.to(ranking_logits.device).float())
        if out.token_loss is not None and out.ranking_loss is not None:
            out.loss = out.token_loss + ranking_weight * out.ranking_loss
        else:
            out.loss = out.token_loss if out.token_loss is not None else out.ranking_loss
        return out

    def encode(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
               fast: bool | str = False) -> Any:
        """The backbone's last hidden state. `fast` runs `FastDebertaV2Encoder` (the same outputs at
        non-padding positions, far fewer host-side ops) when the backbone is a supported DeBERTa-v2
        and the model is in eval mode (it applies no dropout); HF's forward otherwise. A string names
        the fast encoder's attention ("sdpa", the same as True, or "flex")."""
        if fast and not self.training:
            encoder = fast_encoder_for(self.backbone, "sdpa" if fast is True else fast)
            if encoder is not None:
                return encoder(input_ids, attention_mask, token_type_ids)
        use_types = token_type_ids is not None and self.uses_token_types
        extra = {"token_type_ids": token_type_ids} if use_types else {}
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def predict(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None,
                fast: bool | str = False) -> tuple[Any, Any]:
        """(keep probabilities [batch, seq], ranking logits [batch]), both float32: what scoring needs."""
        out = self(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, fast=fast)
        return self.keep_probs(out.token_logits), out.ranking_logits.float()

    def runner(self, fast: bool | str = True, cuda_graphs: bool = True, pad_id: int = 0,
               max_batch: int | None = None, width_multiple: int = 16) -> GraphedForward:
        """`runner(ids, mask, types) -> predict(...)` on this model's device: replayed from CUDA graphs
        on CUDA when `cuda_graphs` (see `ragcomp.accel.graphed`), eager otherwise. Cached on the model
        and rebuilt when its device, dtype or parameter storage changes (a captured graph reads fixed
        addresses)."""
        first = next(self.parameters())
        where = (str(first.device), str(first.dtype), first.data_ptr())
        key = (fast, cuda_graphs, pad_id, max_batch, width_multiple)
        cache = self.__dict__.setdefault("_ragcomp_runners", {"where": where, "runners": {}})
        if cache["where"] != where:  # moved or reloaded: graphs of the old storage must not replay
            cache.update(where=where, runners={})
        if key not in cache["runners"]:
            def predict(ids: Any, mask: Any, types: Any) -> tuple[Any, Any]:
                return self.predict(ids, mask, types, fast=fast)

            # Batches bucketed to even sizes: launch groups split a question's passages evenly
            # (20 passages at batch_size 16: 10 + 10, which a multiple of 4 would pad to 12 + 12).
            # Widths bucketed to `width_multiple`: a smaller one pads less (each column costs every
            # passage of the batch a token) but captures more graphs (compiled forwards: compiles).
            cache["runners"][key] = GraphedForward(predict, (pad_id, 0, 0), first.device, enabled=cuda_graphs,
                                                   width_multiple=width_multiple, batch_multiple=2,
                                                   max_batch=max_batch)
        return cache["runners"][key]

    def keep_probs(self, token_logits: Any) -> Any:
        """Probability that each token is kept, float32, [batch, seq]."""
        logits = token_logits.float()
        if self.token_labels == 2:
            return torch.softmax(logits, dim=-1)[..., 1]
        return torch.sigmoid(logits[..., 0])

    # -- our format ----------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"architectures": ["RagcompProvence"], "model_type": FORMAT, "format_version": 1,
                "token_labels": self.token_labels, "pooler_act": self.pooler_act, "dropout": self.dropout_p,
                "backbone": json.loads(self.backbone_config.to_json_string(use_diff=False))}

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """config.json + model.safetensors (no pickle); the tokenizer too when given."""
        safetensors_torch = require("safetensors.torch", "models")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        safetensors_torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        return path

    @classmethod
    def from_backbone(cls, name_or_path: str, token_labels: int = 2, **kwargs: Any) -> ProvenceModel:
        """Pretrained encoder weights (hub id or path), new random heads: the start of training."""
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        backbone = transformers.AutoModel.from_pretrained(name_or_path, **no_pooling(config))
        return cls(backbone.config, token_labels=token_labels, backbone=backbone, **kwargs)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, device: str | None = None, dtype: Any = None
    ) -> ProvenceModel:
        """Load our format or the published Provence layout, from a folder or a hub id."""
        folder = resolve_folder(name_or_path)
        cfg = json.loads((folder / "config.json").read_text())
        state = _load_safetensors(folder)
        if cfg.get("model_type") == FORMAT:
            backbone_cfg = dict(cfg["backbone"])
            config = transformers.AutoConfig.for_model(backbone_cfg.pop("model_type"), **backbone_cfg)
            model = cls(config, token_labels=cfg.get("token_labels", 2), pooler_act=cfg.get("pooler_act"),
                        dropout=cfg.get("dropout"))
        elif is_published_config(cfg):
            config = transformers.AutoConfig.for_model(
                PUBLISHED_BACKBONE, **{k: v for k, v in cfg.items() if k not in _NOT_BACKBONE})
            state = map_published_keys(state)
            labels = state["token_classifier.weight"].shape[0] if "token_classifier.weight" in state else 2
            model = cls(config, token_labels=labels)
        else:
            raise ValueError(f"{folder} is not a Provence checkpoint: config.json has model_type "
                             f"{cfg.get('model_type')!r}, expected 'Provence' or {FORMAT!r}")
        _load_state(model, state, folder)
        model.eval()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model


def is_published_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "Provence" or "Provence" in (cfg.get("architectures") or [])


def map_published_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename the published checkpoint's keys to ours; unknown keys are an error, not silently dropped."""
    out, unknown = {}, []
    for key, value in state.items():
        prefix = next((p for p in PUBLISHED_KEY_MAP if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
            continue
        out[PUBLISHED_KEY_MAP[prefix] + key[len(prefix):]] = value
    unknown = [k for k in unknown if not k.endswith(_IGNORED_SUFFIXES)]
    if unknown:
        raise ValueError(f"unexpected keys in a Provence checkpoint (see PUBLISHED_KEY_MAP): {unknown[:8]}")
    return out


# Pruners that ship inside the package, by name (how each was trained: its folder's README.md).
BUNDLED = {"provence-minilm": Path(__file__).resolve().parents[2] / "data" / "provence-minilm"}
DEFAULT_MODEL = "provence-minilm"


def resolve_folder(name_or_path: str | Path) -> Path:
    """A bundled name or local folder as is; otherwise the hub id's config, weights and tokenizer
    (never its code)."""
    if str(name_or_path) in BUNDLED:
        return BUNDLED[str(name_or_path)]
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    try:
        hub = require("huggingface_hub", "models")
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
        return Path(hub.snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        raise OSError(f"could not load Provence model {name!r}: not a local folder, and the hub could "
                      f"not provide it ({type(e).__name__}: {e})") from e


def no_pooling(config: Any) -> dict[str, Any]:
    """`AutoModel` keyword arguments that skip the backbone's own pooler (also used by `python -m
    ragcomp.train export-backbone`)."""
    # BERT-style models add their own tanh pooler; ours replaces it, so do not build unused weights.
    model_cls = _modeling_auto.MODEL_MAPPING.get(type(config), None)
    if model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def _load_safetensors(folder: Path) -> dict[str, Any]:
    safetensors_torch = require("safetensors.torch", "models")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors in {folder} (pickled .bin weights are not loaded)")
    state: dict[str, Any] = {}
    for name in files:
        state.update(safetensors_torch.load_file(str(folder / name)))
    return state


def _load_state(model: ProvenceModel, state: dict[str, Any], folder: Path) -> None:
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"weights in {folder} do not match the model: missing {result.missing_keys[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")


def encoder_tokenizer_for(name_or_path: str, net: ProvenceModel) -> Any:
    """The encoder's tokenizer from a folder or hub id. Passing the backbone's config keeps
    AutoTokenizer from reading config.json: the published one has an auto_map to remote code,
    which would prompt for trust_remote_code."""
    return transformers.AutoTokenizer.from_pretrained(name_or_path, config=net.backbone_config,
                                                      trust_remote_code=False)
