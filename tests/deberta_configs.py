"""Shared by the Provence tests: a question with sentences to keep and drop, and a shrunk
DeBERTa-v3 config with the published checkpoint's options."""

from __future__ import annotations

import transformers

QUERY = "When did the Eiffel Tower open?"
SENTENCES = ["The Eiffel Tower is in Paris.", "It opened in 1889.", "Gustave Eiffel's company built it.",
             "Cats are small carnivorous mammals.", "They are popular pets.", "Many sleep most of the day."]


def _v3_config(**overrides: object) -> transformers.DebertaV2Config:
    """The published checkpoint's DeBERTa-v3 options, shrunk; 8 buckets so that lengths above 4
    use the log-bucketed positions; weights 10x the usual init, so that attention (and any mistake
    in its scale or biases) moves the outputs by far more than the tolerance."""
    cfg = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, type_vocab_size=0,
               relative_attention=True, position_buckets=8,
               norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
               max_relative_positions=-1, position_biased_input=False, pooler_hidden_size=32,
               pooler_hidden_act="gelu", layer_norm_eps=1e-7, initializer_range=0.2)
    cfg.update(overrides)
    return transformers.DebertaV2Config(**cfg)
