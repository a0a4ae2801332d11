"""Two-passage training examples for the Provence pruner: comparison and bridge questions.

Why: the single-passage data of `provence_data` labels one sentence per question, while HotpotQA-style
questions need evidence from two passages, and a comparison's answer is one of the two compared names
(kept only when a sentence naming it is kept). On qa_dev (top-10, threshold 0.1, min_sentences=4) the
shipped pruner kept the answer for 159/160 single questions but 17/22 bridge and 8/14 comparison ones.

Method (corpus only, template questions, seeded; no LM; `generate_multi` writes JSONL + .meta.json in
the `provence_data` record format, so `ragcomp train provence --data pd_all.jsonl.gz multi.jsonl.gz`
mixes it in):

1. Facts per article (`article_facts`), from the sentences of `ragcomp.text.split_sentences`:
   population and area (a number after "population of" / "area of", with million/billion), founding
   year ("founded"/"established" ... year), for People and History articles the earliest year
   (1000-2029) of any sentence, and from the Wikidata description a nationality adjective (People:
   the description's capitalised first word) and a kind noun (the last word before " in/of/from/,"),
   each kept only when a sentence of the extract holds it (that sentence gets the label).
2. Comparison questions: two articles with the same fact (values at least 10% or 5 years apart),
   one of a few templates per fact ("Which has the larger population, A or B?", "Who lived earlier,
   A or B?", "Were A and B both American?", "Are A and B both rivers?" (yes or no, same topic)).
   Labels on each passage: the fact sentence, plus the first sentence when the fact sentence does not
   name the entity (so the name, a comparison's answer, is kept). Ranking label 1 on both passages.
3. Bridge questions: a question of a `provence_data` file about article B that names B (case-sensitive)
   is rephrased through an article A whose sentence mentions B as a name (not inside a longer
   capitalised name): B's name becomes "the <B's kind noun> linked to <A>" (or another connector).
   Labels: A's mentioning sentence, B's original target sentence; ranking label 1 on both.
4. Hard negatives as in `provence_data` (`hard_negatives`): MiniLM retrieval for the question, other
   than both sources, evaluation gold titles and passages restating a labelled sentence.

Exclusions as in `provence_data`: evaluation gold titles are never a source (A, B or the article a
bridge's question came from) nor a negative; evaluation questions (normalised) are filtered out.

Records: the `provence_data` fields (kind "positive"/"negative", source "A|B", target the list of
labelled sentence indices) plus `task` ("comparison:<fact>" or "bridge") and `answer`.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragcomp.text import Sentence, split_sentences
from ragcomp.train.provence_data import (
    FORMAT_VERSION,
    content_words,
    hard_negatives,
    load_sources,
    make_record,
    normalise_question,
    read_examples,
    write_jsonl,
)
from ragcomp.train.provence_facts import (  # names_entity, parse_number: re-exported
    Fact,
    article_facts,
    entity_name,
    evidence_labels,
    kind_noun,
    names_entity,  # noqa: F401
    parse_number,  # noqa: F401
    plural,
)
from ragcomp.types import Passage

# Templates per fact: (question, True when the larger value answers). "{a}"/"{b}" are names.
COMPARISON_TEMPLATES: dict[str, list[tuple[str, bool]]] = {
    "population": [("Which has the larger population, {a} or {b}?", True),
                   ("Which is more populous, {a} or {b}?", True),
                   ("Which has fewer inhabitants, {a} or {b}?", False)],
    "area": [("Which covers a larger area, {a} or {b}?", True),
             ("Which is smaller in area, {a} or {b}?", False)],
    "founded": [("Which was founded first, {a} or {b}?", False),
                ("Which was established later, {a} or {b}?", True)],
    "year_People": [("Who lived earlier, {a} or {b}?", False), ("Who came first, {a} or {b}?", False),
                    ("Who lived more recently, {a} or {b}?", True)],
    "year_History": [("Which came first, {a} or {b}?", False), ("Which is more recent, {a} or {b}?", True)],
}
YES_NO_TEMPLATES: dict[str, list[str]] = {
    "nationality": ["Were {a} and {b} both {value}?", "Are {a} and {b} both {value}?"],
    "kind": ["Are {a} and {b} both {plural}?", "Is it true that {a} and {b} are both {plural}?"],
}
BRIDGE_CONNECTORS = ("linked to {a}", "mentioned in connection with {a}", "associated with {a}",
                     "that {a} is tied to")
MIN_RATIO, MIN_YEARS = 1.1, 5  # compared values closer than this make shaky answers
MIN_KIND_COUNT = 5  # a yes/no value (kind noun, nationality) held by fewer articles is not asked about


# -- comparison ---------------------------------------------------------------------------------
def comparison_pairs(facts: dict[str, dict[str, Fact]], topics: dict[str, str], n: int,
                     rng: random.Random, uses: int = 3,
                     min_kind_count: int = MIN_KIND_COUNT) -> list[tuple[str, str, str]]:
    """Up to `n` (fact, article a, article b) pairs, fact kinds taken in turn; an article is in at most
    `uses` pairs of one fact. Numeric facts need values apart; yes/no facts pair within one topic."""
    per_fact: dict[str, list[tuple[str, str, str]]] = {}
    for fact in sorted({f for fs in facts.values() for f in fs}):
        ids = sorted(a for a, fs in facts.items() if fact in fs)
        found: list[tuple[str, str, str]] = []
        seen: set[frozenset[str]] = set()
        values = Counter(facts[a][fact].value for a in ids)
        is_text = isinstance(facts[ids[0]][fact].value, str)
        if is_text:
            # Rare kinds ("charge", "surrounding") are parsing noise; and half the pairs share the
            # value, so "yes" is as common as "no".
            ids = [a for a in ids if values[facts[a][fact].value] >= min_kind_count]
        for _ in range(uses):
            rng.shuffle(ids)
            pairs = list(zip(ids[::2], ids[1::2], strict=False))
            if is_text:
                grouped = sorted(ids, key=lambda a: (facts[a][fact].value, topics[a]))
                pairs = [p for p in zip(grouped[::2], grouped[1::2], strict=False)] + pairs
                rng.shuffle(pairs)
            for a, b in pairs:
                va, vb = facts[a][fact].value, facts[b][fact].value
                if frozenset((a, b)) in seen:
                    continue
                if isinstance(va, float) and isinstance(vb, float):
                    apart = abs(va - vb) >= MIN_YEARS if fact.startswith(("year", "founded")) \
                        else max(va, vb) >= MIN_RATIO * min(va, vb)
                    if not apart:
                        continue
                elif topics[a] != topics[b]:
                    continue  # "are a volcano and a poet both rivers?" teaches nothing
                seen.add(frozenset((a, b)))
                found.append((fact, a, b))
        if is_text:  # alternate "yes" and "no" pairs
            same = [f for f in found if facts[f[1]][fact].value == facts[f[2]][fact].value]
            other = [f for f in found if facts[f[1]][fact].value != facts[f[2]][fact].value]
            k = min(len(same), len(other))
            found = [f for pair in zip(same[:k], other[:k], strict=True) for f in pair] + same[k:] + other[k:]
        per_fact[fact] = found
    out: list[tuple[str, str, str]] = []
    while len(out) < n and any(per_fact.values()):
        for fact in sorted(per_fact):
            if per_fact[fact] and len(out) < n:
                out.append(per_fact[fact].pop(0))
    return out


def comparison_question(fact: str, a: str, b: str, fa: Fact, fb: Fact,
                        rng: random.Random) -> tuple[str, str]:
    """(question, answer) for a pair; the order of the two names is random."""
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    names = {"a": entity_name(first), "b": entity_name(second)}
    if fact in COMPARISON_TEMPLATES:
        template, larger_wins = rng.choice(COMPARISON_TEMPLATES[fact])
        bigger = a if float(fa.value) > float(fb.value) else b
        answer = bigger if larger_wins else (b if bigger == a else a)
        return template.format(**names), entity_name(answer)
    template = rng.choice(YES_NO_TEMPLATES[fact])
    value = rng.choice([fa.value, fb.value])
    answer = "yes" if fa.value == fb.value == value else "no"
    return template.format(**names, value=value, plural=plural(str(value))), answer


# -- bridge ---------------------------------------------------------------------------------------
def mention_sentences(passages: Sequence[Passage], sents: dict[str, list[Sentence]],
                      names: dict[str, str]) -> dict[str, list[tuple[str, int]]]:
    """For each article id in `names` (id -> name), the (article, sentence) pairs of other articles that
    mention the name on its own: case-sensitive, not inside a longer capitalised name."""
    by_first: dict[str, list[str]] = defaultdict(list)
    for pid, name in names.items():
        by_first[name.split()[0]].append(pid)
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for p in passages:
        words = set(re.findall(r"[\w'-]+", p.text))
        for pid in sorted({t for w in words for t in by_first.get(w, ())}):
            if pid == p.id:
                continue
            pat = re.compile(r"(?<![\w-])" + re.escape(names[pid]) + r"(?![\w-])")
            i = next((k for k, s in enumerate(sents[p.id]) if any(
                standalone(s.text, m.start(), m.end()) for m in pat.finditer(s.text))), None)
            if i is not None:
                out[pid].append((p.id, i))
    return out


def standalone(text: str, start: int, end: int) -> bool:
    """text[start:end] is a name on its own, not part of a longer capitalised one ("Java" in "Java
    Sea"): neither the next word nor the previous one (unless it opens the sentence) is capitalised."""
    before, after = text[:start].split(), text[end:].split()
    if after and after[0][:1].isupper():
        return False
    return not (len(before) > 1 and before[-1][:1].isupper())


def bridge_question(question: str, name_b: str, noun_b: str | None, name_a: str,
                    rng: random.Random) -> str | None:
    """The question about B asked through A: B's name becomes "the <noun> linked to <A>"."""
    pat = re.compile(r"(?:\b[Tt]he )?(?<![\w-])" + re.escape(name_b) + r"(?![\w-])")
    if not pat.search(question):
        return None
    phrase = f"the {noun_b or 'one'} " + rng.choice(BRIDGE_CONNECTORS).format(a=name_a)
    out = pat.sub(phrase, question, count=1)
    return out[0].upper() + out[1:]


# -- examples -------------------------------------------------------------------------------------
def make_multi_examples(
    passages: Sequence[Passage], retriever: Any, single: Sequence[dict[str, Any]],
    exclude_titles: set[str], exclude_questions: set[str], n_comparison: int, n_bridge: int,
    n_negatives: int = 1, seed: int = 0, bridges_per_question: int = 2, min_kind_count: int = MIN_KIND_COUNT,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Comparison and bridge examples (module docstring) and counts. `single`: positive records of a
    `provence_data` file (bridge sources); `retriever`: `retrieve_batch(questions, k)`, or None when
    `n_negatives` is 0. A source question is rephrased through up to `bridges_per_question` articles."""
    for name, value in (("n_comparison", n_comparison), ("n_bridge", n_bridge), ("n_negatives", n_negatives)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    usable = sorted((p for p in passages if p.id not in exclude_titles), key=lambda p: p.id)
    by_id = {p.id: p for p in usable}
    sents = {p.id: split_sentences(p.text) for p in usable}
    stats["articles_excluded_eval"] = len(passages) - len(usable)
    # (question, answer, task, [(passage id, labelled sentences)])
    jobs: list[tuple[str, str, str, list[tuple[str, list[int]]]]] = []

    facts = {p.id: f for p in usable if len(sents[p.id]) > 1 and (f := article_facts(p, sents[p.id]))}
    topics = {p.id: str(p.metadata.get("topic", "")) for p in usable}
    for fact, a, b in comparison_pairs(facts, topics, n_comparison, rng, min_kind_count=min_kind_count):
        fa, fb = facts[a][fact], facts[b][fact]
        question, answer = comparison_question(fact, a, b, fa, fb, rng)
        jobs.append((question, answer, f"comparison:{fact}",
                     [(a, evidence_labels(sents[a], fa.sentence, a)),
                      (b, evidence_labels(sents[b], fb.sentence, b))]))

    if n_bridge:
        sources = [r for r in single if r.get("kind") == "positive" and r.get("source") in by_id
                   and r.get("target") is not None and len(entity_name(r["source"])) >= 4
                   and entity_name(r["source"]) in r["question"]]
        names = {r["source"]: entity_name(r["source"]) for r in sources}
        mentions = mention_sentences(usable, sents, names)
        sources = [r for r in sources if mentions.get(r["source"])]
        rng.shuffle(sources)
        # Each question once through one mentioning article, then again through a second one, ...
        options = {id(r): rng.sample(mentions[r["source"]], len(mentions[r["source"]])) for r in sources}
        made = 0
        for round_ in range(bridges_per_question):
            for r in sources:
                if made >= n_bridge or round_ >= len(options[id(r)]):
                    continue
                b = r["source"]
                a, i = options[id(r)][round_]
                question = bridge_question(r["question"], names[b], kind_noun(str(by_id[b].metadata.get(
                    "description") or "")), entity_name(a), rng)
                if question is None:
                    continue
                target_b = r["target"] if isinstance(r["target"], list) else [r["target"]]
                jobs.append((question, "", "bridge", [(a, [i]), (b, target_b)]))
                made += 1
        stats["bridge_sources"] = len(sources)

    seen: set[str] = set()
    kept_jobs = []
    for job in jobs:
        norm = normalise_question(job[0])
        if norm in exclude_questions or norm in seen:
            stats["rejected_eval_question" if norm in exclude_questions else "rejected_duplicate"] += 1
            continue
        seen.add(norm)
        kept_jobs.append(job)
    hits = retriever.retrieve_batch([j[0] for j in kept_jobs], k=n_negatives + 12) \
        if kept_jobs and n_negatives else [[] for _ in kept_jobs]
    records: list[dict[str, Any]] = []
    for k, ((question, answer, task, evidence), found) in enumerate(zip(kept_jobs, hits, strict=True)):
        qid, source = f"m{k:06d}", "|".join(pid for pid, _ in evidence)
        rows = [make_record(qid, question, by_id[pid], sents[pid], labels, "positive", source, None)
                for pid, labels in evidence]
        labelled = [content_words(sents[pid][i].text) for pid, labels in evidence for i in labels]
        source_ids = {pid for pid, _ in evidence}
        negs = hard_negatives(found, source_ids | exclude_titles, labelled, n_negatives, stats)
        rows += [make_record(qid, question, hit, hit_sents, None, "negative", source, rank)
                 for rank, hit, hit_sents in negs]
        for row in rows:
            row.update(task=task, answer=answer)
        records.extend(rows)
        stats[f"questions_{task}"] += 1
        stats["negatives"] += len(negs)
    stats["questions"] = len(kept_jobs)
    stats["examples"] = len(records)
    return records, dict(sorted(stats.items()))


def generate_multi(
    out: str | Path, n_comparison: int = 3000, n_bridge: int = 3000, single: Sequence[str | Path] = (),
    exclude_qa: Sequence[str | Path] | None = None, corpus: str = "wiki", embedder: str = "minilm",
    device: str | None = None, n_negatives: int = 1, seed: int = 0, progress: bool = True,
    allow_no_exclusion: bool = False, command: str | None = None,
) -> dict[str, Any]:
    """Load the corpus (and the retriever for negatives), make the examples, write `out` and its
    .meta.json. `single`: provence-data files whose questions the bridge examples rephrase."""
    from ragcomp.retrieval import CorpusRetriever

    if n_bridge and not single:
        raise ValueError("bridge examples rephrase provence-data questions: pass --questions FILE "
                         "(or --bridge 0)")
    t0 = time.perf_counter()
    titles, questions, files, passages = load_sources(exclude_qa, allow_no_exclusion, corpus)
    single_records = [r for path in single for r in read_examples(path)]
    retriever = CorpusRetriever.for_corpus(corpus, embedder, None, device, progress) if n_negatives else None
    records, stats = make_multi_examples(passages, retriever, single_records, titles, questions,
                                         n_comparison, n_bridge, n_negatives, seed)
    if not records:
        raise RuntimeError("no example was made; check the corpus and --questions file")
    meta = {
        "format_version": FORMAT_VERSION, "method": "ragcomp.train.provence_multi (see its docstring)",
        "args": {"n_comparison": n_comparison, "n_bridge": n_bridge, "corpus": str(corpus),
                 "embedder": embedder, "n_negatives": n_negatives, "seed": seed,
                 "single": [str(s) for s in single]},
        "command": command,
        "excluded": {"files": files, "titles": len(titles), "questions": len(questions)},
        "corpus_passages": len(passages), "templates": {"comparison": COMPARISON_TEMPLATES,
                                                        "yes_no": YES_NO_TEMPLATES,
                                                        "bridge": BRIDGE_CONNECTORS},
        "stats": stats, "seconds": round(time.perf_counter() - t0, 1),
    }
    write_jsonl(records, out, meta)
    return meta
