"""Train the xrag projector (retriever embedding -> one LLM input embedding); LLM and retriever frozen.

Two stages as in xRAG (Cheng et al., 2024), data from `ragcomp.train.xrag_data` (Wikipedia corpus,
evaluation titles and questions excluded):

1. paraphrase pretraining: from the projected embedding alone, the frozen LLM must reproduce the
   document (cross-entropy on the document's tokens);
2. context-aware tuning with self-distillation: the frozen LLM reading the documents as text is the
   teacher of the same LLM reading one token per document: cross-entropy on the answer plus
   `kl_weight` * KL(teacher || student) over the answer tokens.

Document embeddings come from the retriever's FAISS index (`CorpusRetriever.for_corpus`): the same
vectors xrag reads at question time. Only the projector (~0.55M parameters for MiniLM -> SmolLM2)
trains: AdamW, linear warmup then cosine decay, gradient clipping at 1.0, bf16 autocast on CUDA.
The saved folder (`Projector.save`: config.json + projector.safetensors, fp32) loads with
`XragCompressor(projector=out_dir)`; training.json holds the arguments, the command, the losses
before/after on held-out documents and the loss curve.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragcomp._optional import require
from ragcomp.train.xrag_data import (
    PARAPHRASE_PROMPTS,
    QAExample,
    documents,
    file_questions,
    template_questions,
    with_neighbours,
)

STAGES = ("1", "2", "both")


def _batch(rows: Sequence[tuple[list[int], list[int]]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask and labels (-100 on the prompt and padding)."""
    torch = require("torch", "models")
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (seq, lab) in enumerate(rows):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        labels[r, :len(seq)] = torch.tensor(lab)
    return ids.to(device), mask.to(device), labels.to(device)


def _shifted(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Logits that predict each labelled token, and those tokens, flattened in reading order."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return logits[keep].float(), labels[keep]


class _Trainer:
    """Holds the frozen LLM, the documents with their retrieval vectors, and the projector."""

    def __init__(self, lm: Any, docs: list[Any], vectors: np.ndarray, neighbours: list[list[int]],
                 projector: Any, device: Any, max_target_tokens: int, max_answer_tokens: int) -> None:
        from ragcomp.compressors.xrag.model import placeholder_id

        self.lm, self.docs, self.neighbours = lm, docs, neighbours
        self.projector, self.device = projector, device
        torch = require("torch", "models")
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
        tok = lm.tokenizer
        self.pid = placeholder_id(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos = tok.eos_token_id
        enc = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
        self.targets = [[*ids[:max_target_tokens], self.eos] for ids in enc]
        self.max_answer_tokens = max_answer_tokens
        self.max_docs = 1

    def _student(self, ids: Any, mask: Any, vec_rows: list[int]) -> Any:
        from ragcomp.compressors.xrag.model import splice

        projected = self.projector(self.vectors[vec_rows])
        embeds = splice(self.lm.model, ids, projected, self.pid, mask)
        return self.lm.model(inputs_embeds=embeds, attention_mask=mask).logits

    def paraphrase_loss(self, doc_idx: Sequence[int], rng: random.Random) -> Any:
        from ragcomp.compressors.xrag.model import chat_with_placeholders

        torch = require("torch", "models")
        rows = []
        for i in doc_idx:
            prompt = chat_with_placeholders(self.lm.tokenizer, rng.choice(PARAPHRASE_PROMPTS), None, self.pid)
            rows.append((prompt + self.targets[i], [-100] * len(prompt) + self.targets[i]))
        ids, mask, labels = _batch(rows, self.pad, self.device)
        logits, gold = _shifted(self._student(ids, mask, list(doc_idx)), labels)
        return torch.nn.functional.cross_entropy(logits, gold)

    def distill_loss(self, examples: Sequence[QAExample], rng: random.Random, kl_weight: float) -> Any:
        from ragcomp.compressors.xrag.model import reader_prompt_ids
        from ragcomp.llm import system_prompt, user_prompt

        torch = require("torch", "models")
        tok = self.lm.tokenizer
        student, teacher, vec_rows = [], [], []
        for ex in examples:
            picked = with_neighbours(ex.doc, self.neighbours[ex.doc], self.max_docs, rng)
            answer_ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
            answer = [*answer_ids[: self.max_answer_tokens], self.eos]
            s_prompt = reader_prompt_ids(tok, ex.question, len(picked), self.pid)
            text = "\n\n".join(self.docs[i].text for i in picked)
            t_prompt = self.lm.chat_ids(user_prompt(ex.question, text), system=system_prompt(text))
            student.append((s_prompt + answer, [-100] * len(s_prompt) + answer))
            teacher.append((t_prompt + answer, [-100] * len(t_prompt) + answer))
            vec_rows.extend(picked)
        with torch.no_grad():
            t_ids, t_mask, t_labels = _batch(teacher, self.pad, self.device)
            t_logits, _ = _shifted(self.lm.model(input_ids=t_ids, attention_mask=t_mask).logits, t_labels)
        s_ids, s_mask, s_labels = _batch(student, self.pad, self.device)
        s_logits, gold = _shifted(self._student(s_ids, s_mask, vec_rows), s_labels)
        ce = torch.nn.functional.cross_entropy(s_logits, gold)
        kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1),
                                        log_target=True, reduction="batchmean")
        return ce + kl_weight * kl


