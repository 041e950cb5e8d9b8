"""Helpers for the model tests (test_models*.py): registry models cut to a small size."""

from __future__ import annotations

import mmssl
from mmssl.models import MultimodalModel, resolve_model_config


def small(name: str, **extra) -> MultimodalModel:
    """The registry architecture with its depth cut to 1 and small inputs, so every shipped
    config is exercised quickly; the tiny test configs are built as they are."""
    over: dict = {}
    cfg = resolve_model_config(name)
    if not name.startswith("test_tiny"):
        if cfg.vision is not None:
            over["vision"] = {"depth": 1, "image_size": 2 * cfg.vision.patch_size}
        if cfg.text is not None:
            over["text"] = {"depth": 1, "context_length": 16}
        if cfg.caption is not None:
            over["caption"] = {"depth": 1}
    for key, value in extra.items():
        over.setdefault(key, {}).update(value)
    return mmssl.create_model(name, **over)
