"""`EngineCore`: model-side KV work in token ids: encode, move (rotate), assemble, prefill, decode.

Works on any Hugging Face causal LM of the Llama / Qwen2 / Qwen3 / Mistral families with
the transformers v5 `DynamicCache` (`ddp_cache_data` to build one, `layers[i].keys`
to read it). Everything here is text-free. The steps built on these primitives live above this
module and take an `EngineCore`: the GPU's streamed assembly (`ragcomp.kv.streamed`), the repair
of cross-chunk attention (`ragcomp.kv.repair`) and page scoring (`ragcomp.kv.pages_score`);
`ragcomp.kv.engine.KVEngine` joins the first two to it, and `ragcomp.kv.cache.KVCache` adds
tokenizer, prompt layout, tiers and stores on top.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ragcomp._optional import require
from ragcomp.hf_cache import cache_arg
from ragcomp.kv.attention import folded_attention, growing_layer_class
from ragcomp.kv.codec import ChunkKV, quantize
from ragcomp.kv.fingerprint import chunk_fingerprint, ids_hash, model_fingerprint
from ragcomp.kv.ops import Assembled, rotate_into
from ragcomp.kv.rope import rope_spec, rotation


def _room(t: Any) -> Any:
    """The [1, heads, capacity, dim] buffer behind a [1, heads, tokens, dim] view that has room
    after its tokens (its head stride spans more than its tokens), else None."""
    if t.dim() != 4 or t.shape[0] != 1 or t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        return None
    capacity = t.stride(-3) // t.shape[-1]
    if t.shape[1] > 1 and capacity > t.shape[-2]:
        return t.as_strided((1, t.shape[1], capacity, t.shape[-1]), t.stride())
    return None


class EngineCore:
    """Encode and reuse chunk KV for one loaded model (thread-safe through `lock`)."""

    def __init__(self, model: Any, name: str, storage: str = "native", lock: Any = None,
                 folded_attention: bool | None = None) -> None:
        self.torch = require("torch", "models")
        self.model = model
        cfg = model.config
        self.config = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        self.rope = rope_spec(model)  # refuses RoPE that cannot be moved exactly
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.num_layers = int(self.config.num_hidden_layers)
        heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        self.kv_heads = int(heads)
        self.head_dim = self.rope.head_dim
        self.storage = storage
        quantize(self.torch.zeros(1, 1, 1, 2), self.torch.zeros(1, 1, 1, 2), storage)  # validates the name
        self.model_fp, self.model_desc = model_fingerprint(model, name, self.rope)
        self.inv_freq = self.rope.inv_freq.to(self.device)
        self.lock = lock if lock is not None else threading.RLock()
        window = getattr(self.config, "sliding_window", None)
        uses_window = getattr(self.config, "use_sliding_window", True)
        self.window = int(window) if window and uses_window else None
        self.attn_impl = getattr(self.config, "_attn_implementation", "sdpa") or "sdpa"
        # Folded-GQA attention (ragcomp/kv/attention.py) on by default where it pays: on a GPU.
        self.fold = self.device.type == "cuda" if folded_attention is None else bool(folded_attention)
        self._streams: tuple[Any, Any] | None = None  # see side_streams

    # -- fingerprints ----------------------------------------------------------------------
    def fingerprint(self, prefix_ids: Sequence[int], ids: Sequence[int], storage: str | None = None) -> str:
        prefix_hash = ids_hash(list(prefix_ids))
        return chunk_fingerprint(self.model_fp, storage or self.storage, prefix_hash, list(ids))

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def check_length(self, total: int) -> None:
        if self.window is not None and total > self.window:
            raise ValueError(
                f"context of {total} tokens exceeds the model's sliding window ({self.window}); "
                "reused chunk KV assumes full attention"
            )

    # -- caches ----------------------------------------------------------------------------
    def make_cache(self, keys: Any = None, values: Any = None, batch: int = 1, grow: bool = False) -> Any:
        """A DynamicCache over [layers, heads, tokens, dim] buffers, without copying them.

        `grow=True` only for buffers from `new_buffers(total, reserve)` (or `assemble(...,
        reserve=)`): new tokens are then written into the reserved room after them. Never for
        a slice of a longer context, whose next tokens that would overwrite."""
        transformers = require("transformers", "models")
        cache = transformers.DynamicCache()
        if keys is not None:
            for i in range(self.num_layers):
                self.adopt(cache, i, keys[i].unsqueeze(0).expand(batch, -1, -1, -1),
                           values[i].unsqueeze(0).expand(batch, -1, -1, -1), grow=grow)
        return cache

    def adopt(self, cache: Any, layer: int, k: Any, v: Any, grow: bool = False) -> None:
        """Make `k`/`v` [batch, heads, tokens, dim] layer `layer` of `cache` without a copy.

        `DynamicCache.update` would concatenate, i.e. copy the whole context once more
        (gigabytes at 16k tokens of an 8B model). An empty update creates and initialises
        the layer the supported way; the tensors are then handed over. Where a transformers
        version lays its layers out differently, this falls back to `update` (a copy).
        `grow`: see `make_cache`.
        """
        layers = getattr(cache, "layers", None)
        room = (_room(k), _room(v)) if grow else (None, None)
        if isinstance(layers, list) and layer <= len(layers) and room[0] is not None and room[1] is not None:
            # Buffers with spare room after the context (new_buffers(reserve=...)): new tokens
            # are written there instead of concatenated onto a copy of the whole context.
            grown = growing_layer_class()(room[0], room[1], k.shape[-2])
            if layer == len(layers):
                layers.append(grown)
            else:
                layers[layer] = grown
            return
        cache.update(k[:, :, :0], v[:, :, :0], layer)
        lay = cache.layers[layer] if hasattr(cache, "layers") else None
        if lay is not None and getattr(lay, "keys", None) is not None and lay.keys.shape[-2] == 0:
            lay.keys, lay.values = k, v
            if cache.get_seq_length(layer) == k.shape[-2]:
                return
        cache.update(k, v, layer)

    def side_streams(self) -> tuple[Any, Any]:
        """Two CUDA streams on the engine's device beside the current one (copy, compute), made
        on first use and kept: the streamed assembly (`ragcomp.kv.streamed`) runs on them."""
        if self._streams is None:
            self._streams = (self.torch.cuda.Stream(self.device), self.torch.cuda.Stream(self.device))
        return self._streams

    def stacked(self, cache: Any, row: int, start: int, end: int) -> tuple[Any, Any]:
        """Row `row`'s tokens start..end of every layer of `cache`: contiguous keys and values
        [layers, heads, tokens, dim]."""
        k = self.torch.stack([cache.layers[i].keys[row, :, start:end] for i in range(self.num_layers)])
        v = self.torch.stack([cache.layers[i].values[row, :, start:end] for i in range(self.num_layers)])
        return k.contiguous(), v.contiguous()

    def positions(self, start: int, n: int, batch: int = 1) -> Any:
        """Position ids start..start+n on the engine's device, [batch, n]."""
        pos = self.torch.arange(start, start + n, device=self.device)
        return pos.unsqueeze(0).expand(batch, -1)

    # -- encoding --------------------------------------------------------------------------
    def encode_prefix(self, ids: Sequence[int]) -> ChunkKV:
        """The shared prefix, encoded from position 0 and kept at native precision."""
        ids = list(ids)
        if not ids:
            raise ValueError("the shared prefix must have at least one token")
        torch = self.torch
        with self.lock, torch.inference_mode():
            cache = self.make_cache()
            self.decoder(input_ids=torch.tensor([ids], device=self.device), **cache_arg(self.decoder, cache),
                         position_ids=self.positions(0, len(ids)), use_cache=True)
            k, v = self.stacked(cache, 0, 0, len(ids))
        return ChunkKV(ids, k, v, 0, self.fingerprint([], ids, "native"), "native")

    def encode_chunks(self, prefix: ChunkKV, chunks: Sequence[Sequence[int]], batch_size: int = 8,
                      start: int | None = None) -> list[ChunkKV]:
        """Each chunk encoded after the prefix (never after another chunk), in batches.

        `start` places the chunks at another position than right after the prefix (tests
        use it to encode a chunk directly where a moved one will land).
        """
        torch = self.torch
        plen = len(prefix)
        base = plen if start is None else int(start)
        out: list[ChunkKV | None] = [None] * len(chunks)
        # Similar lengths share a batch, so padding stays small.
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
        pk, pv = prefix.dequantized(self.dtype)
        pk, pv = pk.to(self.device), pv.to(self.device)
        pad = int(getattr(self.config, "pad_token_id", None) or 0)
        with self.lock, torch.inference_mode():
            for b0 in range(0, len(order), max(1, batch_size)):
                rows = order[b0 : b0 + max(1, batch_size)]
                lens = [len(chunks[i]) for i in rows]
                if min(lens) == 0:
                    raise ValueError("cannot encode an empty chunk")
                width = max(lens)
                ids = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)
                mask = torch.zeros((len(rows), plen + width), dtype=torch.long, device=self.device)
                mask[:, :plen] = 1
                for r, i in enumerate(rows):
                    ids[r, : lens[r]] = torch.tensor(list(chunks[i]), device=self.device)
                    mask[r, plen : plen + lens[r]] = 1
                cache = self.make_cache(pk, pv, batch=len(rows))
                # Right padding: real tokens never attend to pads; one row needs no mask at all.
                self.decoder(input_ids=ids, attention_mask=None if len(rows) == 1 else mask,
                             position_ids=self.positions(base, width, len(rows)),
                             **cache_arg(self.decoder, cache), use_cache=True)
                for r, i in enumerate(rows):
                    k, v = self.stacked(cache, r, plen, plen + lens[r])
                    qk, qv, ks, vs = quantize(k, v, self.storage)
                    fp = chunk_fingerprint(self.model_fp, self.storage, ids_hash(prefix.ids), list(chunks[i]))
                    out[i] = ChunkKV(list(chunks[i]), qk, qv, base, fp, self.storage, ks, vs)
        return [c for c in out if c is not None]

    # -- assembling ------------------------------------------------------------------------
    def new_buffers(self, total: int, reserve: int = 0) -> tuple[Any, Any]:
        """[layers, heads, total, dim] key and value buffers; with `reserve`, views of buffers
        `reserve` tokens longer, whose room a cache made over them fills before concatenating."""
        shape = (self.num_layers, self.kv_heads, total + max(0, reserve), self.head_dim)
        k = self.torch.empty(shape, dtype=self.dtype, device=self.device)
        v = self.torch.empty(shape, dtype=self.dtype, device=self.device)
        return (k[:, :, :total], v[:, :, :total]) if reserve > 0 else (k, v)

    def place(self, keys: Any, values: Any, chunk: ChunkKV, start: int) -> None:
        """Write `chunk` into the buffers at `start`, keys rotated from chunk.base (fp32 math)."""
        torch = self.torch
        n = len(chunk)
        if chunk.device != self.device:
            chunk = chunk.to(self.device, non_blocking=True)
        k_out, v_out = keys[:, :, start : start + n], values[:, :, start : start + n]
        k = chunk.keys
        if chunk.k_scale is not None:
            k = k.to(torch.float32) * chunk.k_scale
        delta = start - chunk.base
        if delta == 0:
            k_out.copy_(k)
        else:
            cos, sin = rotation(self.inv_freq, delta, self.device)
            h = self.head_dim // 2
            rotate_into(torch, k, cos[:h], sin[:h], k_out)
        if chunk.v_scale is not None:
            v_out.copy_(chunk.values.to(torch.float32) * chunk.v_scale)
        else:
            v_out.copy_(chunk.values)

    def assemble(self, prefix: ChunkKV, chunks: Sequence[ChunkKV | Callable[[], ChunkKV]],
                 lengths: Sequence[int] | None = None,
                 on_rotate: Callable[[float], None] | None = None, reserve: int = 0) -> Assembled:
        """Prefix + chunks laid end to end. Items may be callables returning the chunk, so
        loading the next chunk overlaps rotating this one; `lengths` then sizes the buffers.
        `reserve`: room for that many question and answer tokens after the context."""
        if lengths is None:
            lengths = [len(c) for c in chunks]  # type: ignore[arg-type]
        total = len(prefix) + sum(lengths)
        keys, values = self.new_buffers(total, reserve)
        with self.torch.inference_mode():
            self.place(keys, values, prefix, 0)
            ids = list(prefix.ids)
            spans = [(0, len(prefix))]
            pos = len(prefix)
            for item, n in zip(chunks, lengths, strict=True):
                chunk = item() if callable(item) else item
                if len(chunk) != n:
                    raise ValueError(f"chunk has {len(chunk)} tokens, expected {n}")
                t0 = time.perf_counter()
                self.place(keys, values, chunk, pos)
                if on_rotate is not None:
                    on_rotate(time.perf_counter() - t0)
                ids.extend(chunk.ids)
                spans.append((pos, pos + n))
                pos += n
        return Assembled(keys, values, ids, spans)

    # -- generation ------------------------------------------------------------------------
    def _next_logits(self, cache: Any, ids: Sequence[int], start: int) -> Any:
        torch = self.torch
        with folded_attention(self.model, self.fold):
            out = self.model(input_ids=torch.tensor([list(ids)], device=self.device),
                             **cache_arg(self.model, cache),
                             position_ids=self.positions(start, len(ids)), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def prefill(self, cache: Any, ids: Sequence[int], start: int) -> Any:
        """Next-token logits (float32) after feeding `ids` at positions start.. onto `cache`."""
        with self.lock, self.torch.inference_mode():
            return self._next_logits(cache, ids, start).float()

    def decode(self, cache: Any, first_logits: Any, start: int, max_new_tokens: int,
               stop_ids: Sequence[int]) -> list[int]:
        """Greedy tokens after the prefill (`start`: position of the first new token)."""
        stops = set(stop_ids)
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        tok = int(first_logits.argmax())
        with self.lock, self.torch.inference_mode():
            while True:
                if tok in stops:
                    break
                out.append(tok)
                if len(out) >= max_new_tokens:
                    break
                tok = int(self._next_logits(cache, [tok], start).argmax())
                start += 1
        return out

    def full_prefill(self, ids: Sequence[int]) -> tuple[Any, Any]:
        """(cache, next-token logits) of a plain prefill of `ids` from position 0."""
        cache = self.make_cache()
        return cache, self.prefill(cache, ids, 0)
