"""Fingerprints: a stored KV must never come back for another model, dtype, prefix or text.

The model fingerprint hashes the name and revision, the architecture config (minus
fields that do not change the numbers), a strided sample of the weights (so two
checkpoints under one name differ), the compute dtype and the RoPE settings. A chunk's
fingerprint adds the hash of the shared prefix's token ids and of its own token ids.
Store keys are derived from the fingerprint, and every loaded entry is checked against
the full fingerprint and its token ids again (a key collision or a foreign writer
cannot slip through).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.kv.rope import RopeSpec

# Config fields that name files, versions or kernels but do not change keys and values.
_VOLATILE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash",
             "_attn_implementation", "_attn_implementation_internal", "attn_implementation",
             "use_cache", "output_attentions", "output_hidden_states", "return_dict",
             "_experts_implementation", "quantization_config"}


def ids_hash(ids: list[int]) -> str:
    """Hash of a token-id sequence (int32 little-endian), 32 hex characters."""
    raw = np.asarray(ids, dtype="<i4").tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _weights_sample(model: Any, n: int = 4096) -> str:
    torch = require("torch", "models")
    h = hashlib.blake2b(digest_size=16)
    params = list(model.named_parameters())
    # The embedding and the last two tensors (deep layers, lm head or final norm) differ
    # between fine-tunes even when most layers are shared.
    picks = params[:1] + params[-2:]
    with torch.no_grad():
        for name, p in picks:
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // n)
            sample = flat[::step][:n].to(torch.float32).cpu().contiguous()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: Any, name: str, rope: RopeSpec) -> tuple[str, dict[str, Any]]:
    """(digest, description) of everything about the model that changes its KV."""
    cfg = model.config.to_dict()
    arch = {k: v for k, v in sorted(cfg.items()) if k not in _VOLATILE}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    desc = {
        "name": name,
        "revision": getattr(model.config, "_commit_hash", None),
        "config": hashlib.blake2b(json.dumps(arch, sort_keys=True, default=str).encode(),
                                  digest_size=16).hexdigest(),
        "weights": _weights_sample(model),
        "dtype": dtype,
        "rope": hashlib.blake2b(rope.describe().encode(), digest_size=16).hexdigest(),
    }
    digest = hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=16).hexdigest()
    return digest, desc


def chunk_fingerprint(model_fp: str, storage: str, prefix_ids_hash: str, chunk_ids: list[int]) -> str:
    """The exact fingerprint an entry must carry; also the base of its store key."""
    return json.dumps({"model": model_fp, "storage": storage, "prefix": prefix_ids_hash,
                       "ids": ids_hash(chunk_ids)}, sort_keys=True)


def entry_key(namespace: str, fingerprint: str) -> str:
    digest = hashlib.blake2b(fingerprint.encode(), digest_size=20).hexdigest()
    return f"{namespace}:{digest}"
