"""Plain text from documentation formats, for the multi-domain benchmark (`ragcomp.eval.domains`).

Three readers, pure functions of the source text (no tools, no network), so a rebuild is
deterministic given the packages:

- `render_man(roff)`: a man(7) page to sections of paragraphs, one paragraph per line (so
  sentences never break inside a wrapped line); `.TP`/`.IP` tags stay on their own line right
  above their body, as `man` prints them.
- `html_blocks(html)`: an HTML page to blocks (headings, paragraphs, definition terms, preformatted
  text), without navigation bars; `html_sections` joins them into sections at chosen heading levels,
  a definition term directly above the first paragraph of its definition.
- `info_nodes(info)`: a GNU info file to its nodes (name, heading, text without the heading's underline).

Sections are joined as `heading\\n\\ntext`, paragraphs by a blank line: the sentence splitter
(`ragcomp.text.split_sentences`) cuts at blank lines, so a heading is never glued to a sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

# -- man pages (roff) ------------------------------------------------------------------------------

_GLYPHS = {
    "em": "—", "en": "–", "bu": "•", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "co": "©", "rg": "®", "mu": "×", "ti": "~", "ha": "^", "ga": "`", "rs": "\\", "ba": "|", "at": "@",
    "sh": "#", "Do": "$", "lh": "☜", "rh": "☞", "de": "°", "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠",
    "->": "→", "<-": "←", "hy": "-", "pl": "+", "mi": "-", "eq": "=", "sl": "/", "fo": "«", "fc": "»",
    "ss": "ß", "'e": "é", "'a": "á", ":u": "ü", ":o": "ö", ":a": "ä", "sc": "§", "ps": "¶", "tm": "™",
}
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™"}
_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[-+]?(?:\d|\(\d\d|\[\d+\])|\((..)|\[([^\]]*)\]|\*(?:\((..)|\[([^\]]*)\]|(.))"
    r"|n(?:\(..|\[[^\]]*\]|.)|[hvwkoHSxXzZlL]'[^']*'|(.))"
)
_SIMPLE = {"-": "-", "e": "\\", "&": "", " ": " ", "~": " ", "|": "", "^": "", "c": "", "%": "", ":": "",
           "0": " ", "'": "'", "`": "`", ".": ".", ",": "", "/": "", "t": " ", "\\": "\\", "!": "", "d": "",
           "u": "", "p": "", "r": "", "a": "", "E": "\\", "}": "", "{": ""}
_FONT_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB", "SB"}
_IGNORED = {"RS", "RE", "in", "PD", "ad", "na", "nh", "hy", "ft", "if", "ie", "el", "UR", "UE", "MT", "ME",
            "ne",
            "ta", "ll", "ds", "de", "nr", "so", "ti", "ce", "fam", "ps", "vs", "cs", "ss", "tr", "rm", "ig",
            "OP", "SY", "YS", "ns", "rs", "mso", "ev", "pc", "lf", "\\\"", "TH"}


@dataclass
class ManPage:
    """A rendered man page: name and section from .TH, sections as (HEADING, [paragraphs])."""

    name: str
    section: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)

    def text(self) -> str:
        return "\n\n".join(f"{h}\n\n" + "\n\n".join(ps) if ps else h for h, ps in self.sections)

    def paragraphs(self, heading: str) -> list[str]:
        return next((ps for h, ps in self.sections if h == heading), [])


def roff_escapes(text: str) -> str:
    """Replace roff escapes by the characters they print (fonts and sizes vanish)."""

    def sub(m: re.Match[str]) -> str:
        glyph = m.group(1) or m.group(2)
        if glyph is not None:
            return _GLYPHS.get(glyph, "")
        string = m.group(3) or m.group(4) or m.group(5)
        if string is not None:
            return _STRINGS.get(string, "")
        simple = m.group(6)
        if simple is not None:
            return _SIMPLE.get(simple, simple)
        return ""  # fonts, sizes, registers, motions

    return _ESCAPE.sub(sub, text)


def _macro_args(rest: str) -> list[str]:
    """roff argument splitting: blanks separate, double quotes group ("" is a quote inside quotes)."""
    args, cur, quoted, i = [], [], False, 0
    started = False
    while i < len(rest):
        ch = rest[i]
        if quoted:
            if ch == '"':
                if rest[i + 1:i + 2] == '"':
                    cur.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                cur.append(ch)
        elif ch == '"' and not started:
            quoted = started = True
        elif ch in " \t":
            if started:
                args.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(ch)
            started = True
        i += 1
    if started:
        args.append("".join(cur))
    return args


def render_man(source: str) -> ManPage | None:
    """A man(7) page as text sections; None for a page that is only a `.so` link."""
    lines = source.replace("\r\n", "\n").split("\n")
    if any(line.startswith(".so ") for line in lines[:5]) and sum(1 for x in lines if x.strip()) <= 3:
        return None
    page = ManPage("", "")
    heading: list[str] = []
    paras: list[str] = []
    words: list[str] = []
    tags: list[str] = []
    want_tag = 0  # text lines still to take as tags (.TP: 1)
    nofill: list[str] | None = None
    table: list[str] | None = None
    table_format = False

    def flush() -> None:
        nonlocal words, tags
        body = " ".join(w for w in words if w).strip()
        body = re.sub(r"[ \t]+", " ", body)
        tag = "\n".join(t for t in tags if t)
        if tag and body:
            paras.append(f"{tag}\n{body}")
        elif tag or body:
            paras.append(tag or body)
        words, tags = [], []

    def end_section() -> None:
        flush()
        if heading:
            page.sections.append((heading[0], list(paras)))
        paras.clear()

    def add_text(text: str) -> None:
        nonlocal want_tag
        if want_tag:
            tags.append(text.strip())
            want_tag -= 1
        else:
            words.append(text.strip())

    for raw in lines:
        if table is not None:
            if raw.startswith(".TE"):
                rows = [r for r in table if r.strip()]
                if rows:
                    flush()
                    paras.append("\n".join(rows))
                table = None
            elif table_format:
                if raw.rstrip().endswith("."):
                    table_format = False
            else:
                row = roff_escapes(raw).replace("T{", "").replace("T}", "")
                table.append("  ".join(c.strip() for c in row.split("\t")).strip())
            continue
        if raw.startswith((".\\\"", "'\\\"", '.\\"')) or raw.strip() in (".", "'"):
            continue
        if raw[:1] in ".'" and len(raw) > 1:
            name, _, rest = raw[1:].lstrip().partition(" ")
            name = name.strip()
            args = _macro_args(rest.strip())
            if name == "TH" and args:
                page.name, page.section = roff_escapes(args[0]), args[1] if len(args) > 1 else ""
            elif name in ("SH", "SS"):
                title = roff_escapes(" ".join(args)).strip()
                if name == "SH":
                    end_section()
                    heading[:] = [title]
                else:
                    flush()
                    paras.append(title)
                want_tag = 0
            elif name in ("PP", "P", "LP", "sp", "br", "HP"):
                if nofill is None:
                    flush()
                elif name in ("PP", "P", "LP", "sp"):
                    nofill.append("")
            elif name in ("TP", "TQ"):
                if name == "TP":
                    flush()
                want_tag = 1
            elif name == "IP":
                flush()
                if args and roff_escapes(args[0]).strip():
                    tags.append(roff_escapes(args[0]).strip())
            elif name in ("nf", "EX"):
                flush()
                nofill = []
            elif name in ("fi", "EE"):
                if nofill is not None:
                    block = "\n".join(nofill).strip("\n")
                    if block.strip():
                        paras.append(block)
                nofill = None
            elif name == "TS":
                table, table_format = [], True
            elif name in ("B", "I", "SM", "SB", "R", "CW") and args:
                text = roff_escapes(" ".join(args))
                nofill.append(text) if nofill is not None else add_text(text)
            elif name in _FONT_ALTERNATING and args:
                text = roff_escapes("".join(args))
                nofill.append(text) if nofill is not None else add_text(text)
            elif name in _IGNORED or not args:
                continue
            continue
        text = roff_escapes(raw)
        if nofill is not None:
            nofill.append(text.rstrip())
        elif text.strip():
            add_text(text)
    end_section()
    return page


# -- HTML ------------------------------------------------------------------------------------------

@dataclass
class Block:
    """One block of an HTML page: kind is "h" (heading, `level`), "p", "pre" or "dt"; `dd` is true
    for the first block inside a definition (after its terms)."""

    kind: str
    text: str
    level: int = 0
    dd: bool = False


_BLOCK_TAGS = {"p", "div", "li", "dt", "dd", "tr", "table", "ul", "ol", "dl", "blockquote", "pre",
               "h1", "h2", "h3", "h4", "h5", "h6", "br", "caption", "figure"}
_SKIP_TAGS = {"head", "script", "style", "title"}
_SKIP_CLASSES = ("navheader", "navfooter", "toc", "footer", "nav")


class _BlockParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.buf: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skipping) for elements that may be skipped
        self.skip = 0
        self.pre = 0
        self.heading = 0
        self.in_dt = False
        self.dd_first = False

    def _flush(self) -> None:
        raw = "".join(self.buf)
        self.buf = []
        if self.pre:
            text = raw.strip("\n")
            kind = "pre"
        else:
            text = " ".join(raw.split())
            kind = "h" if self.heading else ("dt" if self.in_dt else "p")
        if not text.strip():
            return
        dd = self.dd_first and kind in ("p", "pre")
        if dd:
            self.dd_first = False
        self.blocks.append(Block(kind, text, self.heading, dd))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        skipping = tag in _SKIP_TAGS or (tag == "div" and any(c in cls.split() for c in _SKIP_CLASSES))
        if tag in ("div", *_SKIP_TAGS):
            self.stack.append((tag, skipping))
            self.skip += skipping
        if self.skip:
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "pre":
            self.pre += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = int(tag[1])
        elif tag == "dt":
            self.in_dt = True
        elif tag == "dd":
            self.dd_first = True
        elif tag in ("td", "th") and self.buf:
            self.buf.append("  ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("div", *_SKIP_TAGS):
            if self.skip:
                # Close the innermost open element of this tag; the skip ends with its element.
                for i in range(len(self.stack) - 1, -1, -1):
                    if self.stack[i][0] == tag:
                        self.skip -= self.stack.pop(i)[1]
                        break
                return
            for i in range(len(self.stack) - 1, -1, -1):
                if self.stack[i][0] == tag:
                    self.stack.pop(i)
                    break
        if self.skip:
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = 0
        elif tag == "dt":
            self.in_dt = False

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.buf.append(data)


def html_blocks(html: str) -> list[Block]:
    """The blocks of a page in reading order, navigation headers and footers left out."""
    parser = _BlockParser()
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.blocks


def html_sections(blocks: list[Block], levels: tuple[int, ...] = (1, 2, 3)) -> list[tuple[str, str]]:
    """(heading, section text) per heading of the given levels; text before the first is under "".
    Consecutive terms are one line each, directly above the first block of their definition."""
    out: list[tuple[str, list[str]]] = [("", [])]
    terms: list[str] = []
    for b in blocks:
        if b.kind == "h" and b.level in levels:
            out.append((b.text, []))
            terms = []
            continue
        parts = out[-1][1]
        if b.kind == "dt":
            terms.append(b.text)
            continue
        text = b.text
        if terms:
            text = "\n".join(terms) + "\n" + text if b.dd else "\n".join(terms) + "\n\n" + text
            terms = []
        parts.append(text)
    if terms:
        out[-1][1].append("\n".join(terms))
    return [(h, "\n\n".join([h, *ps]) if h else "\n\n".join(ps)) for h, ps in out if ps or h]


# -- GNU info --------------------------------------------------------------------------------------

@dataclass
class InfoNode:
    """A node of an info manual: its name (from the `File:` header), heading line and body text."""

    name: str
    heading: str
    text: str


_NODE_HEADER = re.compile(r"^File: [^,]+,\s+Node: ([^,\n]+)")
_UNDERLINE = re.compile(r"^[=*\-.]{3,}$")


def info_nodes(info: str) -> list[InfoNode]:
    """Nodes of an info file (tables and indirect tags skipped); the heading is the first line of
    the node when the next line underlines it. Text keeps the manual's own line breaks."""
    out = []
    for part in info.split("\x1f"):
        part = part.lstrip("\n")
        m = _NODE_HEADER.match(part)
        if not m:
            continue
        body = part.split("\n", 1)[1] if "\n" in part else ""
        lines = body.lstrip("\n").split("\n")
        heading = ""
        if len(lines) > 1 and _UNDERLINE.match(lines[1].strip()) and lines[0].strip():
            heading = lines[0].strip()
            lines = lines[2:]
        text = "\n".join(lines).strip("\n")
        text = re.sub(r"\n{3,}", "\n\n", text)
        if heading:
            text = f"{heading}\n\n{text}" if text else heading
        if text.strip() and not m.group(1).strip().endswith("Index"):
            out.append(InfoNode(m.group(1).strip(), heading, text))
    return out
