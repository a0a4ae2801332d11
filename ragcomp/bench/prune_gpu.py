"""`ragcomp bench prune-gpu`: latency of a Provence pruner with DeBERTa-v3-large's shape against
the `llmlingua` package's LLMLingua-2 compressor with an XLM-RoBERTa-large-shaped token classifier,
on the same questions and passages, in one run. Random weights: timing only (decisions are noise).

Provence rows, per dtype: `hf` (transformers' DeBERTa forward, eager), `fast` (deberta_fast's
forward on the same parameters, eager), `graphs` (the fast forward replayed from CUDA graphs;
CUDA only), `cbias-graphs` (graphs, `fast_encoder="sdpa-compiled"`: each whole layer compiled by
inductor, bias add included), `flex` and
`flex-graphs` (the same two with FlexAttention adding the relative terms
inside the kernel, see deberta_flex.py; compiled per shape during the warm-up pass). Every row
first runs as many other questions untimed (kernels, compilation, CUDA graph captures), then
times each question end to end (`compress`); `graphs_in_timed` counts the shapes first met in the
timed pass (each captured, or compiled, inside a timed question). `max_dprob_vs_hf` is the largest
keep-probability difference to the `hf` row of the same dtype on the first question. A second
table times the CPU-side steps alone (tokenising, windows, sentences, batch arrays).

Passages are cut one after another from the joined corpus, `--words` words each: no passage comes
back, in the timed questions or between them and the warm-up ones. Every row is cold: the
compressor's passage cache is off. One extra row (`... corpus prepared`, the last path) warms up
like the others, then `prepare`s the timed questions' passages, as a user does for a corpus: its
timed questions are new, their passages already tokenised and split.

`--profile N` then records N questions of each path under torch.profiler and prints, per question,
the CPU and GPU (CUDA) time of the compressor's named ranges (provence.tokenize, .windows,
.batch_arrays, .forward, graphs.copy_in/.replay/.copy_out, .d2h, .sentences, .wait, .sentence_means,
.select) and the GPU kernels that take the most time; `--trace DIR` also writes Chrome traces.

LLMLingua-2 counts tokens with tiktoken's cl100k_base, whose BPE file tiktoken downloads unless
it is in TIKTOKEN_CACHE_DIR: `--tiktoken-cache DIR` names a folder holding it (file name: the
SHA-1 of its URL, 9b5ad71b2ce5302211f9c61530b329a4922fc6a4, 1.7 MB); by default the copy that
llama-index-core ships is used when installed.

    ragcomp bench prune-gpu --questions 20 --passages 20 --words 150      # on a CUDA machine
    ragcomp bench prune-gpu --small --device cpu                           # a quick dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp.bench import print_table, standalone_main
from ragcomp.bench.common import DATA

# Each path's `fast_encoder` value (HF's forward, the fast one with SDPA, its compiled bias add, or
# FlexAttention); a name ending in "graphs" also replays CUDA graphs.
FAST_ENCODER: dict[str, bool | str] = {"hf": False, "fast": True, "graphs": True,
                                       "cbias-graphs": "sdpa-compiled", "flex": "flex", "flex-graphs": "flex"}
PATHS = tuple(FAST_ENCODER)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune-gpu", help="Provence (DeBERTa-v3-large shape) vs LLMLingua-2 latency",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--passages", type=int, default=20, help="passages per question")
    p.add_argument("--words", type=int, default=150, help="words per passage")
    p.add_argument("--qa", default=str(DATA / "qa_dev.jsonl"))
    p.add_argument("--wiki", default=str(DATA / "wiki_summaries_en.json"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a dry run of the code path)")
    p.add_argument("--skip-llmlingua", action="store_true")
    p.add_argument("--cpu-side-only", action="store_true",
                   help="only the table of CPU-side steps (no model, no GPU needed)")
    p.add_argument("--paths", default="hf,fast,graphs",
                   help=f"Provence forwards to time, of {','.join(PATHS)} (*graphs: CUDA only)")
    p.add_argument("--dtypes", default=None, help="e.g. bf16,fp32 (default: both on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width-multiple", type=int, default=16, help="CUDA graph widths rounded to this")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="record N questions per path under torch.profiler and print where the time goes")
    p.add_argument("--trace", default=None, metavar="DIR", help="with --profile: Chrome traces here")
    p.add_argument("--tiktoken-cache", default=None, metavar="DIR",
                   help="folder with tiktoken's cl100k_base file (LLMLingua-2 row; no download)")


def _inputs(args: argparse.Namespace, warm_up: bool = False) -> list[tuple[str, list[str]]]:
    """Each question with `passages` passages of `words` words, cut one after another from the wiki
    corpus (joined), so no passage comes back in another question. `warm_up`: the next
    `questions` questions, with passages after those of the timed ones (nothing shared with them)."""
    qs = [json.loads(x)["question"] for x in Path(args.qa).read_text().splitlines() if x.strip()]
    wiki = json.loads(Path(args.wiki).read_text())
    words = " ".join(v["extract"] if isinstance(v, dict) else str(v) for v in wiki.values()).split()
    n_passages = len(words) // args.words
    first = args.questions if warm_up else 0
    if (first + args.questions) * args.passages > n_passages or first + args.questions > len(qs):
        raise SystemExit(f"--questions {args.questions} x --passages {args.passages} (and as many to "
                         f"warm up) need more than the {n_passages} passages of {args.words} words or "
                         f"the {len(qs)} questions there are")
    out = []
    for i in range(first, first + args.questions):
        start = i * args.passages * args.words
        out.append((qs[i], [" ".join(words[start + k * args.words : start + (k + 1) * args.words])
                            for k in range(args.passages)]))
    return out


def _time(fn: Any, items: list[Any], sync: Any) -> list[float]:
    """Seconds of each `fn(item)`, synchronised; callers warm up first (on other questions)."""
    times = []
    for it in items:
        sync()
        t = time.perf_counter()
        fn(it)
        sync()
        times.append(time.perf_counter() - t)
    return times


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from ragcomp.models import minilm_path, resolve_dtype

    if args.tiktoken_cache and not args.skip_llmlingua:
        _use_tiktoken_cache(args.tiktoken_cache)  # checked first: a wrong folder fails before the long rows
    dev = args.device
    on_gpu = dev.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    items, warm = _inputs(args), _inputs(args, warm_up=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))  # any tokenizer: random weights
    if args.cpu_side_only:
        print_table(_cpu_side(items, warm, tok), "CPU-side work per question, alone (no model)")
        return 0
    size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
            if args.small else dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096))
    deberta = transformers.DebertaV2Config(
        vocab_size=128100, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1, position_biased_input=False, pooler_hidden_size=size["hidden_size"],
        pooler_hidden_act="gelu", **size)
    names = args.dtypes or ("bf16,fp32" if on_gpu else "fp32")
    dtypes = [resolve_dtype(d.strip(), dev) for d in names.split(",")]
    paths = [x.strip() for x in args.paths.split(",") if not x.strip().endswith("graphs") or on_gpu]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    rows = []
    for dtype in dtypes:
        rows += _provence_rows(args, deberta, dtype, paths, items, warm, tok, sync)
    if args.profile:
        from ragcomp.bench.prune_gpu_profile import profile_paths

        profile_paths(args, deberta, dtypes[0], paths, items, warm, tok, sync, _compressor)
    if not args.skip_llmlingua:
        rows += _llmlingua(args, items, warm, size, tok, dev, sync)
    base = rows[-1]["p50_ms"] if len(rows) > 1 and "llmlingua" in rows[-1]["compressor"] else None
    for r in rows:
        r["x_faster_than_llmlingua2"] = round(base / r["p50_ms"], 2) if base and r.get("p50_ms") else None
    name = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    shapes = "tiny" if args.small else "large"
    print_table(rows, f"Pruner latency per question ({name}; {args.questions} questions x {args.passages} "
                f"passages of {args.words} words; random weights, {shapes} shapes; batch {args.batch_size}; "
                f"widths to multiples of {args.width_multiple})")
    cpu_rows = _cpu_side(items, warm, tok)
    print_table(cpu_rows, "CPU-side work per question, alone (no model)")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": rows, "cpu_side": cpu_rows}, indent=2))
    return 0


def _provence_rows(args: argparse.Namespace, config: Any, dtype: Any, paths: list[str], items: list[Any],
                   warm: list[Any], tok: Any, sync: Any) -> list[dict[str, Any]]:
    import torch

    from ragcomp.compressors.provence.model import ProvenceModel

    dev, on_gpu = args.device, args.device.startswith("cuda")
    torch.manual_seed(0)
    model = ProvenceModel(config).to(dev, dtype).eval()
    label = str(dtype).split(".")[-1]
    rows, reference = [], None
    # Cold rows (no passage cache), then the last path again with the timed passages prepared
    # ahead (`prepare`, as for a corpus), in a cache that holds them all.
    prepared_cache = len(items) * args.passages
    for path, cache in [(p, 0) for p in paths] + [(paths[-1], prepared_cache)]:
        name = f"ragcomp provence {path} ({label}){' corpus prepared' if cache else ''}"
        try:
            row, probs = _provence_row(model, tok, args, path, cache, items, warm, sync, name)
        except Exception as e:  # one failing path (e.g. flex without Triton) must not lose the others
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed = _row(f"{name} FAILED: {type(e).__name__}: {str(e)[:120]}", [0.0], args)
            rows.append({k: v if k == "compressor" else None for k, v in failed.items()})
            continue
        reference = probs if reference is None else reference
        row["max_dprob_vs_hf"] = float(np.abs(probs - reference).max()) if path != "hf" else None
        rows.append(row)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    return rows


def _provence_row(model: Any, tok: Any, args: argparse.Namespace, path: str, cache: int, items: list[Any],
                  warm: list[Any], sync: Any, name: str) -> tuple[dict[str, Any], Any]:
    """One path's timed row, and its keep probabilities on the first question."""
    import torch

    on_gpu = args.device.startswith("cuda")
    comp = _compressor(model, tok, args, path, cache)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    def n_graphs() -> int | None:  # this path's runner only (its key starts with (fast_encoder, True))
        runners = model.__dict__.get("_ragcomp_runners", {}).get("runners", {})  # made on first use
        return sum(len(r.graphs) for key, r in runners.items()
                   if key[:2] == (comp.fast_encoder, True)) if comp.cuda_graphs else None

    t0 = time.perf_counter()
    for it in warm:  # kernels, allocator, one CUDA graph (and compile) per shape
        comp.compress(*it)
    warmup_s = time.perf_counter() - t0
    if cache:  # the timed questions are new; their passages were prepared like a corpus
        comp.prepare(p for _, ps in items for p in ps)
    before = n_graphs()
    lookups = comp.passage_cache.hits, comp.passage_cache.misses
    times = _time(lambda it, c=comp: c.compress(it[0], it[1]), items, sync)
    hits, misses = comp.passage_cache.hits - lookups[0], comp.passage_cache.misses - lookups[1]
    row = _row(name, times, args)
    row.update(width_split(times, _widest_windows(comp, items)))
    row["warmup_s"] = round(warmup_s, 2)
    row["cache_hits"] = round(hits / max(hits + misses, 1), 3)  # share of timed passages seen before
    probs = np.concatenate([s.token_probs for s in comp.score(*items[0])])
    row["max_dprob_vs_hf"] = None  # filled by the caller (column order)
    row["graphs"] = n_graphs()
    # Shapes first seen in the timed pass: each a capture (and a compile) inside a timed question.
    row["graphs_in_timed"] = None if before is None else n_graphs() - before
    row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if on_gpu else None
    return row, probs


