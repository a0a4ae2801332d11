"""Training code for ragcomp's own models (not imported by the library at run time).

- `provence_data`: (question, passage, relevant-sentence) examples generated from the Wikipedia
  corpus with a small local LM, written as JSONL (slow step, run once).
- `provence`: trains a Provence-style pruner+reranker on that JSONL and saves it in ragcomp's
  format, loadable with `ProvenceCompressor(model=out_dir)`.
- `cli`: `python -m ragcomp.train provence-data|provence|export-backbone ...`; `add_parser(sub)`
  hooks the same commands under `ragcomp train`.
"""