def teacher_answers(lm: Any, docs: Sequence[Any], examples: Sequence[QAExample], batch_size: int = 64,
                    max_new_tokens: int = 16) -> list[QAExample]:
    """The frozen LLM's own short answers, reading the source document as text (self-distillation
    targets for questions that come without one); empty answers are dropped."""
    from ragcomp.llm import clean_answer, system_prompt, user_prompt

    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        texts_in = [docs[e.doc].text for e in chunk]
        prompts = [lm.chat_ids(user_prompt(e.question, t), system=system_prompt(t))
                   for e, t in zip(chunk, texts_in, strict=True)]
        texts = lm.generate_batch(prompts, max_new_tokens=max_new_tokens, stop_at_line=True)
        answers = [clean_answer(t) for t in texts]
        out += [QAExample(e.doc, e.question, a) for e, a in zip(chunk, answers, strict=True) if a]
    return out


def _autocast(device: str) -> Any:
    import contextlib

    torch = require("torch", "models")
    if device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _run_stage(name: str, loss_fn: Any, items: list[Any], dev: list[Any], steps: int, batch_size: int,
               lr: float, projector: Any, device: str, seed: int, log_every: int,
               progress: bool, max_seconds: float | None = None) -> dict[str, Any]:
    torch = require("torch", "models")
    rng = random.Random(seed)

    def dev_loss() -> float:
        r = random.Random(seed + 1)  # the same prompts before and after
        with torch.no_grad(), _autocast(device):
            vals = [float(loss_fn(dev[i:i + batch_size], r)) for i in range(0, len(dev), batch_size)]
        return float(np.mean(vals)) if vals else float("nan")

    before = dev_loss()
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(max(s - warm, 0) / max(steps - warm, 1), 1.0)))))
    curve, window, t0 = [], [], time.perf_counter()
    order: list[Any] = []
    done = 0
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break  # a time budget (one GPU call) ends the stage early; the projector is still saved
        if len(order) < batch_size:
            order += rng.sample(items, len(items))
        batch, order = order[:batch_size], order[batch_size:]
        with _autocast(device):
            loss = loss_fn(batch, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        done = step + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": round(float(np.mean(window)), 4)})
            window = []
            if progress:
                print(f"stage {name} step {step + 1}/{steps} loss {curve[-1]['loss']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    after = dev_loss()
    return {"steps": done, "planned_steps": steps, "lr": lr, "dev_loss_before": round(before, 4),
            "dev_loss_after": round(after, 4), "seconds": round(time.perf_counter() - t0, 1), "curve": curve}


def train(
    out_dir: str | Path, stage: str = "both", corpus: str | Path = "wiki", lm: str = "smollm2-135m",
    embedder: str = "minilm", index_dir: str | Path | None = None, device: str | None = None,
    steps1: int = 2000, steps2: int = 1500, batch_size: int = 32, lr1: float = 1e-3, lr2: float = 3e-4,
    max_target_tokens: int = 96, max_answer_tokens: int = 48, max_docs: int = 3, kl_weight: float = 1.0,
    init: str | Path | None = None, questions: str | Path | None = None,
    exclude_qa: Sequence[str | Path] | None = None, allow_no_exclusion: bool = False, dev_docs: int = 64,
    embedder_name: str | None = None, lm_name: str | None = None,
    max_seconds_per_stage: float | None = None, max_file_questions: int = 8000,
    seed: int = 0, log_every: int = 50, overwrite: bool = False, progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train (see the module docstring) and save to `out_dir`; returns training.json's content.
    `embedder_name` / `lm_name`: the names recorded in the projector when `embedder` / `lm` are
    local copies (e.g. "minilm" for an fp16 copy of MiniLM), so the compressor's checks match."""
    args = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items() if k != "command"}
    torch = require("torch", "models")
    from ragcomp.compressors.xrag.model import Projector, hidden_size, load_projector
    from ragcomp.models import default_device, load_causal_lm
    from ragcomp.retrieval import CorpusRetriever

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    sizes = (("steps1", steps1), ("steps2", steps2), ("batch_size", batch_size), ("max_docs", max_docs))
    for key, val in sizes:
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if key.startswith("steps") else 1):
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    t0 = time.perf_counter()
    device = device or default_device()
    random.seed(seed)
    torch.manual_seed(seed)
    docs, excluded = documents(corpus, exclude_qa, allow_no_exclusion)
    qa = template_questions(docs)
    file_qa = [] if questions is None else file_questions(questions, docs, excluded["excluded_questions"])
    retriever = CorpusRetriever.for_corpus(corpus, embedder, index_dir, device, progress)
    vectors = retriever.index.vectors([d.id for d in docs])  # the retriever's own vectors, reused
    pos = {d.id: i for i, d in enumerate(docs)}
    hits = retriever.index.search(vectors, max_docs + 1) if max_docs > 1 else [[] for _ in docs]
    neighbours = [[pos[h] for h, _ in row if h in pos] for row in hits]
    llm = load_causal_lm(lm, device=device, dtype="bf16" if device.startswith("cuda") else "fp32")
    for p in llm.model.parameters():
        p.requires_grad_(False)
    if file_qa:  # answered by the teacher itself, in the reader's short-answer format
        file_qa = random.Random(seed).sample(file_qa, min(max_file_questions, len(file_qa)))
        qa += teacher_answers(llm, docs, file_qa, batch_size=max(batch_size, 64))
    if init is not None:
        projector = load_projector(init, device).float().train()
    else:
        projector = Projector(vectors.shape[1], hidden_size(llm.model)).to(device)
    projector.info = {"embedder": embedder_name or embedder, "lm": lm_name or lm}
    trainer = _Trainer(llm, docs, vectors, neighbours, projector, device, max_target_tokens,
                       max_answer_tokens)
    # Held-out documents: their loss before and after each stage, never trained on.
    shuffled = random.Random(seed).sample(range(len(docs)), len(docs))
    dev_set = set(shuffled[:min(dev_docs, len(docs) // 5)])
    train_docs = [i for i in range(len(docs)) if i not in dev_set]
    report: dict[str, Any] = {"args": args, "command": command, "documents": len(docs),
                              "train_documents": len(train_docs), "dev_documents": len(dev_set),
                              "excluded_titles": excluded["excluded_titles"],
                              "excluded_files": excluded["files"], "qa_examples": len(qa),
                              "file_questions": len(file_qa), "stages": {}}
    if stage in ("1", "both") and steps1:
        report["stages"]["1"] = _run_stage(
            "1", lambda b, r: trainer.paraphrase_loss(b, r), train_docs, sorted(dev_set), steps1, batch_size,
            lr1, projector, device, seed, log_every, progress, max_seconds_per_stage)
    if stage in ("2", "both") and steps2:
        trainer.max_docs = max_docs
        train_qa = [e for e in qa if e.doc not in dev_set]
        dev_qa = [e for e in qa if e.doc in dev_set][:dev_docs]
        report["stages"]["2"] = _run_stage(
            "2", lambda b, r: trainer.distill_loss(b, r, kl_weight), train_qa, dev_qa, steps2, batch_size,
            lr2, projector, device, seed, log_every, progress, max_seconds_per_stage)
    projector.eval()
    projector.info["stage"] = stage
    projector.save(out)
    report["parameters"] = sum(p.numel() for p in projector.parameters())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return report