# cuDNN's flash attention takes query tiles of 128 rows: a batch wider than 256 tokens runs a third
# tile per layer (about 1.7 ms more for DeBERTa-v3-large at 20 passages on an H100), so a p50 over
# questions sits on one side of that step or the other depending on the share of wide questions.
WIDE_TOKENS = 256


def width_split(times: list[float], widths: list[int], limit: int = WIDE_TOKENS) -> dict[str, Any]:
    """The share of questions whose widest window is over `limit` tokens, and the p50 (ms) of the
    questions on each side (None for a side with no question)."""
    if len(times) != len(widths):
        raise ValueError(f"{len(times)} times for {len(widths)} widths")
    sides = ([t for t, w in zip(times, widths, strict=True) if w <= limit],
             [t for t, w in zip(times, widths, strict=True) if w > limit])
    p50s = [round(statistics.median(side) * 1e3, 2) if side else None for side in sides]
    return {"wide_share": round(len(sides[1]) / max(len(widths), 1), 3),
            "p50_ms_narrow": p50s[0], "p50_ms_wide": p50s[1]}


def _widest_windows(comp: Any, items: list[Any]) -> list[int]:
    """Each question's widest window in tokens (what its batch is padded to, before bucketing)."""
    from ragcomp.compressors.provence.inputs import encode_ids

    net, tok, _ = comp.load()
    size = comp.window_size(net, tok)
    out = []
    for q, passages in items:
        ids = encode_ids(tok, [q, *passages])
        out.append(max(len(w.input_ids) for p_ids in ids[1:]
                       for w in comp.encode_windows(ids[0], p_ids, tok, size)))
    return out


