"""Hugging Face transformers GPT-2 -> mmssl text-only MultimodalModel (a causal LM).

GPT-2 stores its projections as `Conv1D` weights of shape (in, out): mmssl's Linear holds
their transpose.  `c_attn` is the fused qkv in (q, k, v) order, as mmssl's.  The LM head is
tied to the token embedding unless the config says otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmssl.interop.weights import (
    Source,
    StateDict,
    build_with_weights,
    keep,
    read_state_dict,
    rename,
    transpose,
)
from mmssl.models.config import BlockConfig, ModelConfig, TextConfig
from mmssl.models.io import check_model_config
from mmssl.models.multimodal import MultimodalModel
from mmssl.schema import ConfigError

PEER = "GPT-2"
TOP_NAMES = {
    "wte.weight": ("text.token_embed.weight", keep),
    "wpe.weight": ("text.pos_embed", keep),
    "ln_f.weight": ("text.norm.weight", keep),
    "ln_f.bias": ("text.norm.bias", keep),
    "lm_head.weight": ("text.lm_head.weight", keep),
}
BLOCK_NAMES = {
    "ln_1.weight": ("norm1.weight", keep),
    "ln_1.bias": ("norm1.bias", keep),
    "attn.c_attn.weight": ("attn.qkv.weight", transpose),
    "attn.c_attn.bias": ("attn.qkv.bias", keep),
    "attn.c_proj.weight": ("attn.proj.weight", transpose),
    "attn.c_proj.bias": ("attn.proj.bias", keep),
    "ln_2.weight": ("norm2.weight", keep),
    "ln_2.bias": ("norm2.bias", keep),
    "mlp.c_fc.weight": ("mlp.fc1.weight", transpose),
    "mlp.c_fc.bias": ("mlp.fc1.bias", keep),
    "mlp.c_proj.weight": ("mlp.fc2.weight", transpose),
    "mlp.c_proj.bias": ("mlp.fc2.bias", keep),
}
BLOCK_RE = re.compile(r"h\.(\d+)\.(.+)")
# Causal-mask buffers saved by older transformers versions: mmssl's attention is causal by
# construction.
MASK_RE = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
ACTS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _rule(key: str) -> tuple[str, Any] | None:
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    m = BLOCK_RE.fullmatch(key)
    if m is None or m.group(2) not in BLOCK_NAMES:
        return None
    name, fn = BLOCK_NAMES[m.group(2)]
    return f"text.trunk.blocks.{m.group(1)}.{name}", fn


def convert_hf_gpt2_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> StateDict:
    """GPT2LMHeadModel / GPT2Model keys (with or without `transformer.`) -> mmssl keys.

    With tied embeddings (cfg.text.tie_embeddings) `lm_head.weight` must equal `wte.weight`
    and is dropped; otherwise it becomes mmssl's separate `lm_head`.  Unknown keys are an
    error listing them.
    """
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not MASK_RE.fullmatch(k)}
    if cfg.text is None:
        raise ValueError("a GPT-2 checkpoint needs a config with a text tower")
    if cfg.text.tie_embeddings and "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        wte = sd.get("wte.weight")
        if wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
            raise ValueError(
                "GPT-2 lm_head.weight differs from wte.weight but the config ties them "
                "(set tie_word_embeddings=False)"
            )
    return rename(sd, _rule, PEER)


def _get(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _int(config: Any, name: str, default: int | None) -> Any:
    # checked here: a string would fail later as a bare TypeError deep inside the model
    value = _get(config, name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"GPT-2 {name} must be an integer, got {value!r}")
    return value


def gpt2_model_config(config: Any) -> ModelConfig:
    """A transformers GPT2Config (or its config.json dict) -> ModelConfig; ConfigError (a
    ValueError) for a value of the wrong type or out of range."""
    if not isinstance(config, Mapping) and not hasattr(config, "n_embd"):
        # getattr on anything else would quietly give GPT-2 124M's defaults
        raise ConfigError(
            f"a GPT-2 config must be a GPT2Config or its config.json dict, got "
            f"{type(config).__name__}"
        )
    for name, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if _get(config, name, ok) != ok:
            raise ValueError(f"GPT-2 {name}={not ok} is not supported by mmssl")
    act_name = _get(config, "activation_function", "gelu_new")
    if act_name not in ACTS:
        raise ValueError(f"GPT-2 activation_function {act_name!r} is not supported")
    dim = _int(config, "n_embd", 768)
    inner = _int(config, "n_inner", None)
    eps = _get(config, "layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError(f"GPT-2 layer_norm_epsilon must be a number, got {eps!r}")
    text = TextConfig(
        vocab_size=_int(config, "vocab_size", 50257),
        context_length=_int(config, "n_positions", 1024),
        dim=dim,
        depth=_int(config, "n_layer", 12),
        num_heads=_int(config, "n_head", 12),
        block=BlockConfig(
            mlp_ratio=4.0 if inner is None else inner / dim,
            norm_eps=float(eps),
            act=ACTS[act_name],  # type: ignore[arg-type]
        ),
        tie_embeddings=bool(_get(config, "tie_word_embeddings", True)),
    )
    cfg = ModelConfig(text=text)
    check_model_config(cfg, "GPT-2 config")  # a NaN layer_norm_epsilon gives NaN logits
    return cfg


def _read_directory(path: Path) -> tuple[Path, Path]:
    """A saved transformers model directory -> (config.json, weights file)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is it a saved transformers model?)")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return cfg_path, path / name
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def _read_config_file(cfg_path: Path) -> ModelConfig:
    """A transformers config.json -> ModelConfig; every error names the file."""
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{cfg_path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object, got {type(data).__name__}")
    try:
        return gpt2_model_config(data)
    except ValueError as err:  # ConfigError, or ModelConfig's own checks
        raise ConfigError(f"{cfg_path}: {err}") from None


def load_hf_gpt2(source: Source, config: Any = None) -> MultimodalModel:
    """GPT-2 weights -> an mmssl text-only MultimodalModel in eval mode (fp32).

    source: a transformers GPT2LMHeadModel/GPT2Model, a saved model directory (config.json +
        model.safetensors or pytorch_model.bin), a state dict, or a weights file.
    config: a ModelConfig, a GPT2Config, or a config.json dict; optional for a model or a
        directory (read from it).
    """
    if isinstance(source, (str, Path)):
        if not Path(source).exists():  # before asking for config= it would not need
            raise FileNotFoundError(f"{source}: not found")
        if Path(source).is_dir():
            cfg_path, source = _read_directory(Path(source))
            config = _read_config_file(cfg_path) if config is None else config
    if config is None:
        if not isinstance(source, nn.Module) or not hasattr(source, "config"):
            raise ValueError(
                "loading GPT-2 weights from a state dict or file needs config= "
                "(a GPT2Config, its config.json dict, or a ModelConfig)"
            )
        config = source.config
    cfg = config if isinstance(config, ModelConfig) else gpt2_model_config(config)
    weights = convert_hf_gpt2_state_dict(read_state_dict(source), cfg)
    return build_with_weights(cfg, weights, PEER)
