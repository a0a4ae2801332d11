"""The cache argument keeps working across transformers' rename of `past_key_values` to `cache`."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ragcomp.hf_cache import cache_arg, returned_cache  # noqa: E402


class _OldStyle:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):  # transformers < 5.25
        return {"past_key_values": past_key_values}


class _NewStyle:
    def forward(self, input_ids=None, cache=None, use_cache=None):  # transformers >= 5.25
        return {"cache": cache}


def test_the_argument_name_follows_the_forward_signature() -> None:
    assert cache_arg(_OldStyle(), "kv") == {"past_key_values": "kv"}
    assert cache_arg(_NewStyle(), "kv") == {"cache": "kv"}
    assert returned_cache(_OldStyle().forward(past_key_values="kv")) == "kv"
    assert returned_cache(_NewStyle().forward(cache="kv")) == "kv"
    assert returned_cache({}) is None


def test_installed_transformers_takes_the_cache_without_a_deprecation_warning() -> None:
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0, -1]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first = model.model(input_ids=ids[:, :3], use_cache=True)
            cache = returned_cache(first)
            assert cache is not None and cache.get_seq_length() == 3
            step = model(input_ids=ids[:, 3:], **cache_arg(model, cache), use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)  # the cache was really used
