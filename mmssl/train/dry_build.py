"""A recipe's model built on the meta device at validation (no memory, no initialisation):
sizes the layers refuse are a ConfigError there, not a traceback once the ranks build it."""

from __future__ import annotations

from typing import Any

from mmssl.schema import ConfigError


def dry_build(cfg: Any) -> None:
    """Build the model on the meta device (no memory, no initialisation): sizes that the
    layers refuse (a width its heads do not divide, ...) are a ConfigError at validation,
    not a traceback once the ranks build it."""
    import torch

    from mmssl.models.multimodal import MultimodalModel

    for where, depth in _depths(cfg, "model.overrides"):
        if depth > MAX_DEPTH:  # a typo: building 2**31 blocks, even on meta, never ends
            raise ConfigError(f"{where}: {depth} layers; at most {MAX_DEPTH}")
    try:
        with torch.device("meta"):
            MultimodalModel(cfg)
    except (ValueError, AssertionError, OverflowError, RuntimeError, TypeError) as err:
        # RuntimeError, TypeError: torch's own size checks ("Storage size calculation
        # overflowed", "Overflow when unpacking long long") of sizes past 64 bits of bytes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model: {first} (model.overrides or the model's config)") from None


MAX_DEPTH = 4096  # layers per tower or head; published transformers have a few hundred


def _depths(cfg: Any, where: str) -> list[tuple[str, int]]:
    """Every `depth` field in a model config's nested dataclasses, with its key."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "depth" and isinstance(value, int):
            out.append((f"{where}.depth", value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += _depths(value, f"{where}.{f.name}")
    return out
