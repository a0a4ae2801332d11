"""Train a Provence-style pruner+reranker on (question, passage, sentence labels) JSONL.

Input layout and token labels follow `ragcomp.compressors.provence.model` and are built by the
compressor's own `encode_windows`, so training sees exactly what inference sees:
`[CLS] query [SEP] passage[lo:hi] [SEP]` (token types 0 then 1). Label per token: [CLS], query and
[SEP] 0; a passage token takes the label of the sentence holding its last character (the rule
`ProvenceCompressor` rounds with); padding -100. A passage longer than one window gives one item per
window; a window without the labelled sentence of a positive gets ranking label 0.0 (inference ranks
a passage by its best window). Loss: cross-entropy per token (kept tokens weighted `keep_weight`: they
are ~8% of the labelled tokens, and 1.0, as published, lets a short run settle on "drop everything")
+ `ranking_weight` * MSE of the ranking logit to the record's ranking label (1.0 / 0.0).

Optimiser AdamW (no decay on biases and LayerNorm), linear warmup then linear decay to 0, gradient
clipping at 1.0, bf16 autocast on CUDA. A dev split (whole source articles, so no question is on both
sides) is held out and scored through `ProvenceCompressor` itself: token F1, sentence accuracy/F1 at
the compressor's threshold, target-kept and negative-emptied rates, and ranking accuracy@1 / MRR.
The saved folder (`save_pretrained`, fp16 weights by default) loads with
`ProvenceCompressor(model=out_dir)`; `training.json` beside it holds the exact arguments, the
command, the data file's sha256 and the metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.text import Sentence
from ragcomp.train.provence_data import content_words, file_sha256, meta_path, read_examples
from ragcomp.types import Passage


@dataclass
class Item:
    """One encoder input with its labels; `record` indexes the data record it came from."""

    input_ids: list[int]
    token_type_ids: list[int]
    labels: list[int]
    ranking_label: float
    record: int


def token_labels(offsets: Sequence[tuple[int, int]], spans: Sequence[Sequence[int]],
                 labels: Sequence[int]) -> list[int]:
    """Label of each passage token: that of the sentence holding its last character, else 0."""
    out, k = [], 0
    for a, b in offsets:
        last = b - 1
        while k < len(spans) and spans[k][1] <= last:
            k += 1  # offsets increase, so the sentence index only moves forward
        inside = b > a and k < len(spans) and spans[k][0] <= last < spans[k][1]
        out.append(int(labels[k]) if inside else 0)
    return out


def encode_records(records: Sequence[dict[str, Any]], tok: Any, windower: Any, max_length: int) -> list[Item]:
    """Training items of the records (one per window), labels per the module docstring."""
    q_ids = tok([r["question"] for r in records], add_special_tokens=False, verbose=False)["input_ids"]
    enc = tok([r["text"] for r in records], add_special_tokens=False, return_offsets_mapping=True,
              verbose=False)
    items = []
    for j, rec in enumerate(records):
        passage_labels = token_labels(enc["offset_mapping"][j], rec["sentences"], rec["labels"])
        has_target = any(rec["labels"])
        for w in windower.encode_windows(q_ids[j], enc["input_ids"][j], tok, max_length):
            lab = [0] * w.offset + passage_labels[w.lo:w.hi] + [0]
            rank = float(rec["ranking_label"])
            if has_target and not any(lab):
                rank = 0.0  # this window misses the labelled sentence: nothing here answers
            items.append(Item(w.input_ids, w.token_type_ids, lab, rank, j))
    return items


def collate(items: Sequence[Item], pad_id: int, device: Any) -> dict[str, Any]:
    torch = require("torch", "models")
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)  # padding is ignored
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        types[row, :n] = torch.tensor(it.token_type_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(it.labels)
    rank = torch.tensor([it.ranking_label for it in items], dtype=torch.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
             "ranking_labels": rank}
    return {k: v.to(device) for k, v in batch.items()}


def split_dev(records: Sequence[dict[str, Any]], dev_fraction: float,
              seed: int) -> tuple[list[int], list[int]]:
    """Record indices for train and dev; dev takes whole source articles (with their negatives)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[str(r.get("source", r.get("qid")))].append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_dev = min(len(keys) - 1, math.ceil(dev_fraction * len(keys))) if dev_fraction > 0 else 0
    dev_keys = set(keys[:max(n_dev, 0)])
    train = [i for k in keys if k not in dev_keys for i in groups[k]]
    dev = [i for k in keys if k in dev_keys for i in groups[k]]
    return sorted(train), sorted(dev)


