"""EXIT's prompt and adapter: the chat-formatted prompt split into token-id pieces around the
query, the full context and the sentence (so every scoring path sees the same ids), and a base
model with EXIT's PEFT LoRA adapter merged in."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcomp._optional import require
from ragcomp.models import CausalLM, default_device, resolve_dtype, resolve_model_path
from ragcomp.text import Sentence
from ragcomp.types import Passage

QUESTION = 'Is this sentence useful in answering the query? Answer only "Yes" or "No".'
_MARK_Q, _MARK_C, _MARK_S = "@@RAGCOMP_QUERY@@", "@@RAGCOMP_CONTEXT@@", "@@RAGCOMP_SENTENCE@@"
_USER = f"Query:\n{_MARK_Q}\nFull context:\n{_MARK_C}\nSentence:\n{_MARK_S}\n{QUESTION}"


@dataclass(frozen=True)
class Template:
    """Token ids of the fixed prompt pieces, around the query, context and sentence."""

    head: list[int]  # chat template start ... "Query:\n"
    mid_context: list[int]  # "\nFull context:\n"
    mid_sentence: list[int]  # "\nSentence:\n"
    tail: list[int]  # "\n" question, end of turn, start of the assistant turn
    yes: int
    no: int

    @property
    def fixed(self) -> int:
        return len(self.head) + len(self.mid_context) + len(self.mid_sentence) + len(self.tail)


def build_template(tok: Any) -> Template:
    """Split the chat-formatted prompt around the query, context and sentence markers."""
    text = None
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": _USER}], add_generation_prompt=True,
                                       tokenize=False)
    if not isinstance(text, str) or any(text.count(m) != 1 for m in (_MARK_Q, _MARK_C, _MARK_S)):
        text = f"{_USER}\nAnswer:\n"  # a base model without a chat template
    head, rest = text.split(_MARK_Q)
    mid_c, rest = rest.split(_MARK_C)
    mid_s, tail = rest.split(_MARK_S)

    def ids(s: str) -> list[int]:
        return list(tok.encode(s, add_special_tokens=False))

    yes, no = ids("Yes"), ids("No")
    if len(yes) != 1 or len(no) != 1 or yes == no:
        warnings.warn(f"'Yes'/'No' are not single distinct tokens ({yes}, {no}); scoring their first tokens",
                      stacklevel=3)
    return Template(ids(head), ids(mid_c), ids(mid_s), ids(tail), yes[0], no[0])


def load_with_adapter(model: str | None, adapter: str, device: str | None, dtype: Any) -> CausalLM:
    """A private copy of the base model with the LoRA adapter merged in (the shared one stays clean)."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("loading an EXIT LoRA adapter needs peft: pip install peft "
                          "(or ragcomp[exit])") from e
    transformers = require("transformers", "models")
    base = model or peft.PeftConfig.from_pretrained(adapter).base_model_name_or_path
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(base)
    own_tok = any((Path(adapter) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = transformers.AutoTokenizer.from_pretrained(adapter if own_tok else path)
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    merged = peft.PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    merged.to(device).eval()
    return CausalLM(f"{base}+{adapter}", merged, tok, device, torch_dtype)


@dataclass
class PromptUnit:
    """One context window of one passage: a shared prefix and one row per sentence."""

    passage: int
    prefix: list[int]
    rows: list[list[int]]  # sentence ids + template tail
    sentences: list[int]  # indices into the passage's sentences


def prompt_units(t: Template, limit: int, encode: Callable[[str], list[int]], query: str,
                 passages: list[Passage], sentences: Callable[[str], Sequence[Sentence]],
                 use_title: bool) -> tuple[list[PromptUnit], int]:
    """Prompt pieces per context window (prefix + row is exactly the per-sentence prompt) of at
    most `limit` tokens, and how many prefix tokens all units share (template head, query,
    "Full context:")."""
    if t.fixed > limit // 4:
        raise ValueError(f"max_length={limit} is too small for the prompt template ({t.fixed} tokens)")
    q_ids = encode(query)[: limit // 4]  # rule: a huge query keeps its first quarter-window
    units = []
    for pi, p in enumerate(passages):
        sents = sentences(p.text)
        if not sents:
            continue
        title = p.metadata.get("title") if use_title else None
        title_ids = encode(f"{title}\n") if isinstance(title, str) and title.strip() else []
        s_ids = [encode(s.text)[: limit // 4] for s in sents]
        head = t.head + q_ids + t.mid_context + title_ids
        room = limit - t.fixed - len(q_ids) - len(title_ids)
        for a, b, ctx in sentence_windows(p.text, sents, s_ids, room, encode):
            prefix = head + ctx + t.mid_sentence
            units.append(PromptUnit(pi, prefix, [s_ids[i] + t.tail for i in range(a, b)], list(range(a, b))))
    return units, len(t.head) + len(q_ids) + len(t.mid_context)


def sentence_windows(text: str, sents: Sequence[Sentence], s_ids: list[list[int]], room: int,
                     encode: Callable[[str], list[int]]) -> list[tuple[int, int, list[int]]]:
    """Consecutive sentence ranges [a, b) whose context ids plus their longest sentence fit `room`."""
    out: list[tuple[int, int, list[int]]] = []
    a = 0
    while a < len(sents):
        b, est, longest = a, 0, 0
        while b < len(sents):
            n = len(s_ids[b]) + 1  # +1: the space before a sentence may be its own token
            if est + n + max(longest, n - 1) > room:
                break
            est, longest, b = est + n, max(longest, n - 1), b + 1
        b = max(b, a + 1)  # a single sentence always makes a window (its context is cut below)
        while True:
            ctx = encode(text[sents[a].start : sents[b - 1].end])
            budget = room - max(len(x) for x in s_ids[a:b])
            if len(ctx) <= budget or b == a + 1:
                break
            b -= 1  # the estimate was short: give the last sentence to the next window
        out.append((a, b, ctx[: max(budget, 0)]))
        a = b
    return out
