"""How much one input embedding per document can carry for the offline reader (SmolLM2-135M):
top-1 qa_dev EM / F1 / acc with no retrieval, the full text, xrag (the retriever's MiniLM vector
through the shipped projector), and two oracles that use no retriever vector at all: the mean of
the reader's own input embeddings of the document's tokens, and of its first 16 tokens (each
scaled to the mean norm of a token embedding). If even the oracles stay near no retrieval, one
token per document is too little for this reader, whatever the projector learns.

`--train-oracle DIR` first trains a projector (`ragcomp.train.xrag`, both stages) whose input is
that token mean (unit length) instead of the retriever's vector, and adds its row: the best one
vector per document this reader can be taught to read, with no retriever in the way.

    python scripts/xrag_ceiling.py --limit 200 --device cpu
    python scripts/xrag_ceiling.py --device cuda --train-oracle DIR --seconds-per-stage 240 \
        --questions pd_all.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ragcomp.compressors.xrag import XragCompressor
from ragcomp.compressors.xrag.context import EmbeddingContext
from ragcomp.compressors.xrag.model import input_embeddings, load_projector
from ragcomp.eval.data import load_questions
from ragcomp.eval.metrics import contains_answer, exact_match, f1_score
from ragcomp.llm.local import LocalReader
from ragcomp.retrieval import CorpusRetriever
from ragcomp.types import Passage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/qa_dev.jsonl")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-oracle", default=None, help="train a projector on token means into DIR")
    parser.add_argument("--seconds-per-stage", type=float, default=240)
    parser.add_argument("--questions", default=None, help="stage-2 question file (ragcomp train xrag)")
    parser.add_argument("--corpus", default="wiki", help="'wiki' or the corpus file (training only)")
    parser.add_argument("--save-passages", default=None,
                        help="write each question's top-1 passage and xrag vector to FILE, then stop")
    parser.add_argument("--passages", default=None, help="read them from FILE (no retriever needed)")
    args = parser.parse_args()
    if args.train_oracle:
        train_on_token_means(args)
    questions = load_questions(args.data, args.limit)
    if args.passages:  # saved for at least these questions, in the same order
        top1 = json.loads(Path(args.passages).read_text())[: len(questions)]
    else:
        top1 = top_passages(args, questions)
    if args.save_passages:
        Path(args.save_passages).write_text(json.dumps(top1))
        return
    reader = LocalReader("smollm2-135m", device=args.device)
    tok, table = reader.lm.tokenizer, input_embeddings(reader.lm.model).weight.detach().float().cpu()
    token_norm = float(table.norm(dim=1).mean())

    def mean_of(ids: list[int]) -> np.ndarray:
        return unit_token_mean(table, ids)[None] * token_norm

    names = ["no retrieval", "full text", "xrag", "oracle: token mean", "oracle: first 16 tokens"]
    trained = None
    if args.train_oracle:
        trained = load_projector(args.train_oracle, args.device)
        names.append("projector trained on token means")
    contexts: dict[str, list[object]] = {name: [] for name in names}
    hits = 0
    for q, row in zip(questions, top1, strict=True):
        p = Passage(row["id"], row["text"])
        hits += contains_answer(p.text, q.answers)
        ids = tok(p.text, add_special_tokens=False)["input_ids"]
        contexts["no retrieval"].append(None)
        contexts["full text"].append(p.text)
        contexts["xrag"].append(EmbeddingContext(p.text, np.asarray([row["xrag"]], dtype=np.float32)))
        contexts["oracle: token mean"].append(EmbeddingContext(p.text, mean_of(ids)))
        contexts["oracle: first 16 tokens"].append(EmbeddingContext(p.text, mean_of(ids[:16])))
        if trained is not None:
            unit = torch.from_numpy(unit_token_mean(table, ids)[None]).to(args.device)
            with torch.no_grad():
                vec = trained(unit).float().cpu().numpy()
            contexts["projector trained on token means"].append(EmbeddingContext(p.text, vec))
    print(f"{len(questions)} questions; the top-1 passage holds an answer for {hits}")
    print("| method | EM | F1 | acc |\n|---|---|---|---|")
    for name, ctxs in contexts.items():
        preds: list[str | None] = []
        for start in range(0, len(questions), args.batch_size):
            batch = [(q.question, c) for q, c in zip(questions[start:start + args.batch_size],
                                                      ctxs[start:start + args.batch_size], strict=True)]
            preds += reader.answer_batch(batch)  # type: ignore[arg-type]
        scores = [(exact_match(a, q.answers), f1_score(a, q.answers), contains_answer(a or "", q.answers))
                  for a, q in zip(preds, questions, strict=True)]
        em, f1, acc = (100 * float(np.mean(col)) for col in zip(*scores, strict=True))
        print(f"| {name} | {em:.1f}% | {f1:.1f}% | {acc:.1f}% |", flush=True)


def unit_token_mean(table: torch.Tensor, ids: list[int]) -> np.ndarray:
    """The unit-length mean of the input embeddings (`table` rows) of `ids` (row 0 for no ids)."""
    v = table[torch.tensor(ids or [0])].mean(0)
    return (v / v.norm()).numpy()


def top_passages(args: argparse.Namespace, questions: list) -> list[dict]:
    """Each question's top-1 passage by the MiniLM retriever, with its xrag vector (shipped projector)."""
    retriever = CorpusRetriever.for_corpus("wiki", "minilm", device=args.device, progress=False)
    comp = XragCompressor(embedder="minilm", vector_index=retriever.index, device=args.device,
                          encode_missing=False)
    out = []
    for q in questions:
        (p,) = retriever.retrieve(q.question, 1)
        vector = comp.project(comp.document_embeddings([p]))[0]
        out.append({"id": p.id, "text": p.text, "xrag": vector.tolist()})
    return out


def train_on_token_means(args: argparse.Namespace) -> None:
    """`ragcomp.train.xrag.train` with each document's vector replaced by the unit-length mean of
    the reader's input embeddings of its tokens (one document per question: no neighbour search)."""
    from ragcomp.corpus import load_corpus
    from ragcomp.models import load_causal_lm
    from ragcomp.train import xrag as xrag_train

    lm = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    table = input_embeddings(lm.model).weight.detach().float()
    means = {p.id: unit_token_mean(table, lm.tokenizer(p.text, add_special_tokens=False)["input_ids"])
             for p in load_corpus(args.corpus)}

    class Index:  # what train() reads of the retriever: the documents' vectors (no search at max_docs=1)
        def vectors(self, ids: list[str]) -> np.ndarray:
            return np.stack([means[i] for i in ids])

    class Stub:
        index = Index()

    build = CorpusRetriever.__dict__["for_corpus"]  # the classmethod itself, restored as it was
    CorpusRetriever.for_corpus = classmethod(lambda cls, *a, **k: Stub())  # type: ignore[method-assign,assignment]
    try:
        report = xrag_train.train(
            args.train_oracle, stage="both", corpus=args.corpus, device=args.device, steps1=100000,
            steps2=100000, batch_size=64,
            lr1=1e-3, lr2=3e-4, max_docs=1, exclude_qa=[args.data], questions=args.questions,
            max_seconds_per_stage=args.seconds_per_stage, max_file_questions=8000, overwrite=True,
            embedder_name="smollm2-135m token mean", progress=False)
    finally:
        CorpusRetriever.for_corpus = build  # type: ignore[method-assign]
    print({k: {kk: v[kk] for kk in ("steps", "dev_loss_before", "dev_loss_after")}
           for k, v in report["stages"].items()}, flush=True)


if __name__ == "__main__":
    main()
