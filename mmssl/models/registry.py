"""Named architectures: `create_model(name_or_path, **overrides)` and `list_models()`.

Each name is a JSON file in `configs/` listing what differs from the ModelConfig defaults.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from mmssl.models.config import ModelConfig, check_values
from mmssl.models.multimodal import MultimodalModel
from mmssl.schema import ConfigError, apply_overrides, from_dict, merge, read_json_config, suggest

CONFIG_DIR = Path(__file__).parent / "configs"
PACKAGE_DIR = str(Path(__file__).parents[1]) + os.sep  # mmssl/


@functools.cache
def list_models() -> list[str]:
    """Names of the shipped architectures, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def config_file(name_or_path: str) -> Path:
    """The JSON file `name_or_path` means.  A registered name (`list_models()`) always means
    the shipped architecture, whatever the working directory holds; anything else is a path:
    a `.json` file, or a directory holding `config.json` (an export)."""
    if name_or_path in list_models():
        return CONFIG_DIR / f"{name_or_path}.json"
    path = Path(name_or_path)
    if path.suffix != ".json" and not path.exists():
        raise ConfigError(
            f"unknown model {name_or_path!r}{suggest(name_or_path, list_models())}; "
            f"see mmssl.list_models()"
        )
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}")
    return path


class ModelFileError(ConfigError):
    """A model config file's own error (not its overrides'), naming the file."""


def model_config_dict(name_or_path: str) -> dict[str, Any]:
    """The raw config of a named architecture or of a JSON file (`config_file`)."""
    path = config_file(name_or_path)
    data = read_json_config(path, ModelFileError)
    return data.get("model", data) if isinstance(data, dict) else data


def resolve_model_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of a name/path with overrides: nested dicts (`vision={'depth': 2}`) or dotted
    keys (`**{'vision.depth': 2}`).  An error the file makes without the overrides is a
    ModelFileError naming the file."""
    own = model_config_dict(name_or_path)
    try:
        return with_overrides(own, overrides)
    except ConfigError as err:
        if overrides and _config_problem(own) != str(err):
            raise  # the overrides' error
        raise ModelFileError(f"{config_file(name_or_path)}: {err}") from None


def with_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    """The checked ModelConfig of a config dict with overrides, nested (`vision={'depth': 2}`)
    or dotted (`**{'vision.depth': 2}`); ConfigError naming the key."""
    _refuse_twice_given(overrides)
    dotted = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if "." in k]
    nested = {k: v for k, v in overrides.items() if "." not in k}
    return checked_config(apply_overrides(merge(data, nested), dotted, schema=ModelConfig))


def _refuse_twice_given(overrides: dict[str, Any]) -> None:
    """A key set by two entries of the overrides, dotted (`vision.depth: 2`) and nested
    (`vision: {depth: 4}`, which is what a command-line `model.overrides.vision.depth=4`
    adds), or by two dotted ones (`vision.block: {...}`, `vision.block.norm_eps`), is a
    ConfigError: one of them won without a word, by the order they were applied in."""

    def leaves(path: tuple[str, ...], value: Any) -> list[tuple[str, ...]]:
        if isinstance(value, dict) and value:
            return [p for k, v in value.items() for p in leaves((*path, str(k)), v)]
        return [path]

    seen: dict[tuple[str, ...], str] = {}
    for key, value in overrides.items():
        for path in leaves(tuple(key.split(".")), value):
            for other, where in seen.items():
                n = min(len(path), len(other))
                if where != key and path[:n] == other[:n]:
                    raise ConfigError(
                        f"model.{'.'.join(path[:n])} is given twice in the overrides, in "
                        f"{where!r} and {key!r}: keep one (the command line nests its keys, "
                        "so a key the recipe writes with dots is changed in the recipe)"
                    )
            seen[path] = key


def checked_config(data: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a dict, its keys, types and values checked (ConfigError)."""
    cfg = from_dict(ModelConfig, data, "model")
    check_values(cfg)
    return cfg


def _config_problem(data: Any) -> str | None:
    try:
        checked_config(data)
    except ConfigError as err:
        return str(err)
    return None


def create_model(name_or_path: str, **overrides: Any) -> MultimodalModel:
    """Build a randomly initialised model from a registry name or a JSON config path, with
    overrides.  A registered name always means the shipped architecture: reach a local
    config of the same name by a path (`./name`, an absolute path, or a `.json` file).
    Only the config is read: an export's weights load with `mmssl.load_encoder`."""
    _warn_if_weights_beside(name_or_path)
    return MultimodalModel(resolve_model_config(name_or_path, **overrides))


def _warn_if_weights_beside(name_or_path: str) -> None:
    """Warn when the config is an export's: its weights beside it are not loaded."""
    path = config_file(name_or_path)
    weights = path.parent / "model.safetensors"
    if path.parent != CONFIG_DIR and weights.is_file():
        warnings.warn(
            f"create_model builds a randomly initialised model from {path} and does not load "
            f"{weights}: use mmssl.load_encoder({str(path.parent)!r}, tower='model') for the "
            "trained weights",
            stacklevel=user_stacklevel(),
        )


def user_stacklevel() -> int:
    """The warnings.warn stacklevel, for the function that calls this, of the first frame
    outside the mmssl package: the user's line, whether they called this module or a wrapper
    (mmssl.create_model).  Python's default filter shows a warning once per location, so one
    inside mmssl would be shown once per process, whatever the user's call."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level