def _compressor(model: Any, tok: Any, args: argparse.Namespace, path: str, cache: int) -> Any:
    from ragcomp.compressors.provence import ProvenceCompressor

    fast = FAST_ENCODER[path]
    return ProvenceCompressor(model, encoder_tokenizer=tok, device=args.device, batch_size=args.batch_size,
                              fast_encoder=fast, cuda_graphs=path.endswith("graphs"), passage_cache=cache,
                              graph_width_multiple=args.width_multiple)


def _cpu_side(items: list[Any], warm: list[Any], tok: Any) -> list[dict[str, Any]]:
    """The compressor's CPU-side steps per question on CUDA, each timed alone (median over the
    questions): the first three run before the launch, the fourth while the GPU computes."""
    from ragcomp.compressors.provence import ProvenceCompressor
    from ragcomp.compressors.provence.inputs import (
        Window,
        add_offsets,
        batch_inputs,
        encode_ids,
        encode_texts,
        token_sentences,
    )
    from ragcomp.text import split_sentences

    comp = ProvenceCompressor("unused", encoder_tokenizer=tok)
    for q, passages in warm:  # as the compressor's warm-up: the wrapper's first call, the thread pool
        encode_ids(tok, [q, *passages])
    lock = threading.Lock()
    names = ("token ids (before launch)", "windows (before launch)", "batch arrays (before launch)",
             "offsets + sentences (overlapped)", "for comparison: ids + offsets in one pass")
    steps: dict[str, list[float]] = {name: [] for name in names}
    for q, passages in items:
        t0 = time.perf_counter()
        ids = encode_ids(tok, [q, *passages])  # one call, as the compressor does on CUDA
        q_ids, p_ids = ids[0], ids[1:]
        t1 = time.perf_counter()
        windows: list[Window] = [w for ids in p_ids for w in comp.encode_windows(q_ids, ids, tok, 512)]
        t2 = time.perf_counter()
        batch_inputs(windows, 0, 8)
        t3 = time.perf_counter()
        fresh: dict[int, tuple[list[int], Any]] = {j: (p, None) for j, p in enumerate(p_ids)}
        add_offsets(tok, lock, passages, fresh)  # the compressor's second pass, checked the same way
        for text, (_, offs) in zip(passages, fresh.values(), strict=True):
            token_sentences(split_sentences(text), offs)
        t4 = time.perf_counter()
        for name, dt in zip(names[:4], (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[name].append(dt * 1e3)
        t5 = time.perf_counter()
        encode_texts(tok, [q, *passages])  # the previous way: ids and offsets before the launch
        steps["for comparison: ids + offsets in one pass"].append((time.perf_counter() - t5) * 1e3)
    rows = [{"step": k, "p50_ms": round(statistics.median(v), 2)} for k, v in steps.items()]
    rows.insert(3, {"step": "before launch, total", "p50_ms": round(sum(r["p50_ms"] for r in rows[:3]), 2)})
    return rows


def _llmlingua(args: argparse.Namespace, items: list[Any], warm: list[Any], size: dict[str, int], tok: Any,
               dev: str, sync: Any) -> list[dict[str, Any]]:
    from ragcomp.tokens import point_tiktoken_at_offline_files

    point_tiktoken_at_offline_files()  # llmlingua loads cl100k at start; no network here
    try:
        from llmlingua import PromptCompressor
    except ImportError as e:
        print(f"llmlingua not importable ({e}); its row is skipped", file=sys.stderr)
        return []
    import transformers

    cfg = transformers.XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
                                        num_labels=2, **size)
    with tempfile.TemporaryDirectory() as root:
        # llmlingua picks its word-merging rule from the model's name; the stand-in tokenizer is
        # WordPiece (no XLM-R sentencepiece file offline), so the name selects the WordPiece rule.
        tmp = str(Path(root) / "xlm-roberta-large-shape-bert-base-multilingual-cased-tokenizer")
        transformers.AutoModelForTokenClassification.from_config(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        pc = PromptCompressor(model_name=tmp, use_llmlingua2=True, device_map=dev)

        def go(it: tuple[str, list[str]]) -> Any:
            return pc.compress_prompt(it[1], rate=0.33, force_tokens=["\n", "?"])

        for it in warm:
            go(it)
        times = _time(go, items, sync)
    dtype = str(next(pc.model.parameters()).dtype).split(".")[-1]
    return [_row(f"llmlingua 0.2 LLMLingua-2 ({dtype})", times, args)]


CL100K_FILE = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"  # sha1 of tiktoken's cl100k_base URL


def _use_tiktoken_cache(folder: str) -> None:
    """Point tiktoken at `folder`, which must hold cl100k_base (else tiktoken would try to download)."""
    path = Path(folder).resolve()
    if not (path / CL100K_FILE).is_file():
        raise SystemExit(f"--tiktoken-cache {folder}: no {CL100K_FILE} (cl100k_base) there; copy it from "
                         "llama_index/core/_static/tiktoken_cache/ of an installed llama-index-core")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path)


def _row(name: str, times: list[float], args: argparse.Namespace) -> dict[str, Any]:
    ms = sorted(t * 1e3 for t in times)
    return {"compressor": name, "p50_ms": round(statistics.median(ms), 2),
            "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2), "questions": len(ms),
            "passages_per_q": args.passages}


def main(argv: list[str] | None = None) -> int:
    return standalone_main("python -m ragcomp.bench.prune_gpu", __doc__, _arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
