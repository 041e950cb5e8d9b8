"""Reading another library's weights safely, and loading converted weights strictly.

Shared by every peer converter.  Loading never unpickles arbitrary objects: a source is an
in-memory state dict or module, a `.safetensors` file, or a torch file read with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmssl.models.config import ModelConfig
from mmssl.models.multimodal import MultimodalModel

StateDict = dict[str, torch.Tensor]
Source = Mapping[str, Any] | nn.Module | str | Path
# A rule maps a peer key to (mmssl key, tensor transform), or None for a key it does not know.
Rule = Callable[[str], tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Training checkpoints wrap the weights in one of these keys (open_clip, timm, Lightning).
WRAPPERS = ("state_dict", "model", "module")


def keep(t: torch.Tensor) -> torch.Tensor:
    """The tensor transform of a rule that copies a weight as it is."""
    return t


def transpose(t: torch.Tensor) -> torch.Tensor:
    """The tensor transform of a rule whose weight is stored transposed, (in, out) -> (out, in)."""
    return t.t()


def read_state_dict(source: Source) -> StateDict:
    """A state dict (tensors only) from a module, a mapping, or a weights file.

    Files: `.safetensors`, or a torch file (.pt/.pth/.bin/.ckpt) loaded with
    weights_only=True.  A training checkpoint's `state_dict`/`model` wrapper and a DDP
    `module.` prefix are removed.
    """
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, (str, Path)):
        source = _read_file(Path(source).expanduser())
    if not isinstance(source, Mapping):
        raise TypeError(
            f"expected a state dict, an nn.Module or a weights file path, got {type(source).__name__}"
        )
    for wrapper in WRAPPERS:
        inner = source.get(wrapper)
        if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
            source = inner
            break
    bad = sorted(k for k, v in source.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"not a state dict of tensors: non-tensor entries {bad[:8]}")
    if source and all(k.startswith("module.") for k in source):
        return {k[len("module.") :]: v for k, v in source.items()}
    return dict(source)


def _read_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable or damaged safetensors file ({err})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"{path}: unknown weights format {path.suffix!r}; "
            f"use .safetensors or a torch file ({', '.join(TORCH_SUFFIXES)})"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True): {first_line}"
        ) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a state dict")
    return data


def rename(state_dict: Mapping[str, torch.Tensor], rule: Rule, peer: str) -> StateDict:
    """Apply `rule` to every key; any key the rule does not know is an error listing them."""
    out: StateDict = {}
    unknown = []
    for key, tensor in state_dict.items():
        mapped = rule(key)
        if mapped is None:
            unknown.append(key)
            continue
        new_key, fn = mapped
        if new_key in out:
            raise ValueError(f"{peer} weights map two keys to {new_key!r} (last: {key!r})")
        out[new_key] = fn(tensor)
    if unknown:
        raise ValueError(f"{len(unknown)} {peer} keys have no mmssl counterpart: {sorted(unknown)}")
    return out


def build_with_weights(
    cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], peer: str
) -> MultimodalModel:
    """A MultimodalModel of `cfg` holding exactly `state_dict` (fp32 copies), in eval mode.

    Missing and unexpected keys and shape mismatches are one error listing all of them.
    The model is built on the meta device, so no time goes into a random init that the
    weights would overwrite.
    """
    with torch.device("meta"):
        model = MultimodalModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    # an integer tensor where mmssl has a float one (a parameter) failed inside load_state_dict
    kinds = sorted(
        f"{k}: {state_dict[k].dtype} vs {expected[k].dtype}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].is_floating_point() != expected[k].is_floating_point()
    )
    if missing or unexpected or shapes or kinds:
        parts = [
            f"{label} {items}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch (peer vs mmssl)", shapes),
                ("dtype kind mismatch (peer vs mmssl)", kinds),
            )
            if items
        ]
        raise ValueError(
            f"converted {peer} weights do not fit the mmssl config: " + "; ".join(parts)
        )
    # Copies, so the mmssl model never shares storage with the peer model it came from.
    weights = {
        k: v.detach().to(
            device="cpu",
            dtype=torch.float32 if v.is_floating_point() else v.dtype,
            memory_format=torch.contiguous_format,
            copy=True,
        )
        for k, v in state_dict.items()
    }
    model.load_state_dict(weights, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        # Non-persistent buffers (rotary tables) are computed at init: build on the CPU.
        model = MultimodalModel(cfg)
        model.load_state_dict(weights, strict=True)
    return model.eval()


def require(package: str) -> Any:
    """Import an optional peer library, with an error that says how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"{package} is not installed; install the interop extra: pip install 'mmssl[interop]'"
        ) from None


def load_peer(
    source: Any,
    config: Any,
    derive_config: Callable[[Any], ModelConfig],
    convert: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]],
    peer: str,
    config_hint: str,
) -> MultimodalModel:
    """The shared shape of every `load_*`: a ModelConfig (given, or derived from the peer model
    or a peer config name/dict), the converted state dict, and the mmssl model built with it.

    Weights alone do not say the activation or the head count, so a state dict or a file
    needs `config`; `config_hint` says what the peer accepts there.
    """
    if config is None:
        if not isinstance(source, nn.Module):
            raise ValueError(
                f"loading {peer} weights from a state dict or file needs config= ({config_hint})"
            )
        cfg = derive_config(source)
    elif isinstance(config, ModelConfig):
        cfg = config
    else:
        cfg = derive_config(config)
    return build_with_weights(cfg, convert(read_state_dict(source), cfg), peer)
