"""RECOMP's abstractive compressor (Xu et al., 2023): a generator writes a short query-focused
summary of the retrieved passages, or nothing when they do not help (selective augmentation).

Two generators:

- a causal chat LM (default SmolLM2-135M-Instruct, offline): a prompt asks for the facts that
  answer the question in one or two sentences, or the exact words "nothing relevant";
- RECOMP's published T5 compressors (`fangyuan/nq_abstractive_compressor`, `tqa_...`,
  `hotpotqa_abstractive`) or any seq2seq model: loaded with AutoModelForSeq2SeqLM and fed
  RECOMP's training format, `"Question: {q}\\n Document: {docs}\\n Summary: "`, truncated to
  `max_length` tokens as a whole (RECOMP's `train_hf_summarization_model.py`, max_source_length
  1024). RECOMP trained them to write an empty summary when nothing helps. Each document is
  `title + "\\n" + text` when it has a title (RECOMP's `eval_lm.py` layout), documents joined by
  "\\n" (assumption: the released input files that fix the join are not in the repository).

Both run batched over queries (`compress_batch`), greedy, at most `max_new_tokens` new tokens. An
answer that says nothing is relevant, is empty, or is garbage (no letters or digits, mostly
undecodable bytes, or one word looping) makes the result `empty`. The summary is new text: it goes
into the first non-blank passage's item with no spans (it cites no characters of the sources), the
other passages are marked not kept; `span_separator` is None so a Pipeline does not compose spans.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from ragcomp._optional import require
from ragcomp.base import Compressor
from ragcomp.compressors._common import check_int
from ragcomp.models import (
    LM_ALIASES,
    CausalLM,
    default_device,
    hub_hint,
    load_causal_lm,
    resolve_dtype,
    resolve_model_path,
)
from ragcomp.tokens import TokenCounter
from ragcomp.types import Compressed, Passage

NOTHING = "nothing relevant"
SYSTEM = "You condense retrieved documents for a question answering system."
PROMPT = (
    "Documents:\n{docs}\n\nQuestion: {question}\n\n"
    "Write the facts from the documents that answer the question, in one or two short sentences. "
    f"If the documents do not help answer it, reply exactly: {NOTHING}"
)
RECOMP_FORMAT = "Question: {question}\n Document: {docs}\n Summary: "

_NOTHING = re.compile(
    r"^\W*(?:nothing relevant|no relevant (?:information|content|facts|documents?|passages?)|"
    r"(?:this|the|these) (?:passages?|documents?|context) (?:does|do)(?: not|n't) "
    r"(?:contain|answer|mention|provide|include|say)"
    r"|none of the (?:documents|passages) (?:is|are) relevant)",
    re.IGNORECASE,
)
_LEAD = re.compile(r"^\s*(?:summary|answer)\s*:\s*", re.IGNORECASE)

_SEQ2SEQ: dict[tuple[str, str, str], tuple[Any, Any, threading.Lock]] = {}
_SEQ2SEQ_LOCK = threading.Lock()


def clean_summary(text: str | None) -> str | None:
    """The summary to keep, or None when it says nothing is relevant or is empty/garbage."""
    if not text:
        return None
    text = _LEAD.sub("", text.strip()).strip()
    if _NOTHING.match(text):
        return None
    alnum = sum(c.isalnum() for c in text)
    if alnum < 2:
        return None  # "", ".", "-": no content
    bad = sum(c == "\ufffd" or (not c.isprintable() and not c.isspace()) for c in text)
    if bad > 0.1 * len(text):
        return None  # undecodable bytes: the generator broke a multi-byte character apart
    words = text.lower().split()
    if len(words) >= 8 and len(set(words)) < 0.3 * len(words):
        return None  # a loop ("the the the ...")
    return text


def format_documents(passages: list[Passage]) -> str:
    docs = []
    for p in passages:
        title = p.metadata.get("title")
        docs.append(f"{title}\n{p.text}" if isinstance(title, str) and title.strip() else p.text)
    return "\n".join(docs)


class RecompAbstractive(Compressor):
    """Replace the passages by a generated query-focused summary, or by nothing (`empty`).

    - `model`: alias (`smollm2-135m`), hub id or path of a causal chat LM or of a seq2seq model
      (RECOMP's T5 compressors, detected from the config), or a loaded `CausalLM`.
    - `max_new_tokens`: summary length bound in generator tokens.
    - `max_length`: input bound in tokens (default: causal min(window, 2048), seq2seq 1024 as
      RECOMP trained). Causal prompts cut the documents at a token boundary; seq2seq inputs are
      truncated as a whole, as RECOMP does.
    - `batch_size`: queries per generate call.
    """

    name = "recomp-abstractive"
    span_separator = None  # the summary is new text, not spans of the passage

    def __init__(
        self,
        model: str | CausalLM | None = None,
        max_new_tokens: int = 64,
        max_length: int | None = None,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
        tokenizer: str | TokenCounter | None = None,
        separator: str = "\n\n",
    ) -> None:
        super().__init__(tokenizer, separator)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1, allow_none=False)
        self.max_length = check_int("max_length", max_length, 32)
        self.batch_size = check_int("batch_size", batch_size, 1, allow_none=False)
        self.model = model.name if isinstance(model, CausalLM) else (model or "smollm2-135m")
        self.device = device
        self.dtype = dtype
        self._lm = model if isinstance(model, CausalLM) else None
        self._seq2seq: tuple[Any, Any, threading.Lock] | None = None
        self._load_lock = threading.Lock()

    # -- generator -------------------------------------------------------------------------
    def _load(self) -> None:
        with self._load_lock:
            if self._lm is not None or self._seq2seq is not None:
                return
            if self.model in LM_ALIASES:
                self._lm = load_causal_lm(self.model, self.device, self.dtype)
                return
            transformers = require("transformers", "models")
            path = resolve_model_path(self.model)
            try:
                config = transformers.AutoConfig.from_pretrained(path)
            except Exception as e:
                raise hub_hint(self.model, e) from e
            if getattr(config, "is_encoder_decoder", False):
                self._seq2seq = _load_seq2seq(path, self.device, self.dtype)
            else:
                self._lm = load_causal_lm(self.model, self.device, self.dtype)

    @property
    def is_seq2seq(self) -> bool:
        self._load()
        return self._seq2seq is not None

    @property
    def limit(self) -> int:
        if self.max_length:
            return self.max_length
        if self.is_seq2seq:
            return 1024
        assert self._lm is not None
        return min(self._lm.max_context, 2048)

    def inputs(self, query: str, passages: list[Passage]) -> str:
        """The generator's input text (before chat formatting and truncation)."""
        docs = format_documents(passages)
        if self.is_seq2seq:
            return RECOMP_FORMAT.format(question=query, docs=docs)
        return PROMPT.format(question=query, docs=docs)

    def _causal_prompt(self, query: str, passages: list[Passage]) -> list[int]:
        assert self._lm is not None
        lm = self._lm
        ids = lm.chat_ids(PROMPT.format(question=query, docs=format_documents(passages)), system=SYSTEM)
        over = len(ids) + self.max_new_tokens - self.limit
        if over <= 0:
            return ids
        # Too long: cut the documents (never the question or the instructions) at a token boundary.
        tok = lm.tokenizer
        doc_ids = tok(format_documents(passages), add_special_tokens=False)["input_ids"]
        if over >= len(doc_ids):
            raise ValueError(f"max_length={self.limit} leaves no room for the documents "
                             f"(prompt without them: {len(ids) - len(doc_ids)} tokens, "
                             f"max_new_tokens={self.max_new_tokens})")
        keep = len(doc_ids) - over
        while True:  # re-encoding the cut text may merge tokens differently: shrink until it fits
            docs = tok.decode(doc_ids[:keep], skip_special_tokens=True)
            ids = lm.chat_ids(PROMPT.format(question=query, docs=docs), system=SYSTEM)
            over = len(ids) + self.max_new_tokens - self.limit
            if over <= 0 or keep <= 1:
                return ids
            keep = max(keep - over, 1)

    def generate(self, queries: list[str], passages_per_query: list[list[Passage]]) -> list[str]:
        """Raw generations (new text only), `batch_size` queries per generate call."""
        self._load()
        out: list[str] = []
        for a in range(0, len(queries), self.batch_size):
            qs, ps = queries[a : a + self.batch_size], passages_per_query[a : a + self.batch_size]
            if self._seq2seq is not None:
                out += self._generate_seq2seq([self.inputs(q, p) for q, p in zip(qs, ps, strict=True)])
            else:
                assert self._lm is not None
                with self._lm.lock:  # the tokenizer is shared with other users of the model
                    prompts = [self._causal_prompt(q, p) for q, p in zip(qs, ps, strict=True)]
                out += self._lm.generate_batch(prompts, max_new_tokens=self.max_new_tokens)
        return out

    def _generate_seq2seq(self, texts: list[str]) -> list[str]:
        torch = require("torch", "models")
        assert self._seq2seq is not None
        model, tok, lock = self._seq2seq
        with lock, torch.inference_mode():
            enc = tok(texts, padding=True, truncation=True, max_length=self.limit, return_tensors="pt")
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    # -- compress --------------------------------------------------------------------------
    def _compress(self, query: str, passages: list[Passage]) -> list[Compressed]:
        return self._compress_batch([query], [passages])[0]

    def _compress_batch(
        self, queries: list[str], passages_per_query: list[list[Passage]]
    ) -> list[list[Compressed]]:
        live = [[p for p in ps if p.text.strip()] for ps in passages_per_query]
        todo = [i for i, ps in enumerate(live) if ps]
        summaries: dict[int, str | None] = {}
        if todo:
            raw = self.generate([queries[i] for i in todo], [live[i] for i in todo])
            summaries = {i: clean_summary(t) for i, t in zip(todo, raw, strict=True)}
        out = []
        for i, ps in enumerate(passages_per_query):
            summary = summaries.get(i)
            owner = live[i][0] if summary else None
            out.append([Compressed(p, summary, [], None, True) if p is owner and summary
                        else Compressed.dropped(p) for p in ps])
        return out


def _load_seq2seq(path: str, device: str | None, dtype: Any) -> tuple[Any, Any, threading.Lock]:
    """A seq2seq model and tokenizer, shared per (path, device, dtype), with its lock."""
    transformers = require("transformers", "models")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    key = (path, device, str(torch_dtype))
    with _SEQ2SEQ_LOCK:
        if key not in _SEQ2SEQ:
            try:
                tok = transformers.AutoTokenizer.from_pretrained(path)
                model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch_dtype)
            except Exception as e:
                raise hub_hint(path, e) from e
            model.to(device).eval()
            _SEQ2SEQ[key] = (model, tok, threading.Lock())
        return _SEQ2SEQ[key]
