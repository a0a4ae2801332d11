"""One chunk's KV as tensors (`ChunkKV`) and as bytes for a byte store.

Bytes layout: a 16-byte envelope (magic, format version, checksum algorithm, 64-bit
checksum of the rest) followed by a standard safetensors blob with tensors `ids`, `k`,
`v` (and `k_scale`, `v_scale` when quantised) and the fingerprint, base position and
storage kind in its metadata. Never pickle. Decoding parses the safetensors header
itself and maps tensors onto the received bytes without copying them: the copy that
matters happens once, when keys are rotated into the assembled cache.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

from ragcomp._optional import require

try:  # xxh3 checks ~10 GB/s; zlib's crc32 (~1.5 GB/s) is the stdlib fallback
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None

MAGIC = b"RCKV"
VERSION = 1
_ALGO_XXH3 = 1
_ALGO_CRC32 = 2
_ENVELOPE = struct.Struct("<4sBBH8s")  # magic, version, algo, reserved, digest: 16 bytes
STORAGE_KINDS = ("native", "bf16", "fp16", "fp8", "int8")
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


class CorruptEntryError(ValueError):
    """Stored bytes fail their checksum or cannot be parsed (truncated, foreign, damaged)."""


def _digest(data: memoryview | bytes, algo: int) -> bytes:
    if algo == _ALGO_XXH3:
        if _xxhash is None:
            raise CorruptEntryError("entry is checksummed with xxh3 but xxhash is not installed")
        return _xxhash.xxh3_64_digest(data)
    if algo == _ALGO_CRC32:
        return struct.pack("<Q", zlib.crc32(data))
    raise CorruptEntryError(f"unknown checksum algorithm {algo}")


@dataclass
class ChunkKV:
    """The KV of one chunk (or of the shared prefix) in its stored form.

    keys/values: [layers, kv_heads, tokens, head_dim] in the storage dtype; for fp8/int8
    k_scale/v_scale hold float32 scales [layers, kv_heads, tokens, 1]. `base` is the
    position of the first token when it was encoded. `ids` are the token ids it encodes:
    the final prompt is made of these ids, never of re-tokenised text.
    """

    ids: list[int]
    keys: Any
    values: Any
    base: int
    fingerprint: str
    storage: str = "native"
    k_scale: Any = None
    v_scale: Any = None
    # Optional [layers, 2, kv_heads, tokens, dim] buffer that keys/values are views of, so one
    # copy moves a layer range of both (see `pack`); never serialised.
    packed: Any = None
    packed_scale: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        if self.packed is not None:
            scale = self.packed_scale
            return self.packed.nbytes + (scale.nbytes if scale is not None else 0)
        n = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        for s in (self.k_scale, self.v_scale):
            if s is not None:
                n += s.numel() * s.element_size()
        return n

    @property
    def device(self) -> Any:
        return self.keys.device

    def to(self, device: Any, pin: bool = False, non_blocking: bool = False) -> ChunkKV:
        """A copy on `device` (pinned host memory when `pin` and the target is the CPU)."""

        def move(t: Any) -> Any:
            if t is None:
                return None
            if pin:
                return t.pin_memory() if not t.is_pinned() else t
            return t.to(device, non_blocking=non_blocking)

        return ChunkKV(self.ids, move(self.keys), move(self.values), self.base, self.fingerprint,
                       self.storage, move(self.k_scale), move(self.v_scale))

    def dequantized(self, dtype: Any) -> tuple[Any, Any]:
        """(keys, values) as float tensors of `dtype` (scales applied)."""
        torch = require("torch", "models")
        if self.k_scale is None:
            return self.keys.to(dtype), self.values.to(dtype)
        k = (self.keys.to(torch.float32) * self.k_scale).to(dtype)
        v = (self.values.to(torch.float32) * self.v_scale).to(dtype)
        return k, v


def pack(chunk: ChunkKV, device: Any, pin: bool = False) -> ChunkKV:
    """A copy whose keys and values (and scales) live in one [layers, 2, ...] buffer on
    `device` (pinned host memory when `pin`): a layer range of both is then one contiguous
    block, which the GPU path moves with a single copy."""
    torch = require("torch", "models")

    def both(k: Any, v: Any) -> Any:
        shape = (k.shape[0], 2, *k.shape[1:])
        buf = torch.empty(shape, dtype=k.dtype, device=device, pin_memory=pin)
        buf[:, 0].copy_(k)
        buf[:, 1].copy_(v)
        return buf

    buf = both(chunk.keys, chunk.values)
    sbuf = both(chunk.k_scale, chunk.v_scale) if chunk.k_scale is not None else None
    return ChunkKV(chunk.ids, buf[:, 0], buf[:, 1], chunk.base, chunk.fingerprint, chunk.storage,
                   None if sbuf is None else sbuf[:, 0], None if sbuf is None else sbuf[:, 1], buf, sbuf)


def quantize(keys: Any, values: Any, storage: str) -> tuple[Any, Any, Any, Any]:
    """(keys, values, k_scale, v_scale) in the storage kind; scales per (layer, head, token)."""
    torch = require("torch", "models")
    if storage not in STORAGE_KINDS:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_KINDS)}, got {storage!r}")
    if storage == "native":
        return keys, values, None, None
    if storage in ("bf16", "fp16"):
        dt = torch.bfloat16 if storage == "bf16" else torch.float16
        return keys.to(dt), values.to(dt), None, None
    out = []
    for t in (keys, values):
        t32 = t.to(torch.float32)
        amax = t32.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
        if storage == "fp8":
            scale = amax / _FP8_MAX
            q = (t32 / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        else:
            scale = amax / 127.0
            q = (t32 / scale).round().clamp(-127, 127).to(torch.int8)
        out.append((q.contiguous(), scale.contiguous()))
    (k, ks), (v, vs) = out
    return k, v, ks, vs


def encode_entry(chunk: ChunkKV) -> bytes:
    """ChunkKV -> bytes (envelope + safetensors)."""
    torch = require("torch", "models")
    st = require("safetensors.torch", "models")
    tensors = {
        "ids": torch.tensor(chunk.ids, dtype=torch.int32),
        "k": chunk.keys.detach().contiguous().cpu(),
        "v": chunk.values.detach().contiguous().cpu(),
    }
    if chunk.k_scale is not None:
        tensors["k_scale"] = chunk.k_scale.detach().contiguous().cpu()
        tensors["v_scale"] = chunk.v_scale.detach().contiguous().cpu()
    meta = {"fingerprint": chunk.fingerprint, "base": str(chunk.base), "storage": chunk.storage,
            "format": f"ragcomp-kv/{VERSION}"}
    payload = st.save(tensors, metadata=meta)
    algo = _ALGO_XXH3 if _xxhash is not None else _ALGO_CRC32
    return _ENVELOPE.pack(MAGIC, VERSION, algo, 0, _digest(payload, algo)) + payload


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "I8": "int8", "I32": "int32", "I64": "int64"}


def decode_entry(data: bytes | bytearray | memoryview, verify: bool = True) -> ChunkKV:
    """bytes -> ChunkKV; raises CorruptEntryError on a bad checksum, truncation or foreign bytes.

    Tensors are views onto `data` (zero-copy, read-only): callers copy when they rotate.
    """
    torch = require("torch", "models")
    view = memoryview(data)
    if len(view) < _ENVELOPE.size + 8:
        raise CorruptEntryError(f"entry too short ({len(view)} bytes)")
    magic, version, algo, _, digest = _ENVELOPE.unpack_from(view, 0)
    if magic != MAGIC or version != VERSION:
        raise CorruptEntryError("not a ragcomp KV entry (bad magic or version)")
    payload = view[_ENVELOPE.size:]
    if verify and _digest(payload, algo) != digest:
        raise CorruptEntryError("checksum mismatch (corrupt or truncated entry)")
    try:
        (hlen,) = struct.unpack_from("<Q", payload, 0)
        header = json.loads(bytes(payload[8 : 8 + hlen]))
        meta = header.pop("__metadata__")
        start = 8 + hlen
        tensors = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: these views are never written
            for name, info in header.items():
                s, e = info["data_offsets"]
                dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
                shape = info["shape"]
                if start + e > len(payload) or e < s:
                    raise CorruptEntryError(f"tensor {name} runs past the end of the entry")
                if e == s:
                    tensors[name] = torch.empty(shape, dtype=dtype)
                    continue
                flat = torch.frombuffer(payload, dtype=torch.uint8, count=e - s, offset=start + s)
                tensors[name] = flat.view(dtype).reshape(shape)
        return ChunkKV(
            ids=tensors["ids"].tolist(), keys=tensors["k"], values=tensors["v"], base=int(meta["base"]),
            fingerprint=meta["fingerprint"], storage=meta["storage"],
            k_scale=tensors.get("k_scale"), v_scale=tensors.get("v_scale"),
        )
    except CorruptEntryError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, struct.error, json.JSONDecodeError) as e:
        raise CorruptEntryError(f"unreadable entry: {type(e).__name__}: {e}") from e
