"""Bad GPT-2 checkpoints and configs for `mmssl.interop.load_hf_gpt2`: each is one clear
error naming the file, never a bare JSON or type error (the parity tests are in
test_interop.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_interop import gpt2_pair, small_gpt2_config

from mmssl.interop import convert_hf_gpt2_state_dict, gpt2_model_config, load_hf_gpt2
from mmssl.schema import ConfigError

transformers = pytest.importorskip("transformers")


def test_gpt2_errors():
    peer, model = gpt2_pair()
    sd = peer.state_dict()
    with pytest.raises(ValueError, match="needs config="):
        load_hf_gpt2(sd)
    bad = dict(sd)
    bad["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        convert_hf_gpt2_state_dict(bad, model.cfg)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2_model_config(small_gpt2_config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="activation_function 'tanh'"):
        gpt2_model_config({"activation_function": "tanh"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_gpt2(Path(__file__).parent)


@pytest.mark.parametrize(
    "text, match",
    [
        (b'{"n_embd": ', r"config\.json: not valid JSON"),
        (b"\xff\xfe{}", r"config\.json: not valid JSON"),
        (b"[1, 2]", r"config\.json: expected a JSON object, got list"),
        (b'{"n_embd": "32"}', r"config\.json: GPT-2 n_embd must be an integer, got '32'"),
        (b'{"layer_norm_epsilon": NaN}', r"config\.json: .*norm_eps must be a finite number"),
        (b'{"layer_norm_epsilon": -1.0}', r"config\.json: .*norm_eps must be > 0"),
    ],
    ids=["garbage", "not_utf8", "a_list", "string_size", "nan_eps", "negative_eps"],
)
def test_gpt2_bad_config_file_is_named(tmp_path, text, match):
    peer, _ = gpt2_pair()
    peer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(ConfigError, match=match):
        load_hf_gpt2(tmp_path)


def test_gpt2_missing_path_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: not found"):
        load_hf_gpt2(tmp_path / "nope")
