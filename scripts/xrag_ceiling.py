"""How much one input embedding per document can carry for the offline reader (SmolLM2-135M):
top-1 qa_dev EM / F1 / acc with no retrieval, the full text, xrag (the retriever's MiniLM vector
through the shipped projector), and two oracles that use no retriever vector at all: the mean of
the reader's own input embeddings of the document's tokens, and of its first 16 tokens (each
scaled to the mean norm of a token embedding). If even the oracles stay near no retrieval, one
token per document is too little for this reader, whatever the projector learns.

    python scripts/xrag_ceiling.py --limit 200 --device cpu
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ragcomp.compressors.xrag import XragCompressor
from ragcomp.compressors.xrag_context import EmbeddingContext
from ragcomp.compressors.xrag_model import input_embeddings
from ragcomp.eval.data import load_questions
from ragcomp.eval.metrics import contains_answer, exact_match, f1_score
from ragcomp.llm.local import LocalReader
from ragcomp.retrieval import CorpusRetriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/qa_dev.jsonl")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    questions = load_questions(args.data, args.limit)
    retriever = CorpusRetriever.for_corpus("wiki", "minilm", device=args.device, progress=False)
    reader = LocalReader("smollm2-135m", device=args.device)
    comp = XragCompressor(embedder="minilm", vector_index=retriever.index, device=args.device,
                          encode_missing=False)
    tok, table = reader.lm.tokenizer, input_embeddings(reader.lm.model).weight.detach().float().cpu()
    token_norm = float(table.norm(dim=1).mean())

    def mean_of(ids: list[int]) -> np.ndarray:
        v = table[torch.tensor(ids)].mean(0)
        return (v * token_norm / v.norm()).numpy()[None]

    contexts: dict[str, list[object]] = {name: [] for name in
                                         ("no retrieval", "full text", "xrag", "oracle: token mean",
                                          "oracle: first 16 tokens")}
    hits = 0
    for q in questions:
        (p,) = retriever.retrieve(q.question, 1)
        hits += contains_answer(p.text, q.answers)
        ids = tok(p.text, add_special_tokens=False)["input_ids"]
        contexts["no retrieval"].append(None)
        contexts["full text"].append(p.text)
        contexts["xrag"].append(EmbeddingContext(p.text, comp.project(comp.document_embeddings([p]))))
        contexts["oracle: token mean"].append(EmbeddingContext(p.text, mean_of(ids)))
        contexts["oracle: first 16 tokens"].append(EmbeddingContext(p.text, mean_of(ids[:16])))
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


if __name__ == "__main__":
    main()
