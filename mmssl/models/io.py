"""Exported models on disk: `model.safetensors` + `config.json`; loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmssl.models.config import ModelConfig
from mmssl.models.multimodal import MultimodalModel
from mmssl.schema import ConfigError, from_dict, to_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def aliases(model: nn.Module) -> dict[str, str]:
    """State-dict names that alias an earlier name's tensor (a shared trunk appears under both
    towers) -> that earlier name."""
    first: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if tensor.numel() and ptr in first:
            out[name] = first[ptr]
        else:
            first.setdefault(ptr, name)
    return out


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (safetensors refuses aliased tensors)."""
    skip = aliases(model)
    return {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if name not in skip
    }


def save_pretrained(
    model: MultimodalModel, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write `model.safetensors` and `config.json` ({"model": ModelConfig, **extra}) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(unique_state_dict(model), str(out / WEIGHTS), metadata={"format": "pt"})
    config = {"model": to_dict(model.cfg), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an exported model directory, with a clear error if it is unusable."""
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json (is {path} an exported model?)")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{cfg_path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{cfg_path}: missing the 'model' section")
    return data


def load_pretrained(path: str | Path) -> MultimodalModel:
    """Rebuild the model of an exported directory and load its weights (strict)."""
    data = read_config(path)
    model = MultimodalModel(from_dict(ModelConfig, data["model"], "model"))
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights}: unreadable or damaged safetensors file ({err})") from None
    for name, kept in aliases(model).items():
        if kept in state:
            state[name] = state[kept]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state)
    return model.eval()


def load_encoder(path: str | Path, tower: str = "vision") -> nn.Module:
    """One tower of an exported model, in eval mode ('vision', 'text' or 'model')."""
    if tower not in ("vision", "text", "model"):
        raise ValueError(f"tower must be 'vision', 'text' or 'model', got {tower!r}")
    model = load_pretrained(path)
    if tower == "model":
        return model
    return model._tower(tower).eval()
