"""Named architectures: `create_model(name_or_path, **overrides)` and `list_models()`.

Each name is a JSON file in `configs/` listing what differs from the ModelConfig defaults.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from mmssl.models.config import ModelConfig
from mmssl.models.multimodal import MultimodalModel
from mmssl.schema import ConfigError, apply_overrides, from_dict, merge, suggest

CONFIG_DIR = Path(__file__).parent / "configs"


@functools.cache
def list_models() -> list[str]:
    """Names of the shipped architectures, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config_dict(name_or_path: str) -> dict[str, Any]:
    """The raw config of a named architecture or of a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
    else:
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(
                f"unknown model {name_or_path!r}{suggest(name_or_path, list_models())}; "
                f"see mmssl.list_models()"
            )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    return data.get("model", data) if isinstance(data, dict) else data


def resolve_model_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of a name/path with overrides: nested dicts (`vision={'depth': 2}`) or dotted
    keys (`**{'vision.depth': 2}`)."""
    data = model_config_dict(name_or_path)
    dotted = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if "." in k]
    nested = {k: v for k, v in overrides.items() if "." not in k}
    data = apply_overrides(merge(data, nested), dotted)
    return from_dict(ModelConfig, data, "model")


def create_model(name_or_path: str, **overrides: Any) -> MultimodalModel:
    """Build a model from a registry name or a JSON config path, with overrides."""
    return MultimodalModel(resolve_model_config(name_or_path, **overrides))