def losses(net: Any, batch: dict[str, Any], ranking_weight: float,
           keep_weight: float) -> tuple[Any, Any, Any]:
    """(loss, token loss, ranking loss) of one batch."""
    torch = require("torch", "models")
    out = net(**batch, ranking_weight=ranking_weight)
    if keep_weight == 1.0:
        return out.loss, out.token_loss, out.ranking_loss
    weight = torch.tensor([1.0, keep_weight], device=out.token_logits.device)
    token = torch.nn.functional.cross_entropy(out.token_logits.reshape(-1, 2).float(),
                                              batch["labels"].reshape(-1), weight=weight, ignore_index=-100)
    return token + ranking_weight * out.ranking_loss, token, out.ranking_loss


def mean_loss(net: Any, items: Sequence[Item], pad_id: int, device: Any, batch_size: int,
              ranking_weight: float, keep_weight: float = 1.0) -> float:
    """Mean loss over items in eval mode (no dropout), weighted by batch size."""
    torch = require("torch", "models")
    was = net.training
    net.eval()
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            with _autocast(device):
                loss = losses(net, collate(chunk, pad_id, device), ranking_weight, keep_weight)[0]
            total += float(loss) * len(chunk)
    net.train(was)
    return total / max(1, len(items))


def evaluate(net: Any, tok: Any, records: Sequence[dict[str, Any]], max_length: int,
             threshold: float = 0.1, batch_size: int = 32) -> dict[str, Any]:
    """Dev metrics through the inference path (`ProvenceCompressor.score_batch`)."""
    from ragcomp.compressors.provence import ProvenceCompressor
    from ragcomp.compressors.provence.inputs import sentence_means

    comp = ProvenceCompressor(model=net, encoder_tokenizer=tok, window=max_length, batch_size=batch_size)
    by_q: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_q[str(r["qid"])].append(r)
    qids = sorted(by_q)
    passages = [[Passage(str(r.get("passage_id", "")), r["text"]) for r in by_q[q]] for q in qids]
    scored = comp.score_batch([by_q[q][0]["question"] for q in qids], passages)
    tp = fp = fn = 0
    s_right = s_total = s_tp = s_fp = s_fn = kept = 0
    target_hits = target_top = lexical_top = targets = empty_neg = negs = 0
    top1 = ranked = 0
    rr = 0.0
    for q, group in zip(qids, scored, strict=True):
        for r, ps in zip(by_q[q], group, strict=True):
            offsets = tok(r["text"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            gold_tok = np.array(token_labels(offsets, r["sentences"], r["labels"]), bool)
            pred_tok = ps.token_probs > 0.5
            tp += int((gold_tok & pred_tok).sum())
            fp += int((~gold_tok & pred_tok).sum())
            fn += int((gold_tok & ~pred_tok).sum())
            sents = [Sentence(r["text"][a:b], a, b) for a, b in r["sentences"]]
            sent_scores = sentence_means(sents, offsets, ps.token_probs)
            keep = sent_scores > threshold
            gold = np.array(r["labels"], bool)
            s_right += int((keep == gold).sum())
            s_total += len(gold)
            s_tp += int((keep & gold).sum())
            s_fp += int((keep & ~gold).sum())
            s_fn += int((~keep & gold).sum())
            kept += int(keep.sum())
            if gold.any():
                targets += 1
                target_hits += int(keep[gold].all())
                target_top += int(gold[int(sent_scores.argmax())])  # threshold-free: best sentence is gold
                # Context for target_top1: the sentence sharing most content words with the question.
                q_words = content_words(r["question"])
                overlap = [len(q_words & content_words(s.text)) for s in sents]
                lexical_top += int(gold[int(np.argmax(overlap))])
            else:
                negs += 1
                empty_neg += int(not keep.any())
        ranks = [ps.ranking if ps.ranking is not None else -math.inf for ps in group]
        pos = [i for i, r in enumerate(by_q[q]) if float(r["ranking_label"]) > 0]
        if pos and len(group) > 1:
            ranked += 1
            place = 1 + sum(ranks[i] > ranks[pos[0]] for i in range(len(ranks)) if i not in pos)
            top1 += int(place == 1)
            rr += 1.0 / place
    return {"records": len(records), "questions": len(qids), "threshold": threshold,
            "token_f1": _f1(tp, fp, fn), "token_precision": tp / max(1, tp + fp),
            "token_recall": tp / max(1, tp + fn),
            "sentence_accuracy": s_right / max(1, s_total), "sentence_f1": _f1(s_tp, s_fp, s_fn),
            "sentence_accuracy_drop_all": 1 - (s_tp + s_fn) / max(1, s_total),  # the trivial baseline
            "sentences_kept": kept / max(1, s_total), "target_kept": target_hits / max(1, targets),
            "target_top1": target_top / max(1, targets), "target_top1_lexical": lexical_top / max(1, targets),
            "negatives_emptied": empty_neg / max(1, negs), "ranking_acc1": top1 / max(1, ranked),
            "ranking_mrr": rr / max(1, ranked), "ranked_questions": ranked}


def read_data_files(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Records of several data files, mixed; with more than one file each qid is prefixed by the
    file's index, so questions of different files never merge (dev split and ranking group by qid)."""
    if not paths:
        raise ValueError("no training data file given")
    records = []
    for k, path in enumerate(paths):
        for rec in read_examples(path):
            if len(paths) > 1:
                rec["qid"] = f"{k}:{rec['qid']}"
            records.append(rec)
    return records


def _data_record(path: str | Path, records: int | None) -> dict[str, Any]:
    """What training.json records of a data file: path, sha256, record count, its .meta.json."""
    meta = meta_path(path)
    out = {"path": str(path), "sha256": file_sha256(path), "records": records,
           "meta": json.loads(meta.read_text()) if meta.is_file() else None}
    return out if records is not None else {k: v for k, v in out.items() if k != "records"}


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / max(1, 2 * tp + fp + fn)


def _autocast(device: Any) -> Any:
    torch = require("torch", "models")
    if str(device).startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_args(epochs: int, batch_size: int, lr: float, max_length: int, dev_fraction: float,
                warmup_ratio: float, keep_weight: float) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 16:
        raise ValueError(f"max_length must be an integer >= 16, got {max_length!r}")
    if not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise ValueError(f"lr must be a number in (0, 1), got {lr!r}")
    if not isinstance(dev_fraction, (int, float)) or not 0 <= dev_fraction <= 0.5:
        raise ValueError(f"dev_fraction must be in [0, 0.5], got {dev_fraction!r}")
    if not isinstance(warmup_ratio, (int, float)) or not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    if not isinstance(keep_weight, (int, float)) or keep_weight <= 0:
        raise ValueError(f"keep_weight must be a positive number, got {keep_weight!r}")


def train(
    data_jsonl: str | Path | Sequence[str | Path], out_dir: str | Path, backbone: str = "minilm",
    epochs: int = 4,
    batch_size: int = 32, lr: float = 1e-4, max_length: int = 256, device: str | None = None,
    seed: int = 0, fp16_save: bool = True, dev_fraction: float = 0.05, warmup_ratio: float = 0.1,
    weight_decay: float = 0.01, ranking_weight: float = 1.0, keep_weight: float = 1.0,
    log_every: int = 50, threshold: float = 0.1,
    overwrite: bool = False, progress: bool = True, command: str | None = None,
) -> dict[str, Any]:
    """Train on `data_jsonl` (one file, or several mixed: `read_data_files`), save to `out_dir`
    (model + tokenizer + training.json); returns the
    training.json content. `backbone`: "minilm" (offline all-MiniLM-L6-v2), a path or a hub id.
    `command`: the command line to record (the CLI passes its own)."""
    # First statement, so locals() holds the arguments only.
    args = {k: str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, (list, tuple)) else v
            for k, v in locals().items() if k != "command"}
    torch = require("torch", "models")
    transformers = require("transformers", "models")
    from ragcomp.compressors.provence import ProvenceCompressor
    from ragcomp.compressors.provence.model import ProvenceModel
    from ragcomp.models import default_device, resolve_model_path

    _check_args(epochs, batch_size, lr, max_length, dev_fraction, warmup_ratio, keep_weight)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    paths = [data_jsonl] if isinstance(data_jsonl, (str, Path)) else list(data_jsonl)
    records = read_data_files(paths)  # fails before any model loads on a bad file
    t0 = time.perf_counter()
    device = device or default_device()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    backbone_path = resolve_model_path(backbone)
    tok = transformers.AutoTokenizer.from_pretrained(backbone_path)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"backbone {backbone!r}: a fast tokenizer is needed (character offsets)")
    net = ProvenceModel.from_backbone(backbone_path, token_labels=2).float().to(device)
    limit = int(getattr(net.backbone_config, "max_position_embeddings", 512) or 512)
    if max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the backbone's {limit} positions")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    windower = ProvenceCompressor(model=net, encoder_tokenizer=tok, window=max_length)
    train_idx, dev_idx = split_dev(records, dev_fraction, seed)
    train_recs = [records[i] for i in train_idx]
    dev_recs = [records[i] for i in dev_idx]
    items = encode_records(train_recs, tok, windower, max_length)
    if not items:
        raise ValueError(f"{data_jsonl}: no training example has a passage token")
    probe = random.Random(seed).sample(items, min(256, len(items)))  # fixed subset: loss before/after
    metrics: dict[str, Any] = {"train_loss_before": mean_loss(net, probe, pad_id, device, batch_size,
                                                              ranking_weight, keep_weight)}
    if dev_recs:
        metrics["dev_before"] = evaluate(net, tok, dev_recs, max_length, threshold, batch_size * 2)

    decay = [p for n, p in net.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in net.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, int(warmup_ratio * total)) if warmup_ratio > 0 else 0

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    history: list[dict[str, Any]] = []
    rng = random.Random(seed)
    step, run = 0, defaultdict(float)
    net.train()
    for epoch in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            batch = collate([items[i] for i in order[s:s + batch_size]], pad_id, device)
            with _autocast(device):
                loss, token_loss, ranking_loss = losses(net, batch, ranking_weight, keep_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            for key, value in (("loss", loss), ("token_loss", token_loss), ("ranking_loss", ranking_loss)):
                run[key] += float(value.detach())
            run["n"] += 1
            if step % max(1, log_every) == 0 or step == total:
                row = {"step": step, "epoch": epoch + 1, "lr": sched.get_last_lr()[0],
                       "seconds": round(time.perf_counter() - t0, 1),
                       **{k: run[k] / run["n"] for k in ("loss", "token_loss", "ranking_loss")}}
                history.append(row)
                run = defaultdict(float)
                if progress:
                    print(f"step {step}/{total} epoch {epoch + 1} loss {row['loss']:.4f} (token "
                          f"{row['token_loss']:.4f}, ranking {row['ranking_loss']:.4f}) lr {row['lr']:.2e} "
                          f"{row['seconds']:.0f}s", file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - t0
    metrics["train_loss_after"] = mean_loss(net, probe, pad_id, device, batch_size, ranking_weight,
                                            keep_weight)
    if dev_recs:
        metrics["dev_after"] = evaluate(net, tok, dev_recs, max_length, threshold, batch_size * 2)
        if progress:
            print("dev:", json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in metrics["dev_after"].items()}), file=sys.stderr)

    net.eval().to("cpu")
    if fp16_save:
        net.half()  # a few tens of MB for MiniLM; from_pretrained casts back to the dtype asked for
    tok.model_max_length = max_length  # inference windows then match the training length
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, tokenizer=tok)
    report = {
        "format": "ragcomp-provence training record", "args": args, "backbone_path": str(backbone_path),
        "command": command,
        "data": _data_record(paths[0], len(records)) if len(paths) == 1 else
        {"files": [_data_record(p, None) for p in paths], "records": len(records)},
        "split": {"train_records": len(train_recs), "dev_records": len(dev_recs), "train_items": len(items),
                  "dev_sources": sorted({str(r.get("source", r.get("qid"))) for r in dev_recs})},
        "steps": total, "device": str(device), "autocast": "bf16" if str(device).startswith("cuda") else None,
        "train_seconds": round(train_seconds, 1), "history": history, "metrics": metrics,
        "weights": {"dtype": "float16" if fp16_save else "float32",
                    "bytes": (out / "model.safetensors").stat().st_size,
                    "sha256": file_sha256(out / "model.safetensors")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    (out / "training.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report
