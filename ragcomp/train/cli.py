"""Command line: `python -m ragcomp.train provence-data|provence-multi|provence|xrag|export-backbone ...`,
and the same commands under `ragcomp train` through `add_parser(sub)` (registered in `ragcomp/cli.py`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def add_commands(sub: Any, prog: str) -> None:
    """The training subcommands on a subparsers object; `prog` is how the command line is recorded."""
    d = sub.add_parser("provence-data", help="generate (question, passage, sentence) training data",
                       description="Questions written by SmolLM2 for sampled Wikipedia sentences, with "
                       "hard negatives from retrieval (method: ragcomp/train/provence_data.py).")
    d.add_argument("--out", required=True, help="JSONL file to write (a .meta.json is written beside it)")
    d.add_argument("--articles", type=int, default=0, help="articles to sample (0: every eligible one)")
    d.add_argument("--questions-per-article", type=int, default=1)
    d.add_argument("--negatives", type=int, default=2, help="hard negatives per question")
    d.add_argument("--exclude-qa", action="append", default=None, metavar="PATH",
                   help="evaluation file whose titles/questions never enter the data (repeatable; "
                   "default ../shared/data/qa_dev.jsonl)")
    d.add_argument("--no-exclude", action="store_true", help="allow running with no evaluation file")
    d.add_argument("--corpus", default="wiki")
    d.add_argument("--lm", default="smollm2-135m")
    d.add_argument("--embedder", default="minilm")
    d.add_argument("--device", default=None)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_data, prog=prog)

    m = sub.add_parser("provence-multi", help="two-passage (comparison, bridge) training data",
                       description="Template comparison and bridge questions over pairs of Wikipedia "
                       "articles, labels on both passages; CPU only, no LM (method: "
                       "ragcomp/train/provence_multi.py). Mix with provence-data output at training.")
    m.add_argument("--out", required=True, help="JSONL file to write (a .meta.json is written beside it)")
    m.add_argument("--comparison", type=int, default=3000, help="comparison questions")
    m.add_argument("--bridge", type=int, default=3000, help="bridge questions (need --questions)")
    m.add_argument("--questions", action="append", default=[], metavar="PATH",
                   help="provence-data file whose questions the bridge examples rephrase (repeatable)")
    m.add_argument("--negatives", type=int, default=1, help="hard negatives per question")
    m.add_argument("--exclude-qa", action="append", default=None, metavar="PATH",
                   help="evaluation file whose titles/questions never enter the data (default qa_dev.jsonl)")
    m.add_argument("--no-exclude", action="store_true", help="allow running with no evaluation file")
    m.add_argument("--corpus", default="wiki")
    m.add_argument("--embedder", default="minilm")
    m.add_argument("--device", default=None)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=_multi, prog=prog)

    t = sub.add_parser("provence", help="train a Provence-style pruner+reranker",
                       description="Fine-tune an encoder with token (keep/drop) and ranking heads on "
                       "provence-data output (method: ragcomp/train/provence.py).")
    t.add_argument("--data", required=True, nargs="+",
                   help="JSONL written by provence-data / provence-multi (several files are mixed)")
    t.add_argument("--out", required=True, help="folder for the model, tokenizer and training.json")
    t.add_argument("--backbone", default="minilm", help="'minilm' (offline), a folder or a hub id")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--device", default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16)")
    t.add_argument("--dev-fraction", type=float, default=0.05)
    t.add_argument("--warmup-ratio", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--ranking-weight", type=float, default=1.0)
    t.add_argument("--keep-weight", type=float, default=1.0, help="weight of kept tokens in the token loss")
    t.add_argument("--threshold", type=float, default=0.1, help="sentence threshold for the dev metrics")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_train, prog=prog)

    x = sub.add_parser("xrag", help="train the xrag projector (retriever embedding -> one LLM token)",
                       description="xRAG's two stages on the Wikipedia corpus, LLM and retriever frozen: "
                       "paraphrase pretraining, then self-distillation (method: ragcomp/train/xrag.py).")
    x.add_argument("--out", required=True,
                   help="output folder (config.json, projector.safetensors, training.json)")
    x.add_argument("--stage", choices=["1", "2", "both"], default="both")
    x.add_argument("--corpus", default="wiki")
    x.add_argument("--lm", default="smollm2-135m", help="reader LLM (alias, folder or hub id)")
    x.add_argument("--embedder", default="minilm", help="retrieval embedder (alias, folder or hub id)")
    x.add_argument("--index-dir", help="FAISS index folder (default: the ragcomp cache, as retrieval uses)")
    x.add_argument("--device", default=None)
    x.add_argument("--steps1", type=int, default=2000, help="paraphrase pretraining steps")
    x.add_argument("--steps2", type=int, default=1500, help="self-distillation steps")
    x.add_argument("--batch-size", type=int, default=32)
    x.add_argument("--lr1", type=float, default=1e-3)
    x.add_argument("--lr2", type=float, default=3e-4)
    x.add_argument("--max-target-tokens", type=int, default=96, help="document tokens to reproduce (stage 1)")
    x.add_argument("--max-answer-tokens", type=int, default=48)
    x.add_argument("--max-docs", type=int, default=3, help="documents per stage-2 prompt (gold + neighbours)")
    x.add_argument("--kl-weight", type=float, default=1.0)
    x.add_argument("--init", help="projector folder to start from (e.g. stage 1 output for --stage 2)")
    x.add_argument("--questions", help="provence-data JSONL: extra stage-2 questions, answered by the "
                   "teacher LLM itself (optional)")
    x.add_argument("--max-file-questions", type=int, default=8000, help="at most this many of --questions")
    x.add_argument("--exclude-qa", action="append", default=None, metavar="PATH",
                   help="evaluation file whose titles/questions never enter training (default qa_dev.jsonl)")
    x.add_argument("--no-exclude", action="store_true")
    x.add_argument("--dev-docs", type=int, default=64, help="held-out documents for the dev loss")
    x.add_argument("--embedder-name", help="embedder name to record when --embedder is a local copy (minilm)")
    x.add_argument("--lm-name", help="LLM name to record when --lm is a local copy (smollm2-135m)")
    x.add_argument("--max-seconds-per-stage", type=float, default=None,
                   help="end a stage early after this long (fits a time-limited GPU call); still saves")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--log-every", type=int, default=50)
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=_train_xrag, prog=prog)

    e = sub.add_parser("export-backbone", help="save an encoder (default minilm) in fp16 with its tokenizer",
                       description="A small copy of the backbone to carry to a machine without the "
                       "model package (MiniLM: ~45 MB); pass the folder as provence --backbone.")
    e.add_argument("--backbone", default="minilm")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export, prog=prog)


def add_parser(sub: Any) -> None:
    """`ragcomp train ...` (hook for ragcomp/cli.py's SUBCOMMANDS)."""
    p = sub.add_parser("train", help="generate training data and train ragcomp's own models")
    add_commands(p.add_subparsers(dest="train_command", required=True), "ragcomp")


def _command(args: argparse.Namespace) -> str:
    # The command line as typed, to reproduce a run from its record.
    argv = getattr(args, "argv", None)
    return f"{args.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}"


def _data(args: argparse.Namespace) -> int:
    from ragcomp.train.provence_data import generate_data

    meta = generate_data(
        args.out, n_articles=args.articles or None, exclude_qa=args.exclude_qa, corpus=args.corpus,
        lm=args.lm, embedder=args.embedder, device=args.device, n_negatives=args.negatives,
        questions_per_article=args.questions_per_article, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.quiet,
        allow_no_exclusion=args.no_exclude, command=_command(args))
    s = meta["stats"]
    print(f"wrote {args.out}: {s.get('examples', 0)} examples, {s.get('questions', 0)} questions from "
          f"{s.get('prompts', 0)} prompts ({s.get('negatives', 0)} negatives) in {meta['seconds']:.0f} s")
    return 0


def _multi(args: argparse.Namespace) -> int:
    from ragcomp.train.provence_multi import generate_multi

    meta = generate_multi(
        args.out, n_comparison=args.comparison, n_bridge=args.bridge, single=args.questions,
        exclude_qa=args.exclude_qa, corpus=args.corpus, embedder=args.embedder, device=args.device,
        n_negatives=args.negatives, seed=args.seed, progress=not args.quiet,
        allow_no_exclusion=args.no_exclude, command=_command(args))
    s = meta["stats"]
    print(f"wrote {args.out}: {s.get('examples', 0)} examples, {s.get('questions', 0)} questions "
          f"({s.get('questions_bridge', 0)} bridge, {s.get('negatives', 0)} negatives) "
          f"in {meta['seconds']:.0f} s")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ragcomp.train.provence import train

    report = train(
        args.data[0] if len(args.data) == 1 else args.data, args.out, backbone=args.backbone,
        epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, max_length=args.max_length, device=args.device, seed=args.seed, fp16_save=not args.fp32,
        dev_fraction=args.dev_fraction, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        ranking_weight=args.ranking_weight, keep_weight=args.keep_weight, log_every=args.log_every,
        threshold=args.threshold, overwrite=args.overwrite, progress=not args.quiet, command=_command(args))
    m = report["metrics"]
    print(f"saved {args.out} ({report['weights']['bytes'] / 1e6:.1f} MB, {report['weights']['dtype']}); "
          f"train loss {m['train_loss_before']:.4f} -> {m['train_loss_after']:.4f}")
    return 0


def _train_xrag(args: argparse.Namespace) -> int:
    from ragcomp.train.xrag import train

    report = train(
        args.out, stage=args.stage, corpus=args.corpus, lm=args.lm, embedder=args.embedder,
        index_dir=args.index_dir, device=args.device, steps1=args.steps1, steps2=args.steps2,
        batch_size=args.batch_size, lr1=args.lr1, lr2=args.lr2, max_target_tokens=args.max_target_tokens,
        max_answer_tokens=args.max_answer_tokens, max_docs=args.max_docs, kl_weight=args.kl_weight,
        init=args.init, questions=args.questions, exclude_qa=args.exclude_qa,
        allow_no_exclusion=args.no_exclude, dev_docs=args.dev_docs, seed=args.seed,
        embedder_name=args.embedder_name, lm_name=args.lm_name,
        max_seconds_per_stage=args.max_seconds_per_stage, max_file_questions=args.max_file_questions,
        log_every=args.log_every,
        overwrite=args.overwrite, progress=not args.quiet, command=_command(args))
    for name, st in report["stages"].items():
        print(f"stage {name}: dev loss {st['dev_loss_before']:.4f} -> {st['dev_loss_after']:.4f} "
              f"({st['steps']} steps, {st['seconds']:.0f} s)")
    print(f"saved {args.out} ({report['parameters']} parameters)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ragcomp._optional import require
    from ragcomp.compressors.provence.model import no_pooling
    from ragcomp.models import resolve_model_path

    torch = require("torch", "models")
    transformers = require("transformers", "models")
    path = resolve_model_path(args.backbone)
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, **no_pooling(config)).to(torch.float16)
    model.save_pretrained(args.out)
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(args.out)
    print(f"saved {args.backbone} as fp16 to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ragcomp.train", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True), "python -m ragcomp.train")
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
