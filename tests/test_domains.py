"""The multi-domain benchmark: document readers, question builders and the suite runner, on small
documents written here (no package download, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcomp.cli import main
from ragcomp.eval.domain_core import Built, Doc, chunk_doc, doc_split, place_questions, write_jsonl
from ragcomp.eval.domain_faq import faq_candidates, html_faq_entries, text_faq_entries
from ragcomp.eval.domain_sources import (
    build_wiki,
    html_definition_questions,
    info_questions,
    man_questions,
    what_it_does,
)
from ragcomp.eval.domain_text import html_blocks, html_sections, info_nodes, render_man
from ragcomp.eval.suite import bucket, load_domain, naive_context, run_suite
from ragcomp.eval.suite_report import kind_rows, suite_markdown
from ragcomp.text import split_sentences
from ragcomp.tokens import get_counter

ROFF = r""".\" A small page in the Linux man-pages style.
.TH frob 2 2024-01-01 "Test pages"
.SH NAME
frob \- count the widgets in a box
.SH SYNOPSIS
.nf
.B #include <frob.h>
.PP
.BI "int frob(int " box );
.fi
.SH DESCRIPTION
.BR frob ()
counts the widgets in
.IR box .
It never blocks\(em
not even on Tuesdays.
.SH ERRORS
.TP
.B EBOXFULL
The box holds more than 100 widgets.
.TP
.B ENOWIDGET
.I box
is empty.
"""

HTML = """<html><head><title>FROB</title></head><body>
<div class="navheader"><table><tr><th>Prev</th></tr></table></div>
<div class="refnamediv"><h2>FROB</h2><p>FROB — count the widgets in a box</p></div>
<div class="refsect1"><h2>Options</h2><dl>
<dt><span class="term"><code>-n</code></span></dt><dt>--number=<em>N</em></dt>
<dd><p>Count the widgets <code>N</code> times over. Slow.</p><p>A second paragraph.</p></dd>
<dt>How do I frob twice?</dt><dd><p>Run it twice. Then rest.</p></dd>
</dl></div>
<div class="navfooter"><p>Next page</p></div></body></html>
"""

INFO = """This is frob.info, produced by makeinfo.

\x1f
File: frob.info,  Node: frob invocation,  Next: Index,  Up: Top

2.1 ‘frob’: Count the widgets in a box
======================================

‘frob’ counts the widgets.  Synopsis:

     frob [OPTION]... BOX

‘-n’
‘--number’
     Count every widget twice, starting with the largest.

   An exit status of zero indicates success.

\x1f
File: frob.info,  Node: Index,  Prev: frob invocation,  Up: Top

Index
*****
"""


# -- readers -----------------------------------------------------------------------------------------


def test_render_man_sections_tags_and_escapes() -> None:
    page = render_man(ROFF)
    assert page is not None and (page.name, page.section) == ("frob", "2")
    assert [h for h, _ in page.sections] == ["NAME", "SYNOPSIS", "DESCRIPTION", "ERRORS"]
    assert page.paragraphs("NAME") == ["frob - count the widgets in a box"]
    assert page.paragraphs("SYNOPSIS") == ["#include <frob.h>\n\nint frob(int box);"]
    assert page.paragraphs("DESCRIPTION") == [
        "frob() counts the widgets in box. It never blocks— not even on Tuesdays."
    ]
    assert page.paragraphs("ERRORS") == [
        "EBOXFULL\nThe box holds more than 100 widgets.",
        "ENOWIDGET\nbox is empty.",
    ]
    assert render_man(".so man2/frob.2\n") is None


def test_html_blocks_skip_navigation_and_put_terms_above_definitions() -> None:
    blocks = html_blocks(HTML)
    texts = [b.text for b in blocks]
    assert "Prev" not in texts and "Next page" not in texts and "FROB" in texts
    assert [(b.kind, b.text) for b in blocks if b.kind == "dt"] == [
        ("dt", "-n"),
        ("dt", "--number=N"),
        ("dt", "How do I frob twice?"),
    ]
    sections = dict(html_sections(blocks, (2,)))
    assert sections["FROB"] == "FROB\n\nFROB — count the widgets in a box"
    assert sections["Options"] == (
        "Options\n\n-n\n--number=N\nCount the widgets N times over. Slow.\n\n"
        "A second paragraph.\n\nHow do I frob twice?\nRun it twice. Then rest."
    )


def test_info_nodes_headings_and_text() -> None:
    nodes = info_nodes(INFO)
    assert [n.name for n in nodes] == ["frob invocation"]  # the Index node is left out
    assert nodes[0].heading == "2.1 ‘frob’: Count the widgets in a box"
    assert nodes[0].text.startswith("2.1 ‘frob’: Count the widgets in a box\n\n‘frob’ counts the widgets.")
    assert "=====" not in nodes[0].text


# -- questions ---------------------------------------------------------------------------------------


def _is_sentence_of(evidence: str, text: str) -> bool:
    return evidence in text and any(s.text == evidence for s in split_sentences(text))


def test_man_questions_name_and_errno_with_verbatim_evidence() -> None:
    page = render_man(ROFF)
    assert page is not None
    doc = Doc("frob.2", "frob.2", [(h, f"{h}\n\n" + "\n\n".join(ps)) for h, ps in page.sections])
    cands = man_questions(doc, ["frob"], "count the widgets in a box", "2", page.paragraphs("ERRORS"))
    got = {(c.kind, c.question, tuple(c.answers), c.evidence) for c in cands}
    assert got == {
        (
            "name",
            "Which system call is used to count the widgets in a box?",
            ("frob",),
            "frob - count the widgets in a box",
        ),
        (
            "errno",
            "Which error does frob() give when the box holds more than 100 widgets?",
            ("EBOXFULL",),
            "EBOXFULL\nThe box holds more than 100 widgets.",
        ),
    }  # "ENOWIDGET: box is empty." is under 4 words: no question
    for c in cands:
        assert _is_sentence_of(c.evidence, doc.text)


def test_html_definition_questions_options_and_faq() -> None:
    blocks = html_blocks(HTML)
    doc = Doc("app-frob.html", "FROB", html_sections(blocks, (2,)))
    cands = html_definition_questions(doc, blocks, "frob", {"option", "faq"})
    assert [(c.kind, c.question, c.answers, c.evidence) for c in cands] == [
        (
            "option",
            "Which option of frob is used to count the widgets N times over?",
            ["-n", "--number"],
            "-n\n--number=N\nCount the widgets N times over.",
        ),
        ("faq", "How do I frob twice?", [], "Run it twice."),
    ]
    for c in cands:
        assert _is_sentence_of(c.evidence, doc.text)


def test_info_questions_title_and_options() -> None:
    node = info_nodes(INFO)[0]
    doc = Doc("frob:frob invocation", node.heading, [(node.heading, node.text)])
    cands = info_questions(doc, "frob", node.name)
    assert [(c.kind, c.question, c.answers) for c in cands] == [
        ("name", "Which command is used to count the widgets in a box?", ["frob"]),
        (
            "option",
            "Which option of frob is used to count every widget twice, starting with the largest?",
            ["-n", "--number"],
        ),
    ]
    assert cands[0].evidence == "2.1 ‘frob’: Count the widgets in a box"
    assert cands[1].evidence == "‘-n’\n‘--number’\n     Count every widget twice, starting with the largest."
    for c in cands:
        assert _is_sentence_of(c.evidence, doc.text)


FAQ_HTML = """<ol><li><a href="#q1">How do I frob a widget?</a></li></ol>
<p><b>(1) How do I frob a widget?</b></p>
<blockquote><p>Short answer: call frob with the widget as its only argument.</p>
<p>Longer answer: frob counts every part of the widget twice and prints the total.</p></blockquote>
<h2>2. Other things</h2><h3>2.1. Is frob free?</h3><p>Yes.</p>
"""

FAQ_TEXT = """FAQ

 1. Philosophy
  1.1 What is frob?
  1.2 Why frob?

 1. Philosophy

  1.1 What is frob?

  Frob is a tool that counts widgets in boxes, written long ago by people who
  liked widgets very much and still do today.

  1.2 Why frob?

  Because.
"""


def test_faq_entries_from_html_and_text() -> None:
    html = html_faq_entries(html_blocks(FAQ_HTML))
    assert html == [("How do I frob a widget?",
                     "Short answer: call frob with the widget as its only argument.\n\nLonger answer: frob "
                     "counts every part of the widget twice and prints the total.")]  # "Yes." is too short
    text = text_faq_entries(FAQ_TEXT)
    assert text == [("What is frob?", "Frob is a tool that counts widgets in boxes, written long ago by "
                     "people who\nliked widgets very much and still do today.")]
    docs, cands = faq_candidates("frob", html + text)
    assert [d.id for d in docs] == ["frob#1", "frob#2"]
    assert [(c.question, c.answers, c.evidence) for c in cands] == [
        ("How do I frob a widget?", [], "Short answer: call frob with the widget as its only argument."),
        ("What is frob?", [], text[0][1])]


def test_what_it_does_templates() -> None:
    assert (
        what_it_does("configuration parameter", "Sets the maximum number of widgets.")
        == "Which configuration parameter sets the maximum number of widgets?"
    )
    assert what_it_does("command", "Print the widgets") == "Which command is used to print the widgets?"
    assert what_it_does("command", "Equivalent to -vET.") is None  # not a verb
    assert what_it_does("command", "Do it") is None  # too short


def test_place_questions_drops_answer_in_question_and_split_evidence(tmp_path: Path) -> None:
    page = render_man(ROFF)
    assert page is not None
    doc = Doc("frob.2", "frob.2", [(h, f"{h}\n\n" + "\n\n".join(ps)) for h, ps in page.sections])
    cands = man_questions(doc, ["frob"], "count the widgets in a box", "2", page.paragraphs("ERRORS"))
    leak = type(cands[0])("frob.2", "name", "Which call is frob?", ["frob"], cands[0].evidence)
    gone = type(cands[0])("frob.2", "faq", "Is it gone?", [], "Not in the page.")
    built = Built([doc], [*cands, leak, gone], "section:512")
    passages, splits, stats = place_questions("t", built)
    assert [p["id"] for p in passages] == ["frob.2#0", "frob.2#1", "frob.2#2", "frob.2#3"]
    split = doc_split("frob.2", "t")
    assert splits["test" if split == "dev" else "dev"] == []
    qs = splits[split]
    assert [q["type"] for q in qs] == ["errno", "name"]  # kinds in turn, sorted by name
    assert stats["dropped_answer_in_question"] == 1 and stats["dropped_evidence_not_in_one_passage"] == 1
    by_id = {p["id"]: p for p in passages}
    for q in qs:
        gold = by_id[q["titles"][0]]
        assert q["evidence"][0] in gold["text"] and q["passage_words"] == len(gold["text"].split())
    assert {q["titles"][0] for q in qs} == {"frob.2#0", "frob.2#3"}  # NAME section, ERRORS section


def test_doc_split_is_stable_and_disjoint() -> None:
    ids = [f"page{i}" for i in range(200)]
    splits = [doc_split(i, "man") for i in ids]
    assert splits == [doc_split(i, "man") for i in ids]
    assert 70 < splits.count("dev") < 130
    assert [doc_split(i, "git") for i in ids] != splits  # the domain salts the split


def test_chunk_doc_tokens_keeps_text() -> None:
    text = " ".join(f"Sentence number {i} says something about widgets." for i in range(120))
    chunks = chunk_doc(Doc("d", "d", [("", text)]), "tokens:256")
    assert len(chunks) >= 4 and [c[0] for c in chunks[:2]] == ["d#0", "d#1"]
    assert all(c in text for _, c in chunks)


def test_build_wiki_from_a_small_file(tmp_path: Path) -> None:
    data = {
        "Paris": {
            "title": "Paris",
            "extract": "Paris est la capitale de la France. Elle compte deux millions d'habitants.",
            "description": "capitale de la France",
        },
        "Lyon": {"title": "Lyon", "extract": "Lyon est une ville française.", "description": "ville"},
    }
    path = tmp_path / "summaries_fr-fr.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    built = build_wiki("fr-fr", path=path)
    assert len(built.docs) == 2 and built.chunking == "none"
    [c] = built.candidates  # "ville" is one word: no question
    assert (c.question, c.answers, c.evidence) == (
        "Quel sujet est décrit comme « capitale de la France » ?",
        ["Paris"],
        "Paris est la capitale de la France.",
    )


def test_bucket_by_words() -> None:
    assert [bucket(n) for n in (0, 99, 100, 300, 301, 5000)] == [
        "<100",
        "<100",
        "100-300",
        "100-300",
        ">300",
        ">300",
    ]


# -- suite runner --------------------------------------------------------------------------------------

CORPORA = {
    "alpha": [
        (
            "a1",
            "The lighthouse keeper rang the brass bell at dawn. Gulls circled the rocks. The tide was low.",
        ),
        ("a2", "Bread is baked in a stone oven. The baker wakes at four. Flour comes from the mill."),
        (
            "a3",
            "The comet returns every 76 years. Astronomers photograph its tail. "
            + "Filler words here. " * 40,
        ),
    ],
    "beta": [
        ("b1", "Copper wire conducts electricity well. Silver conducts even better. Gold resists corrosion."),
        ("b2", "The violin has four strings. It is played with a bow. Cellos are larger than violins."),
    ],
}
QUESTIONS = {
    "alpha": [
        (
            "Who rang the brass bell at dawn?",
            ["lighthouse keeper"],
            "a1",
            "The lighthouse keeper rang the brass bell at dawn.",
        ),
        ("How often does the comet return?", [], "a3", "The comet returns every 76 years."),
    ],
    "beta": [("How many strings does a violin have?", ["four"], "b2", "The violin has four strings.")],
}


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    for name, passages in CORPORA.items():
        write_jsonl(
            root / name / "passages.jsonl.gz",
            [{"id": pid, "text": t, "doc": pid, "title": pid} for pid, t in passages],
        )
        write_jsonl(
            root / name / "dev.jsonl",
            [
                {
                    "id": f"{name}-{i}",
                    "type": "t",
                    "question": q,
                    "answers": a,
                    "titles": [pid],
                    "evidence": [ev],
                    "doc": pid,
                }
                for i, (q, a, pid, ev) in enumerate(QUESTIONS[name])
            ],
        )
    (root / "manifest.json").write_text(json.dumps({"domains": {n: {} for n in CORPORA}}))
    return root


def test_load_domain_uses_evidence_when_no_short_answer(suite_dir: Path) -> None:
    dom = load_domain(suite_dir, "alpha")
    assert [q.answers for q in dom.questions] == [
        ["lighthouse keeper"],
        ["The comet returns every 76 years."],
    ]
    assert [q.meta["short_answer"] for q in dom.questions] == [True, False]
    assert [q.meta["passage_words"] for q in dom.questions] == [17, 130]


def test_naive_context_keeps_the_most_similar_sentence_at_the_budget() -> None:
    from ragcomp.embeddings import shared_embedder
    from ragcomp.types import Passage

    counter = get_counter("cl100k")
    passages = [Passage(pid, t) for pid, t in CORPORA["beta"]]
    best = "The violin has four strings."
    ctx = naive_context(
        "How many strings does a violin have?",
        passages,
        counter.count(best),
        counter,
        shared_embedder("minilm"),
    )
    assert ctx == best
    assert naive_context("x", passages, 0, counter, shared_embedder("minilm")) == ""


def test_run_suite_two_domains_rows_buckets_and_tables(suite_dir: Path, tmp_path: Path) -> None:
    report = run_suite(
        suite_dir, ["recomp-extractive"], params={"top_k": 1}, retrieve_k=2, index_root=tmp_path / "idx"
    )
    assert list(report["domains"]) == ["alpha", "beta"]
    labels = ["none (uncompressed)", "recomp-extractive top_k=1", "naive@recomp-extractive top_k=1"]
    for dom in report["domains"].values():
        assert [r["label"] for r in dom["rows"]] == labels
    alpha = {r["label"]: r for r in report["domains"]["alpha"]["rows"]}
    # Both questions retrieve their passage; one kept sentence is each one's evidence.
    assert alpha["none (uncompressed)"]["answer_kept"] == 1.0
    assert alpha["recomp-extractive top_k=1"]["answer_kept"] == 1.0
    assert alpha["recomp-extractive top_k=1"]["evidence_recall"] == 1.0
    naive, method = alpha["naive@recomp-extractive top_k=1"], alpha["recomp-extractive top_k=1"]
    for a, b in zip(naive["per_question"], method["per_question"], strict=True):
        assert a["tokens_out"] <= b["tokens_out"]
    assert naive["answer_kept"] == 1.0  # same MiniLM scores, same budget: the same sentence
    assert alpha["none (uncompressed)"]["buckets"]["<100"]["n"] == 1
    assert alpha["none (uncompressed)"]["buckets"][">300"]["n"] == 0
    assert alpha["none (uncompressed)"]["buckets"]["100-300"]["n"] == 1
    across = {r["label"]: r for r in report["across"]}
    assert list(across) == labels and across["recomp-extractive top_k=1"]["n"] == 3
    assert across["none (uncompressed)"]["tokens_in"] == sum(
        report["domains"][d]["rows"][0]["tokens_in"] for d in ("alpha", "beta")
    )
    kinds = {r["method"]: r for r in kind_rows(report)}
    ratio = across["recomp-extractive top_k=1"]["compression_ratio"]
    assert kinds["recomp-extractive top_k=1"] == {"method": "recomp-extractive top_k=1",
                                                  "t (3)": f"100.0% @ {ratio:.2f}×"}
    text = suite_markdown(report)
    for part in (
        "### alpha",
        "### beta",
        "### all domains",
        "| naive@recomp-extractive top_k=1 |",
        "kept @ ratio, >300 words",
        "answer kept, mean of domains",
        "### all domains by question kind",
    ):
        assert part in text


def test_cli_suite_prints_tables_and_writes_json(
    suite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "suite.json"
    rc = main(
        [
            "eval",
            "--suite",
            str(suite_dir),
            "--domain",
            "beta",
            "--method",
            "rerank",
            "--param",
            "top_n=1",
            "--retrieve-k",
            "2",
            "--index-dir",
            str(tmp_path / "idx"),
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "### beta" in text and "### alpha" not in text and "| naive@rerank top_n=1" in text
    report = json.loads(out.read_text())
    rows = {r["label"]: r for r in report["domains"]["beta"]["rows"]}
    assert rows["rerank top_n=1"]["answer_kept"] == 1.0 and rows["rerank top_n=1"]["n"] == 1
    assert main(["eval", "--quiet"]) == 2  # neither --data nor --suite
