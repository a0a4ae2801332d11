"""Token-level work for KV page retrieval (RetroLM-style), free of text and stores.

A long document is encoded once after the shared prefix by chunked prefill (each chunk
attends to the prefix and every earlier token, so no step needs the whole document's
attention at once), then cut into fixed pages. Pages are scored against a question
without training:

- attention: the question's query vectors (prefix + question, no document) at a few
  layers against every document key at those layers, with RoPE taken out of both. That is
  exactly what attention computes when query and key sit at the same position (InfLLM
  puts its memory units at one position for the same reason), so a page's score is the
  softmax mass it draws, free of RoPE's preference for near tokens. Only these "score
  keys" (a few layers, fp16) are read to score; the pages themselves stay in the store.
- embedding: cosine of the question's and each page text's embedding (FAISS).
- hybrid: the mean of both scores after z-normalising each over the document's pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragcomp._optional import require
from ragcomp.hf_cache import cache_arg
from ragcomp.kv.codec import ChunkKV, quantize
from ragcomp.kv.engine_core import EngineCore
from ragcomp.kv.fingerprint import chunk_fingerprint, ids_hash
from ragcomp.kv.ops import StopForward, rotate_into, stop_forward

SCORINGS = ("attention", "embedding", "hybrid")


NULL_QUESTION = "What is this about?"


def default_score_layers(num_layers: int) -> list[int]:
    """Four layers spread over the upper 60% of the depth. On SmolLM2, layers below ~40%
    attend mostly to function words and the first document tokens whatever is asked; the
    upper layers' attention follows the question's content."""
    picks = {max(0, min(num_layers - 1, int(num_layers * f))) for f in (0.44, 0.61, 0.78, 0.94)}
    return sorted(picks)


def check_score_layers(engine: EngineCore, layers: Sequence[int]) -> list[int]:
    out = sorted({int(x) for x in layers})
    if not out or out[0] < 0 or out[-1] >= engine.num_layers:
        raise ValueError(f"score layers must be within 0..{engine.num_layers - 1}, got {list(layers)}")
    return out


def page_bounds(n_tokens: int, page_tokens: int) -> list[tuple[int, int]]:
    """(start, end) of each page; the last one may be shorter."""
    if page_tokens < 1:
        raise ValueError(f"page_tokens must be >= 1, got {page_tokens}")
    return [(s, min(s + page_tokens, n_tokens)) for s in range(0, n_tokens, page_tokens)]


def page_fingerprint(engine: EngineCore, prefix_ids: Sequence[int], doc_ids: Sequence[int],
                     start: int, end: int) -> str:
    """A page's KV depends on the prefix and on every document token before it: both go into
    the hash that chunk fingerprints give to 'what came before'."""
    before = ids_hash(list(prefix_ids) + list(doc_ids[:start]))
    return chunk_fingerprint(engine.model_fp, engine.storage, "page:" + before, list(doc_ids[start:end]))


def encode_document(engine: EngineCore, prefix: ChunkKV, doc_ids: Sequence[int], prefill_chunk: int = 1024
                    ) -> tuple[Any, Any]:
    """(keys, values) [layers, kv_heads, tokens, dim] of the document encoded after `prefix`,
    `prefill_chunk` tokens per forward pass, at positions len(prefix)... (native dtype)."""
    torch = engine.torch
    doc_ids = list(doc_ids)
    if not doc_ids:
        raise ValueError("cannot encode an empty document")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    plen = len(prefix)
    total = plen + len(doc_ids)
    limit = getattr(engine.config, "max_position_embeddings", None)
    if limit and total > int(limit):
        raise ValueError(f"document of {len(doc_ids)} tokens after a {plen}-token prefix needs {total} "
                         f"positions; the model was trained for {limit}. Use a model with a longer window")
    engine.check_length(total)
    pk, pv = prefix.dequantized(engine.dtype)
    with engine.lock, torch.inference_mode():
        cache = engine.make_cache(pk.to(engine.device), pv.to(engine.device))
        for s in range(0, len(doc_ids), prefill_chunk):
            part = doc_ids[s : s + prefill_chunk]
            engine.decoder(input_ids=torch.tensor([part], device=engine.device),
                           **cache_arg(engine.decoder, cache),
                           position_ids=engine.positions(plen + s, len(part)), use_cache=True)
        return engine.stacked(cache, 0, plen, total)


def split_pages(engine: EngineCore, prefix_ids: Sequence[int], doc_ids: Sequence[int], keys: Any, values: Any,
                page_tokens: int) -> list[ChunkKV]:
    """One stored-form ChunkKV per page (own memory, in the engine's storage kind)."""
    plen = len(prefix_ids)
    out = []
    for s, e in page_bounds(len(doc_ids), page_tokens):
        qk, qv, ks, vs = quantize(keys[:, :, s:e].clone(), values[:, :, s:e].clone(), engine.storage)
        out.append(ChunkKV(list(doc_ids[s:e]), qk, qv, plen + s,
                           page_fingerprint(engine, prefix_ids, doc_ids, s, e), engine.storage, ks, vs))
    return out


def unrotated(engine: EngineCore, keys: Any, start: int) -> Any:
    """Keys [..., tokens, dim] encoded at positions start.. rotated back to position 0 (fp32)."""
    torch = engine.torch
    n = keys.shape[-2]
    pos = torch.arange(start, start + n, device=keys.device, dtype=torch.float64)
    ang = -pos[:, None] * engine.inv_freq.to(device=keys.device, dtype=torch.float64)[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    out = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    rotate_into(torch, keys.float(), cos, sin, out)
    return out


def score_keys(engine: EngineCore, keys: Any, layers: Sequence[int], start: int) -> Any:
    """What attention scoring reads: keys of `layers` without RoPE, fp16,
    [len(layers), heads, tokens, dim]."""
    idx = list(layers)
    return unrotated(engine, keys[idx], start).to(engine.torch.float16)


def question_queries(engine: EngineCore, prefix: ChunkKV, ids: Sequence[int], layers: Sequence[int]) -> Any:
    """Query vectors without RoPE of `ids` read after the prefix, at `layers`:
    [len(layers), attention_heads, tokens, dim], float32. The forward stops after the
    deepest layer asked for."""
    torch = engine.torch
    ids = list(ids)
    if not ids:
        raise ValueError("the question has no tokens to score pages with")
    layers = list(layers)
    captured: dict[int, Any] = {}
    hooks = []

    def grab(layer: int) -> Any:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            captured[layer] = out.detach()

        return hook

    pk, pv = prefix.dequantized(engine.dtype)
    with engine.lock, torch.inference_mode():
        for layer in layers:
            attn = engine.decoder.layers[layer].self_attn
            # Qwen3 normalises queries per head after the projection: read them after that norm.
            mod = getattr(attn, "q_norm", None) or attn.q_proj
            hooks.append(mod.register_forward_hook(grab(layer)))
        hooks.append(engine.decoder.layers[max(layers)].register_forward_hook(stop_forward))
        try:
            cache = engine.make_cache(pk.to(engine.device), pv.to(engine.device))
            engine.decoder(input_ids=torch.tensor([ids], device=engine.device),
                           **cache_arg(engine.decoder, cache),
                           position_ids=engine.positions(len(prefix), len(ids)), use_cache=True)
        except StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
    dim = engine.head_dim
    # q_proj output [1, tokens, heads * dim] (q_norm's is [1, tokens, heads, dim]): to [heads, tokens, dim]
    return torch.stack([captured[x].reshape(len(ids), -1, dim).transpose(0, 1).float() for x in layers])


def attention_token_mass(queries: Any, prefix_keys: Any, doc_keys: Any) -> Any:
    """Softmax mass each document token draws from the queries, averaged over layers, heads
    and query tokens. queries [L, Hq, Tq, D]; prefix_keys [L, H, P, D] and doc_keys
    [L, H, T, D], all without RoPE. The prefix stays in the softmax (it holds the attention
    sink) but its mass is no token's. Returns float32 [T]."""
    torch = require("torch", "models")
    n_layers, hq, tq, dim = queries.shape
    heads = doc_keys.shape[1]
    plen, tokens = prefix_keys.shape[2], doc_keys.shape[2]
    mass = torch.zeros(tokens, dtype=torch.float32, device=doc_keys.device)
    group = hq // heads
    for li in range(n_layers):
        k = torch.cat([prefix_keys[li], doc_keys[li]], dim=1).float()  # [H, P + T, D]
        q = queries[li].to(k.device).reshape(heads, group * tq, dim)  # query heads of one KV head together
        logits = torch.matmul(q, k.transpose(1, 2)) * dim**-0.5  # [H, group * Tq, P + T]
        mass += logits.softmax(-1)[:, :, plen:].sum(dim=(0, 1))
    return mass / (n_layers * hq * tq)


def attention_page_scores(mass: Any, prior: Any, page_tokens: int, top: int = 8) -> Any:
    """Page scores from token masses: the question's mass minus the mass a content-free
    question draws (`prior`: same shape), summed over each page's `top` tokens. Without
    the prior, tokens every query attends to (sinks, 'the', full stops, the first tokens
    after the prefix) win whatever is asked; with it, pages holding the question's words
    do (on 20 qa_dev questions at 1.5k tokens: evidence kept 16/20 against 9/20)."""
    torch = require("torch", "models")
    diff = (mass - prior).float()
    n_pages = -(-diff.numel() // page_tokens)
    padded = torch.zeros(n_pages * page_tokens, dtype=torch.float32, device=diff.device)
    padded[: diff.numel()] = diff
    k = min(top, page_tokens)
    return padded.view(n_pages, page_tokens).topk(k, dim=-1).values.sum(-1).cpu()


def zscore(x: Any) -> Any:
    sd = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / sd if float(sd) > 0 else x - x.mean()


def combine(attention: Any, embedding: Any) -> Any:
    """The hybrid score: mean of the two z-normalised scores."""
    return (zscore(attention.float()) + zscore(embedding.float())) / 2


def select_pages(scores: Sequence[float], lengths: Sequence[int], budget: int | None) -> list[int]:
    """Page indices to keep, in document order: the last page always, then the best-scored
    pages while they fit in `budget` tokens (None: every page). A budget smaller than the
    last page keeps that page alone (never less than one page)."""
    n = len(lengths)
    if n == 0:
        return []
    if budget is None or budget >= sum(lengths):
        return list(range(n))
    if len(scores) != n:
        raise ValueError(f"{len(scores)} page scores for {n} pages")
    kept = {n - 1}
    left = budget - lengths[-1]
    for i in sorted(range(n - 1), key=lambda j: (-float(scores[j]), j)):
        if lengths[i] <= left:
            kept.add(i)
            left -= lengths[i]
    return sorted(kept)
