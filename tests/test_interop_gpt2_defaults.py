"""GPT-2 configs: keys a config dict leaves out take transformers' GPT2Config defaults, the
activation and flags map as transformers means them, and an explicit config= is used."""

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


@pytest.mark.parametrize(
    "name, bad",
    [
        ("scale_attn_weights", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("add_cross_attention", True),
    ],
)
def test_gpt2_unsupported_flags_are_refused(name, bad):
    with pytest.raises(ValueError, match=f"GPT-2 {name}={bad} is not supported"):
        gpt2_model_config({"n_embd": 64, "n_layer": 1, "n_head": 2, name: bad})


def test_gpt2_exact_gelu_maps_to_exact_gelu():
    text = gpt2_model_config(
        {"n_embd": 64, "n_layer": 1, "n_head": 2, "activation_function": "gelu"}
    ).text
    assert text.block.act == "gelu"
    text = gpt2_model_config({"n_embd": 64, "n_layer": 1, "n_head": 2}).text
    assert text.block.act == "gelu_tanh"


def test_an_explicit_config_wins_over_the_directorys(tmp_path):
    """config= is used as given also for a saved directory, whose config.json is read only
    without it."""
    from mmssl.interop.hf_gpt2 import load_hf_gpt2

    small = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 16, "vocab_size": 64}
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**small)).save_pretrained(tmp_path)
    assert load_hf_gpt2(tmp_path).cfg.text.block.act == "gelu_tanh"  # the directory's
    model = load_hf_gpt2(tmp_path, config={**small, "activation_function": "gelu"})
    assert model.cfg.text.block.act == "gelu"
