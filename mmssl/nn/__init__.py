"""Building blocks shared by every tower: one concept per file."""

from typing import TYPE_CHECKING

from mmssl import _submodule_attributes
from mmssl.nn.attention import Attention
from mmssl.nn.block import Block, Transformer
from mmssl.nn.kv_cache import ContextKVCache, KVCache, LayerKVCache
from mmssl.nn.layers import DropPath, LayerScale, PatchEmbed
from mmssl.nn.mlp import Mlp, SwiGLU, build_mlp
from mmssl.nn.norm import ConditionedGate, ConditionedNorm, Norm, Ungated
from mmssl.nn.pos_embed import RotaryEmbedding, apply_rotary, sincos_2d

__all__ = [
    "Attention",
    "Block",
    "ConditionedGate",
    "ConditionedNorm",
    "ContextKVCache",
    "DropPath",
    "KVCache",
    "LayerKVCache",
    "LayerScale",
    "Mlp",
    "Norm",
    "PatchEmbed",
    "RotaryEmbedding",
    "SwiGLU",
    "Transformer",
    "Ungated",
    "apply_rotary",
    "build_mlp",
    "sincos_2d",
]

if not TYPE_CHECKING:  # `mmssl.nn.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
