"""The contract every registered method keeps, through every public entry point (issue 21 item 6).

For each name in `ragcomp.available_methods()` (so a newly registered method is covered without
editing this file) and each entry point (`compress`, `compress_batch`, `acompress`, a `Pipeline`
ending in a `TokenBudget`, the LlamaIndex postprocessor, the LangChain document compressor), on
the same few short passages:

- every kept item's spans are in-order, non-overlapping, non-empty character ranges into the
  ORIGINAL passage text, and the kept text equals those ranges joined with the step's
  `span_separator` (base.py, types.py); a step whose `span_separator` is None writes new text
  (recomp-abstractive): its kept items, and a pipeline's through it, have no spans, and its summary
  sits on the first non-blank passage's item (its module's documented rule); xrag keeps each
  passage whole, (0, len) spans, its context an EmbeddingContext whose string is the text fallback;
- one result item per input passage, carrying the input Passage itself; the context is the kept
  texts joined with the step's `separator`; `empty` is "nothing kept";
- in a Pipeline with TokenBudget(N, tokenizer="cl100k"): tokens_out == the cl100k count of the
  context <= N;
- an empty passage list gives an empty result (context "", no items) without error;
- inputs (Passages, LlamaIndex nodes, LangChain Documents, their metadata) are not mutated;
- compress, each item of compress_batch, and acompress (run concurrently) agree (all methods here
  are deterministic: greedy generation, no sampling); the integrations return what `compress`
  keeps, their async paths what their sync paths return.

Real offline models, cheapest settings (short generations), each loaded once per process by the
library's own caches; compressors are built once per module.
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ragcomp import (
    CompressionResult,
    Compressor,
    Passage,
    Pipeline,
    TokenBudget,
    available_methods,
    load_compressor,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# Cheapest settings each method accepts; a method not named here runs with its defaults.
PARAMS: dict[str, dict[str, Any]] = {
    "budget": {"max_tokens": 30},
    "recomp-abstractive": {"max_new_tokens": 12},
    "rerank": {"top_n": 2},  # something is dropped
    "recomp-extractive": {"top_k": 3},
    "provence": {"min_sentences": 1},  # something is kept, so the span checks are not vacuous
    "lingua": {"rate": 0.5},
    # xrag: its defaults. The packaged projector; a passage with no stored vector is embedded once by
    # the shared MiniLM (encode_missing=True), so no vector index is needed here.
}
BUDGET = 40  # cl100k tokens; the passages are 36-45 each, so at most one fits and the budget step cuts
BUDGET_TOKENIZER = "cl100k"

QUERIES = [
    "When did the Eiffel Tower open to the public?",
    "How high is the summit of Mount Everest?",
    "Which colour lies between yellow and red?",
]
TEXTS = {
    "eiffel": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the "
              "company of Gustave Eiffel. It opened to the public in 1889 for the World's Fair.",
    "everest": "Mount Everest is the highest mountain on Earth above sea level. It lies in the Mahalangur "
               "Himal sub-range of the Himalayas. Its summit is 8,849 metres high.",
    "orange": "Orange is the colour between yellow and red on the spectrum of visible light. It is named "
              "after the fruit of the same name. In Europe and America it is linked with autumn.",
    # Padding, a newline, a double space, non-ASCII letters (a chunk as a splitter leaves it): spans
    # must still point at the exact characters.
    "cafe": "\n Café Müller is a dance piece by Pina Bausch.\nIt premiered in 1978 in Wuppertal.  Its "
            "stage is full of chairs, and the dancers move between them. \n",
    "blank": " \n ",  # a retriever can return a blank chunk: never kept
}
LISTS = [["eiffel", "everest", "orange"], ["orange", "everest", "cafe"], ["everest", "blank", "eiffel"]]
SCORES = {"eiffel": 0.9, "everest": 0.7, "orange": 0.4, "cafe": 0.2, "blank": 0.1}


def _passage(pid: str, with_score: bool) -> Passage:
    meta = {"title": pid.title(), "source": {"url": f"https://example.org/{pid}", "tags": [pid, "wiki"]}}
    return Passage(pid, TEXTS[pid], SCORES[pid] if with_score else None, meta)


def passage_lists(with_scores: bool = True) -> list[list[Passage]]:
    """Fresh Passage objects for each query (a LangChain Document has no score: with_scores=False)."""
    return [[_passage(pid, with_scores) for pid in ids] for ids in LISTS]


# -- known contract violations: (method, entry point) -> reason; each runs as a strict xfail, so a fix
# turns it into a failure until the entry is removed. None found when this file was written.
ENTRY_POINTS = ("compress", "compress_batch", "acompress", "pipeline", "llama_index", "langchain", "empty")
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def methods(entry: str) -> list[Any]:
    assert entry in ENTRY_POINTS
    out = []
    for m in available_methods():
        reason = KNOWN_VIOLATIONS.get((m, entry))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(m, id=m, marks=marks))
    return out


# -- fixtures: one compressor per method per module, compress results cached ----------------------
@pytest.fixture(scope="module")
def build() -> Callable[[str], Compressor]:
    cache: dict[str, Compressor] = {}

    def get(method: str) -> Compressor:
        if method not in cache:
            cache[method] = load_compressor(method, **PARAMS.get(method, {}))
        return cache[method]

    return get


@pytest.fixture(scope="module")
def compressed(build: Callable[[str], Compressor]) -> Callable[[str], tuple[list[list[Passage]], list]]:
    """`compress` of every query, once per method: (the passages given, the results)."""
    cache: dict[str, tuple[list[list[Passage]], list[CompressionResult]]] = {}

    def get(method: str) -> tuple[list[list[Passage]], list[CompressionResult]]:
        if method not in cache:
            comp = build(method)
            lists = passage_lists()
            cache[method] = (lists, [comp.compress(q, ps) for q, ps in zip(QUERIES, lists, strict=True)])
        return cache[method]

    return get


# -- checks ---------------------------------------------------------------------------------------
def check_spans(original: str, text: str, spans: list[tuple[int, int]], sep: str | None, where: str) -> None:
    """Kept text = the spans of the ORIGINAL text joined with `sep`; no spans when `sep` is None."""
    if sep is None:  # new text (a summary): documented to carry no spans
        assert list(spans) == [], f"{where}: a step without span_separator kept spans {spans}"
        assert text, f"{where}: a kept abstractive item has no text"
        return
    prev_end = 0
    for a, b in spans:
        assert isinstance(a, int) and isinstance(b, int), f"{where}: span {(a, b)!r} is not two ints"
        assert prev_end <= a < b <= len(original), (
            f"{where}: span {(a, b)} is empty, out of order or outside the original text "
            f"(length {len(original)}, previous span ended at {prev_end})")
        prev_end = b
    joined = sep.join(original[a:b] for a, b in spans)
    assert text == joined, f"{where}: kept text {text!r} != spans of the original joined: {joined!r}"


def summary_on_first_passage(res: CompressionResult, given: list[Passage], where: str) -> None:
    """recomp-abstractive's documented rule: the summary goes into the first non-blank passage's item,
    every other passage is marked not kept."""
    live = [p for p in given if p.text.strip()]
    assert len(res.kept) <= 1, f"{where}: {len(res.kept)} items kept for one summary"
    if res.kept:
        assert res.kept[0].passage is live[0], f"{where}: the summary is not on the first non-blank passage"


# Method-specific rules documented for methods whose output has no spans (abstractive).
DOCUMENTED_RULES: dict[str, Callable[[CompressionResult, list[Passage], str], None]] = {
    "recomp-abstractive": summary_on_first_passage,
}


def check_result(res: CompressionResult, given: list[Passage], comp: Compressor, sep: str | None,
                 where: str, method: str) -> None:
    assert sorted(map(id, (c.passage for c in res.items))) == sorted(map(id, given)), (
        f"{where}: items are not exactly one per input passage, carrying the input Passage")
    for c in res.kept:
        check_spans(c.passage.text, c.text, list(c.spans), sep, f"{where} [{c.passage.id}]")
    for c in res.items:
        if not c.kept:
            assert c.text == "" and list(c.spans) == [], f"{where}: a dropped item keeps text or spans"
    assert str(res.context) == comp.separator.join(c.text for c in res.kept if c.text), (
        f"{where}: context is not the kept texts joined with the separator")
    assert res.empty == (not res.kept), f"{where}: empty={res.empty} with {len(res.kept)} kept item(s)"
    if method in DOCUMENTED_RULES:
        DOCUMENTED_RULES[method](res, given, where)


def check_empty(res: CompressionResult, where: str) -> None:
    assert str(res.context) == "" and res.items == [] and res.kept == [], f"{where}: {res!r}"
    assert res.empty and res.tokens_out == 0, f"{where}: empty={res.empty} tokens_out={res.tokens_out}"


def signature(res: CompressionResult) -> tuple:
    """What must agree between entry points (scores compared separately, to float tolerance)."""
    return (str(res.context), res.empty, res.tokens_in, res.tokens_out,
            [(c.passage.id, c.text, [tuple(s) for s in c.spans], c.kept) for c in res.items])


def check_agree(a: CompressionResult, b: CompressionResult, where: str) -> None:
    assert signature(a) == signature(b), f"{where}: results differ"
    for x, y in zip(a.items, b.items, strict=True):
        assert (x.score is None) == (y.score is None), f"{where}: score {x.score} vs {y.score}"
        if x.score is not None:
            assert math.isclose(x.score, y.score, rel_tol=1e-4, abs_tol=1e-5), (
                f"{where} [{x.passage.id}]: score {x.score} vs {y.score}")
    ea, eb = getattr(a.context, "embeddings", None), getattr(b.context, "embeddings", None)
    assert (ea is None) == (eb is None)
    if ea is not None:  # xrag: the context carries one projected embedding per kept document
        np.testing.assert_allclose(ea, eb, atol=1e-5, err_msg=f"{where}: context embeddings differ")


def unchanged(before: list[list[Passage]], after: list[list[Passage]], where: str) -> None:
    assert after == before, f"{where}: the input passages (text, id, score or metadata) were modified"


def _sep(comp: Compressor) -> str | None:
    return comp.span_separator


# -- compress, compress_batch, acompress ----------------------------------------------------------
@pytest.mark.parametrize("method", methods("compress"))
def test_compress(method: str, build, compressed) -> None:
    comp = build(method)
    lists, results = compressed(method)
    snapshot = [copy.deepcopy(ps) for ps in passage_lists()]
    for qi, (ps, res) in enumerate(zip(lists, results, strict=True)):
        check_result(res, ps, comp, _sep(comp), f"{method} compress q{qi}", method)
    assert any(res.kept for res in results), f"{method}: nothing kept for any query (the checks were vacuous)"
    unchanged(snapshot, lists, f"{method} compress")


@pytest.mark.parametrize("method", methods("compress_batch"))
def test_compress_batch(method: str, build, compressed) -> None:
    comp = build(method)
    _, singles = compressed(method)
    lists = passage_lists()
    snapshot = copy.deepcopy(lists)
    batch = comp.compress_batch(QUERIES, lists)
    assert len(batch) == len(QUERIES)
    for qi, (ps, res) in enumerate(zip(lists, batch, strict=True)):
        check_result(res, ps, comp, _sep(comp), f"{method} compress_batch q{qi}", method)
        check_agree(singles[qi], res, f"{method} compress vs compress_batch item {qi}")
    unchanged(snapshot, lists, f"{method} compress_batch")


@pytest.mark.parametrize("method", methods("acompress"))
def test_acompress(method: str, build, compressed) -> None:
    comp = build(method)
    _, singles = compressed(method)
    lists = passage_lists()
    snapshot = copy.deepcopy(lists)

    async def run_all() -> list[CompressionResult]:  # concurrently, as an event loop would
        return list(await asyncio.gather(*(comp.acompress(q, ps) for q, ps in zip(QUERIES, lists,
                                                                                   strict=True))))

    results = asyncio.run(run_all())
    for qi, (ps, res) in enumerate(zip(lists, results, strict=True)):
        check_result(res, ps, comp, _sep(comp), f"{method} acompress q{qi}", method)
        check_agree(singles[qi], res, f"{method} compress vs acompress q{qi}")
    unchanged(snapshot, lists, f"{method} acompress")


# -- Pipeline with a TokenBudget ------------------------------------------------------------------
@pytest.mark.parametrize("method", methods("pipeline"))
def test_pipeline_with_token_budget(method: str, build) -> None:
    comp = build(method)
    budget = TokenBudget(BUDGET, tokenizer=BUDGET_TOKENIZER)
    pipe = Pipeline([comp, budget])
    assert pipe.counter.name == budget.counter.name  # the pipeline counts with the budget's tokenizer
    # Spans compose back to the original text unless a step writes new text.
    sep = None if any(s.span_separator is None for s in pipe.steps) else _sep(comp)
    lists = passage_lists()
    snapshot = copy.deepcopy(lists)
    singles = [pipe.compress(q, ps) for q, ps in zip(QUERIES, lists, strict=True)]
    for qi, (ps, res) in enumerate(zip(lists, singles, strict=True)):
        where = f"{method} Pipeline+TokenBudget({BUDGET}) q{qi}"
        check_result(res, ps, pipe, sep, where, method)
        n = budget.counter.count(str(res.context)) if res.context else 0
        assert res.tokens_out == n <= BUDGET, f"{where}: tokens_out={res.tokens_out}, counted {n}"
        assert [s.name for s in res.steps] == [comp.name, budget.name]
    batch_lists = passage_lists()
    batch = pipe.compress_batch(QUERIES, batch_lists)
    for qi, (ps, res) in enumerate(zip(batch_lists, batch, strict=True)):
        check_result(res, ps, pipe, sep, f"{method} Pipeline compress_batch q{qi}", method)
        check_agree(singles[qi], res, f"{method} Pipeline compress vs compress_batch q{qi}")
    unchanged(snapshot, lists, f"{method} Pipeline")
    unchanged(snapshot, batch_lists, f"{method} Pipeline compress_batch")


# -- LlamaIndex postprocessor ---------------------------------------------------------------------
def _nodes(ps: list[Passage]) -> list:
    from llama_index.core.schema import NodeWithScore, TextNode

    return [NodeWithScore(node=TextNode(id_=p.id, text=p.text, metadata=copy.deepcopy(p.metadata)),
                          score=p.score) for p in ps]


@pytest.mark.parametrize("method", methods("llama_index"))
def test_llama_index_postprocessor(method: str, build, compressed) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import QueryBundle

    from ragcomp.integrations.llama_index import RagcompPostprocessor

    comp = build(method)
    post = RagcompPostprocessor(method=method, **PARAMS.get(method, {}))
    assert post.compressor.span_separator == comp.span_separator
    _, singles = compressed(method)
    for qi, (q, ps) in enumerate(zip(QUERIES, passage_lists(), strict=True)):
        where = f"{method} RagcompPostprocessor q{qi}"
        nodes = _nodes(ps)
        before = [n.model_dump() for n in nodes]
        out = post.postprocess_nodes(nodes, query_bundle=QueryBundle(query_str=q))
        assert [n.model_dump() for n in nodes] == before, f"{where}: the input nodes were modified"
        originals = {n.node.node_id: n.node for n in nodes}
        assert len({n.node.node_id for n in out}) == len(out), f"{where}: a node came back twice"
        for n in out:
            orig = originals[n.node.node_id]
            assert n.node is not orig, f"{where}: an input node was returned, not a copy"
            meta = n.node.metadata
            check_spans(orig.get_content(), n.node.get_content(), [tuple(s) for s in meta["ragcomp_spans"]],
                        comp.span_separator, f"{where} [{orig.node_id}]")
            assert {k: meta[k] for k in orig.metadata} == orig.metadata, f"{where}: metadata not kept"
        want = [(c.passage.id, c.text, [list(s) for s in c.spans]) for c in singles[qi].kept]
        got = [(n.node.node_id, n.node.get_content(), n.node.metadata["ragcomp_spans"]) for n in out]
        assert got == want, f"{where}: nodes differ from what compress keeps"
        if qi == 1:  # the async path, on the list with the padded chunk
            nodes = _nodes(ps)
            out = asyncio.run(post.apostprocess_nodes(nodes, query_bundle=QueryBundle(query_str=q)))
            assert [n.model_dump() for n in nodes] == before, f"{where} async: inputs modified"
            got = [(n.node.node_id, n.node.get_content(), n.node.metadata["ragcomp_spans"]) for n in out]
            assert got == want, f"{where}: apostprocess_nodes differs from postprocess_nodes"


# -- LangChain document compressor ----------------------------------------------------------------
@pytest.mark.parametrize("method", methods("langchain"))
def test_langchain_compressor(method: str, build) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from ragcomp.integrations.langchain import RagcompCompressor

    comp = build(method)
    lc = RagcompCompressor(method=method, **PARAMS.get(method, {}))
    assert lc.compressor.span_separator == comp.span_separator
    # A Document has no score: the reference passages have none either.
    ref_lists = passage_lists(with_scores=False)
    refs = comp.compress_batch(QUERIES, ref_lists)
    for qi, (q, ps) in enumerate(zip(QUERIES, passage_lists(with_scores=False), strict=True)):
        where = f"{method} RagcompCompressor q{qi}"
        docs = [Document(page_content=p.text, metadata=copy.deepcopy(p.metadata), id=p.id) for p in ps]
        before = [d.model_dump() for d in docs]
        out = lc.compress_documents(docs, q)
        assert [d.model_dump() for d in docs] == before, f"{where}: the input documents were modified"
        originals = {d.id: d for d in docs}
        for d in out:
            orig = originals[d.id]
            assert d is not orig, f"{where}: an input document was returned, not a copy"
            check_spans(orig.page_content, d.page_content, [tuple(s) for s in d.metadata["ragcomp_spans"]],
                        comp.span_separator, f"{where} [{d.id}]")
            assert {k: d.metadata[k] for k in orig.metadata} == orig.metadata, f"{where}: metadata not kept"
        want = [(c.passage.id, c.text, [list(s) for s in c.spans]) for c in refs[qi].kept]
        got = [(d.id, d.page_content, d.metadata["ragcomp_spans"]) for d in out]
        assert got == want, f"{where}: documents differ from what compress keeps"
        if qi == 1:  # the async path, on the list with the padded chunk
            out = asyncio.run(lc.acompress_documents(docs, q))
            assert [d.model_dump() for d in docs] == before, f"{where} async: inputs modified"
            got = [(d.id, d.page_content, d.metadata["ragcomp_spans"]) for d in out]
            assert got == want, f"{where}: acompress_documents differs from compress_documents"


# -- no passages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", methods("empty"))
def test_empty_passage_list(method: str, build, compressed) -> None:
    comp = build(method)
    q = QUERIES[0]
    check_empty(comp.compress(q, []), f"{method} compress([])")
    assert comp.compress_batch([], []) == []
    check_empty(comp.compress_batch([q], [[]])[0], f"{method} compress_batch([[]])")
    mixed_lists = [*passage_lists()[:1], []]
    mixed = comp.compress_batch([q, QUERIES[1]], mixed_lists)
    check_empty(mixed[1], f"{method} compress_batch with an empty list second")
    check_agree(compressed(method)[1][0], mixed[0], f"{method} compress vs compress_batch beside []")
    check_empty(asyncio.run(comp.acompress(q, [])), f"{method} acompress([])")
    check_empty(Pipeline([comp, TokenBudget(BUDGET, tokenizer=BUDGET_TOKENIZER)]).compress(q, []),
                f"{method} Pipeline.compress([])")
    pytest.importorskip("llama_index.core")
    pytest.importorskip("langchain_core")
    from llama_index.core.schema import QueryBundle

    from ragcomp.integrations.langchain import RagcompCompressor
    from ragcomp.integrations.llama_index import RagcompPostprocessor

    post = RagcompPostprocessor(compressor=comp)
    assert post.postprocess_nodes([], query_bundle=QueryBundle(query_str=q)) == []
    check_empty(post.last_result, f"{method} RagcompPostprocessor([])")
    lc = RagcompCompressor(compressor=comp)
    assert list(lc.compress_documents([], q)) == []
    check_empty(lc.last_result, f"{method} RagcompCompressor([])")
