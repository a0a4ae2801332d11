"""Many questions over one long document, answered from its best KV pages.

The document (about 1k tokens of Wikipedia summaries) is encoded once; each question then
reads only the scoring data and the pages it keeps, moves them next to each other after
the prompt's prefix, and answers. Runs offline on CPU (SmolLM2-135M-Instruct):

    python examples/long_document.py
"""

from __future__ import annotations

import time

from ragcomp.corpus import load_corpus
from ragcomp.kv import KVCache

TITLES = ["Eiffel Tower", "Mount Everest", "Nile", "Leonardo da Vinci", "Amazon River", "Great Wall of China",
          "Moon", "Pacific Ocean", "Sahara", "Albert Einstein", "Jupiter", "Tokyo"]
QUESTIONS = ["Which city is the Eiffel Tower in?", "On which continent is the Sahara?",
             "Into which sea does the Nile flow?"]


def main() -> None:
    by_title = {p.metadata.get("title", p.id): p for p in load_corpus("wiki")}
    text = "\n\n".join(f"{t}\n{by_title[t].text}" for t in TITLES if t in by_title)
    kv = KVCache(model="smollm2-135m", store="memory")
    t = time.perf_counter()
    doc = kv.add_long("wiki-sample", text, page_tokens=64)  # chunked prefill, once
    print(f"encoded {len(doc.ids)} tokens into {doc.n_pages} pages in {time.perf_counter() - t:.1f} s")
    for q in QUESTIONS:
        ans = kv.ask_long(q, "wiki-sample", page_budget_tokens=256, scoring="hybrid", max_new_tokens=32)
        s = ans.stats
        print(f"\n{q}\n  {ans.text}\n  pages {s.kept_pages} of {s.pages_total}; "
              f"read {s.bytes_touched / 1e6:.1f} of {s.bytes_all_pages / 1e6:.1f} MB; "
              f"ttft {s.ttft:.2f} s (scoring {s.seconds_score:.2f} s)")
    full = kv.ask_long(QUESTIONS[0], "wiki-sample", page_budget_tokens=None, max_new_tokens=32)
    print(f"\nfull context: {full.text} (ttft {full.stats.ttft:.2f} s)")
    kv.close()


if __name__ == "__main__":
    main()
