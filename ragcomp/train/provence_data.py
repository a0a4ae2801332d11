"""Training data for a Provence-style pruner+reranker: (question, passage, relevant sentence).

Method (all offline, seeded; `generate_data` writes the JSONL and a `.meta.json` beside it):

1. Articles: the Wikipedia lead summaries (`ragcomp.corpus.load_corpus("wiki")`, id = title), shuffled
   with `seed`. An article is skipped when it is a gold title of any evaluation file given
   (`exclude_qa`, by default ../shared/data/qa_dev.jsonl) or when it has fewer than 2 sentences
   (nothing to prune). Sentences come from `ragcomp.text.split_sentences`, the splitter the
   compressor rounds to at inference.
2. Target sentence: one per article (or `questions_per_article`), 6-40 words, chosen at random among
   those holding a digit or a capitalised word after the first (names, dates, quantities make
   specific questions), else among all of 6-40 words.
3. Question: SmolLM2-135M-Instruct, greedy, in batches, continues a plain few-shot prompt
   (`FEW_SHOT`: invented examples, none from any evaluation file) ending in
   "Topic: <title>\\nSentence: <sentence>\\nQuestion:". Plain completion, not the chat template:
   on 12 sampled articles the chat template gave 1 usable question ("What is the subject of this
   sentence?" and the like), plain few-shot gave 10. A question is kept only when it ends with '?',
   has 4-30 words, does not copy the sentence (not a substring of it, no run of 8 of its words), does
   not talk about "the sentence"/"the text", shares a content word with the sentence that is not in
   the title (so the target sentence, not just the article, answers it), is not a duplicate and is
   not an evaluation question (normalised text).
4. Examples: the source passage with label 1 on the target sentence and 0 on the others, ranking
   label 1.0 ("positive"); and `n_negatives` hard negatives: the passages that MiniLM retrieval
   ranks highest for the question, other than the source, evaluation gold titles and passages that
   restate the target sentence (a sentence holding 60% of its content words), with every
   sentence 0 and ranking label 0.0 ("negative").

Evaluation questions are never used: no prompt, label or passage comes from an evaluation file; its
titles are excluded as sources and as negatives, and its questions are filtered out of the output.

Known weaknesses: questions of a 135M model are often shallow; a retrieved negative may still answer
the question (no teacher reranker to catch it); labels are one sentence even when two are needed.

Record (one JSON object a line): qid, question, passage_id, text, sentences ([start, end] character
spans into text), labels (1 keep / 0 drop, one per sentence), ranking_label, kind, source (title the
question was written from), target (index of the labelled sentence, or null) and rank (retrieval
rank of a negative, or null).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ragcomp.text import Sentence, split_sentences
from ragcomp.train.provence_files import (  # meta_path, read_examples: re-exported
    file_sha256,
    meta_path,  # noqa: F401
    read_examples,  # noqa: F401
    write_jsonl,
)
from ragcomp.types import Passage

FORMAT_VERSION = 1
DEFAULT_QA = Path(__file__).resolve().parents[3] / "shared" / "data" / "qa_dev.jsonl"
# Invented for this prompt; not taken from the corpus or any evaluation file. The last shows how to
# name the subject when the sentence starts with a pronoun.
FEW_SHOT: list[tuple[str, str, str]] = [
    ("Volcano", "Mount Vesuvius destroyed the Roman town of Pompeii in 79 AD.",
     "Which Roman town did Mount Vesuvius destroy in 79 AD?"),
    ("Penguin", "Emperor penguins breed during the Antarctic winter.", "When do emperor penguins breed?"),
    ("Telephone", "Alexander Graham Bell was granted the first patent for the telephone in 1876.",
     "Who was granted the first patent for the telephone?"),
    ("Amazon River", "It flows through Peru, Colombia and Brazil before reaching the Atlantic Ocean.",
     "Which ocean does the Amazon River flow into?"),
]
INSTRUCTION = "Write one question that the sentence answers."
STOPWORDS = frozenset(
    "the a an and or of to in on at by for with from as is are was were be been being this that these those "
    "it its it's their there they them he she his her him who whom whose what which when where why how "
    "does did do done has have had not but also than then into onto over under about after before during "
    "most more many much some such other another each every any all one two first can could would should "
    "will may might must called known name named type kind part used use".split()
)
_META = re.compile(r"\b(the|this|that) (sentence|text|passage|article|paragraph|topic|statement)\b", re.I)
_WORD = re.compile(r"[\w'-]+")


# -- text helpers ------------------------------------------------------------------------------
def normalise_question(text: str) -> str:
    """Lower case, single spaces, no punctuation: how questions are compared with evaluation ones."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ characters that are not stop words; a plural 's' dropped."""
    out = set()
    for w in _WORD.findall(text.lower()):
        w = w.strip("'-")
        if len(w) < 3 or w in STOPWORDS:
            continue
        out.add(w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def is_specific(sentence: str) -> bool:
    """Holds a digit or a capitalised word after the first: a name, date or quantity to ask about."""
    words = sentence.split()
    return any(c.isdigit() for c in sentence) or any(w[:1].isupper() for w in words[1:])


def pick_sentences(sentences: Sequence[Sentence], rng: random.Random, k: int = 1,
                   min_words: int = 6, max_words: int = 40) -> list[int]:
    """Up to k distinct target sentence indices: specific ones first, each group in random order."""
    fit = [i for i, s in enumerate(sentences) if min_words <= len(s.text.split()) <= max_words]
    specific = [i for i in fit if is_specific(sentences[i].text)]
    rest = sorted(set(fit) - set(specific))
    rng.shuffle(specific)
    rng.shuffle(rest)
    return (specific + rest)[:k]


def build_prompt(title: str, sentence: str) -> str:
    """The plain few-shot prompt; the model continues after "Question:"."""
    shots = [f"Topic: {t}\nSentence: {s}\nQuestion: {q}\n" for t, s, q in FEW_SHOT]
    return "\n".join([INSTRUCTION + "\n", *shots, f"Topic: {title}\nSentence: {sentence}\nQuestion:"])


def clean_question(raw: str) -> str:
    """First non-empty line of the model's output, without a "Question:" prefix or quotes."""
    line = next((x.strip() for x in raw.splitlines() if x.strip()), "")
    line = re.sub(r"^(question|q)\s*[:.]\s*", "", line, flags=re.I)
    return line.strip().strip("\"'“”‘’").strip()


def reject_reason(question: str, sentence: str, title: str, eval_questions: set[str],
                  seen: set[str] | None = None) -> str | None:
    """Why a generated question is not kept, or None when it passes every check. `eval_questions`
    and `seen` hold normalised questions (`normalise_question`)."""
    q_norm, s_norm = normalise_question(question), normalise_question(sentence)
    if q_norm in eval_questions:
        return "eval_question"  # first, so every evaluation question the LM writes is counted
    if not question.endswith("?"):
        return "no_question_mark"
    if not 4 <= len(question.split()) <= 30:
        return "length"
    if q_norm in s_norm or s_norm in q_norm:
        return "copies_sentence"
    q_words, s_words = q_norm.split(), s_norm.split()
    s_grams = {tuple(s_words[i:i + 8]) for i in range(len(s_words) - 7)}
    if any(tuple(q_words[i:i + 8]) in s_grams for i in range(len(q_words) - 7)):
        return "copies_sentence"
    if _META.search(question):
        return "about_the_text"
    if not (content_words(question) & content_words(sentence)) - content_words(title):
        return "no_overlap_with_sentence"
    if seen is not None and q_norm in seen:
        return "duplicate"
    return None


def restates(passage_sents: Sequence[Sentence], target_words: set[str], share: float = 0.6) -> bool:
    """A sentence of the passage holds `share` of the target sentence's content words."""
    if not target_words:
        return False
    return any(len(content_words(s.text) & target_words) >= share * len(target_words) for s in passage_sents)


def hard_negatives(found: Sequence[Passage], skip_ids: set[str], target_words: Sequence[set[str]],
                   n: int, stats: Counter[str]) -> list[tuple[int, Passage, list[Sentence]]]:
    """The first `n` retrieved passages (rank from 1, passage, its sentences) not in `skip_ids` (sources,
    evaluation gold titles) and restating none of the labelled sentences (their content words)."""
    out: list[tuple[int, Passage, list[Sentence]]] = []
    for rank, hit in enumerate(found, 1):
        if len(out) >= n:
            break
        if hit.id in skip_ids:
            continue
        hit_sents = split_sentences(hit.text)
        if not hit_sents or any(restates(hit_sents, words) for words in target_words):
            stats["negatives_skipped_restates"] += int(bool(hit_sents))
            continue
        out.append((rank, hit, hit_sents))
    return out


# -- exclusions -------------------------------------------------------------------------------
def load_exclusions(paths: Iterable[str | Path]) -> tuple[set[str], set[str], list[dict[str, Any]]]:
    """Gold titles and normalised questions of evaluation files (qa_dev.jsonl format), and a record
    of each file (path, sha256, counts) for the metadata."""
    from ragcomp.eval.data import load_questions

    titles: set[str] = set()
    questions: set[str] = set()
    files = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"evaluation file to exclude {str(p)!r} does not exist")
        qs = load_questions(p)
        titles.update(t for q in qs for t in q.titles)
        questions.update(normalise_question(q.question) for q in qs)
        files.append({"path": str(p), "sha256": file_sha256(p), "questions": len(qs),
                      "titles": len({t for q in qs for t in q.titles})})
    return titles, questions, files


