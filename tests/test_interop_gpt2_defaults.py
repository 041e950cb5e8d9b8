"""gpt2_model_config: keys a config dict leaves out take transformers' GPT2Config defaults."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from mmssl.interop.hf_gpt2 import gpt2_model_config  # noqa: E402


def test_missing_keys_take_gpt2config_defaults():
    ref = transformers.GPT2Config()
    cfg = gpt2_model_config({"n_embd": 64, "n_layer": 2, "n_head": 4}).text
    assert cfg.block.norm_eps == ref.layer_norm_epsilon
    assert cfg.context_length == ref.n_positions and cfg.vocab_size == ref.vocab_size
    assert cfg.tie_embeddings == ref.tie_word_embeddings
    assert cfg.block.mlp_ratio == 4.0


def test_n_inner_sets_the_mlp_width():
    cfg = gpt2_model_config({"n_embd": 64, "n_layer": 1, "n_head": 4, "n_inner": 96}).text
    assert cfg.block.mlp_ratio == 1.5
