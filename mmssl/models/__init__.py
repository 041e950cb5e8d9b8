"""Models: configs, towers, the multimodal model and the registry of named architectures."""

from typing import TYPE_CHECKING

from mmssl import _submodule_attributes
from mmssl.models.config import BlockConfig, CaptionConfig, ModelConfig, TextConfig, VisionConfig
from mmssl.models.multimodal import MultimodalModel
from mmssl.models.registry import create_model, list_models, resolve_model_config
from mmssl.models.text import TextTransformer
from mmssl.models.vision import VisionEncoder

__all__ = [
    "BlockConfig",
    "CaptionConfig",
    "ModelConfig",
    "MultimodalModel",
    "TextConfig",
    "TextTransformer",
    "VisionConfig",
    "VisionEncoder",
    "create_model",
    "list_models",
    "resolve_model_config",
]

if not TYPE_CHECKING:  # `mmssl.models.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