# -- generation -------------------------------------------------------------------------------
def make_record(qid: str, question: str, p: Passage, sents: Sequence[Sentence],
                target: int | list[int] | None, kind: str, source: str, rank: int | None) -> dict[str, Any]:
    # `target`: one labelled sentence, or a list of them (two-passage examples, provence_multi.py).
    targets = set(target) if isinstance(target, list) else {target}
    return {"qid": qid, "question": question, "passage_id": p.id, "text": p.text,
            "sentences": [[s.start, s.end] for s in sents],
            "labels": [int(i in targets) for i in range(len(sents))],
            "ranking_label": 1.0 if kind == "positive" else 0.0,
            "kind": kind, "source": source, "target": target, "rank": rank}


def make_examples(
    passages: Sequence[Passage], lm: Any, retriever: Any, n_articles: int | None,
    exclude_titles: set[str], exclude_questions: set[str], n_negatives: int = 2,
    questions_per_article: int = 1, batch_size: int = 16, max_new_tokens: int = 40, seed: int = 0,
    min_words: int = 6, max_words: int = 40, progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Examples from `n_articles` sampled articles (None: all) (see the module docstring) and counts of
    what was kept and rejected. `lm`: a `ragcomp.models.CausalLM` (or anything with `.tokenizer` and
    `.generate_batch`); `retriever`: anything with `retrieve_batch(questions, k)` over the corpus."""
    for name, value in (("n_articles", 1 if n_articles is None else n_articles), ("batch_size", batch_size),
                        ("questions_per_article", questions_per_article)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(n_negatives, bool) or not isinstance(n_negatives, int) or n_negatives < 0:
        raise ValueError(f"n_negatives must be an integer >= 0, got {n_negatives!r}")
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    order = sorted(passages, key=lambda p: p.id)  # input order must not change the sample
    rng.shuffle(order)
    jobs: list[tuple[Passage, list[Sentence], int]] = []
    for p in order:
        if n_articles is not None and stats["articles"] >= n_articles:
            break
        if p.id in exclude_titles:
            stats["articles_excluded_eval"] += 1
            continue
        sents = split_sentences(p.text)
        picks = pick_sentences(sents, rng, questions_per_article, min_words, max_words) \
            if len(sents) > 1 else []
        if not picks:
            stats["articles_no_target"] += 1
            continue
        stats["articles"] += 1
        jobs.extend((p, sents, i) for i in picks)
    if n_articles is not None and stats["articles"] < n_articles:
        stats["articles_short"] = n_articles - stats["articles"]  # the corpus ran out
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    bar = _bar(len(jobs), progress)
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            prompts = [lm.tokenizer(build_prompt(p.id, s[i].text), add_special_tokens=False)["input_ids"]
                       for p, s, i in chunk]
            outs = lm.generate_batch(prompts, max_new_tokens=max_new_tokens, stop_at_line=True)
            accepted = []
            for (p, sents, i), raw in zip(chunk, outs, strict=True):
                q = clean_question(raw)
                reason = reject_reason(q, sents[i].text, str(p.metadata.get("title", p.id)),
                                       exclude_questions, seen)
                if reason:
                    stats[f"rejected_{reason}"] += 1
                    continue
                seen.add(normalise_question(q))
                accepted.append((p, sents, i, q))
            hits = retriever.retrieve_batch([a[3] for a in accepted], k=n_negatives + 12) \
                if accepted and n_negatives else [[] for _ in accepted]
            for (p, sents, i, q), found in zip(accepted, hits, strict=True):
                qid = f"q{stats['questions']:06d}"
                stats["questions"] += 1
                records.append(make_record(qid, q, p, sents, i, "positive", p.id, None))
                negs = hard_negatives(found, {p.id} | exclude_titles, [content_words(sents[i].text)],
                                      n_negatives, stats)
                records.extend(make_record(qid, q, hit, hit_sents, None, "negative", p.id, rank)
                               for rank, hit, hit_sents in negs)
                stats["negatives"] += len(negs)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    stats["examples"] = len(records)
    stats["prompts"] = len(jobs)
    return records, dict(sorted(stats.items()))


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="writing questions", unit="prompt")


def load_sources(exclude_qa: Sequence[str | Path] | None, allow_no_exclusion: bool, corpus: str | Path
                 ) -> tuple[set[str], set[str], list[dict[str, Any]], list[Passage]]:
    """The evaluation titles and questions to keep out (default: DEFAULT_QA when it exists), their
    files' records, and the corpus passages; refuses to run without an exclusion unless allowed, and
    stops when evaluation titles are not corpus ids (they would silently leave gold articles in)."""
    from ragcomp.corpus import load_corpus

    if exclude_qa is None:
        exclude_qa = [DEFAULT_QA] if DEFAULT_QA.is_file() else []
    if not exclude_qa and not allow_no_exclusion:
        raise ValueError(f"no evaluation file to exclude ({DEFAULT_QA} not found): pass --exclude-qa PATH "
                         "(the questions you will evaluate on), or --no-exclude to build data without")
    titles, questions, files = load_exclusions(exclude_qa)
    passages = load_corpus(corpus)
    missing = sorted(titles - {p.id for p in passages})
    if missing and str(corpus) == "wiki":
        raise ValueError(f"{len(missing)} evaluation titles are not corpus ids, e.g. {missing[:3]}")
    return titles, questions, files, passages


def generate_data(
    out: str | Path, n_articles: int | None = None, exclude_qa: Sequence[str | Path] | None = None,
    corpus: str = "wiki", lm: str = "smollm2-135m", embedder: str = "minilm", device: str | None = None,
    n_negatives: int = 2, questions_per_article: int = 1, batch_size: int = 16, max_new_tokens: int = 40,
    seed: int = 0, progress: bool = True, allow_no_exclusion: bool = False, command: str | None = None,
) -> dict[str, Any]:
    """Load the corpus, LM and retriever, make the examples, write `out` and `out.meta.json`.

    `exclude_qa`: evaluation files whose titles and questions are kept out of the data; default
    ../shared/data/qa_dev.jsonl. With none found, this refuses to run unless `allow_no_exclusion`.
    `n_articles` None: every eligible article. `command`: the command line to record.
    """
    from ragcomp.models import load_causal_lm
    from ragcomp.retrieval import CorpusRetriever

    t0 = time.perf_counter()
    titles, questions, files, passages = load_sources(exclude_qa, allow_no_exclusion, corpus)
    model = load_causal_lm(lm, device=device)
    retriever = CorpusRetriever.for_corpus(corpus, embedder, None, device, progress) if n_negatives else None
    records, stats = make_examples(
        passages, model, retriever, n_articles, titles, questions, n_negatives=n_negatives,
        questions_per_article=questions_per_article, batch_size=batch_size,
        max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    if not records:
        raise RuntimeError("no example survived the checks; see the rejection counts with a small run")
    meta = {
        "format_version": FORMAT_VERSION, "method": "ragcomp.train.provence_data (see its docstring)",
        "args": {"n_articles": n_articles, "corpus": str(corpus), "lm": lm, "embedder": embedder,
                 "n_negatives": n_negatives, "questions_per_article": questions_per_article,
                 "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": seed,
                 "device": str(model.device), "lm_dtype": str(model.dtype)},
        "command": command,
        "excluded": {"files": files, "titles": len(titles), "questions": len(questions)},
        "corpus_passages": len(passages), "few_shot": FEW_SHOT, "stats": stats,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_jsonl(records, out, meta)
    return meta
