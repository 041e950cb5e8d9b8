"""timm VisionTransformer -> mmssl vision-only MultimodalModel.

timm's ViT Block has the same pre-norm layout and parameter names as mmssl's Block
(`norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`, `mlp.fc2`, `ls2.gamma`),
so the conversion is a change of prefix.  timm's `forward_features` output is mmssl's final
normed sequence: the class token at index 0 is `pooled`, the rest are `tokens`.  The
classifier `head` has no place in an encoder and is skipped.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmssl.interop.weights import (
    Source,
    StateDict,
    keep,
    load_peer,
    rename,
    require,
)
from mmssl.models.config import BlockConfig, ModelConfig, VisionConfig
from mmssl.models.io import check_model_config
from mmssl.models.multimodal import MultimodalModel

PEER = "timm"
DIRECT = {
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "cls_token",
    "pos_embed",
    "norm_pre.weight",
    "norm_pre.bias",
    "norm.weight",
    "norm.bias",
}
BLOCK_RE = re.compile(
    r"blocks\.\d+\.(norm1|attn\.qkv|attn\.q_norm|attn\.k_norm|attn\.proj|ls1|norm2|mlp\.fc1|"
    r"mlp\.fc2|ls2)\.(weight|bias|gamma)"
)
SKIPPED = re.compile(r"head\.(weight|bias)")
ACTS = {
    ("GELU", "none"): "gelu",
    ("GELU", None): "gelu",  # timm.layers.GELU (act_layer='gelu'): F.gelu, exact
    ("GELU", "tanh"): "gelu_tanh",
    ("GELUTanh", None): "gelu_tanh",
    ("QuickGELU", None): "quick_gelu",
    ("SiLU", None): "silu",
    ("ReLU", None): "relu",
}


def _rule(key: str) -> tuple[str, Any] | None:
    if key in DIRECT or BLOCK_RE.fullmatch(key):
        if key.startswith("blocks."):
            return f"visual.trunk.{key}", keep
        return f"visual.{key}", keep
    return None


def convert_timm_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig | None = None
) -> StateDict:
    """timm VisionTransformer keys -> mmssl keys (`visual.*`); the classifier head is dropped.

    Any other key the mapping does not know is an error listing them.  `cfg` is accepted for
    symmetry with the other converters; the mapping does not depend on it.
    """
    del cfg
    head = state_dict.get("head.weight")
    if head is not None and head.numel():  # a fine-tuned classifier's logits are lost: say so
        warnings.warn(
            f"timm ViT: its classifier head ({head.shape[0]} classes) is not imported; the "
            "mmssl encoder returns the features before it",
            stacklevel=3,
        )
    sd = {k: v for k, v in state_dict.items() if not SKIPPED.fullmatch(k)}
    return rename(sd, _rule, PEER)


def _unsupported(what: str) -> ValueError:
    return ValueError(f"timm ViT with {what} is not supported by mmssl")


def _norm(module: nn.Module, where: str) -> tuple[str, float]:
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or module.bias is None:
            raise _unsupported(f"a bias-free or non-affine {where}")
        return "layernorm", float(module.eps)
    if isinstance(module, nn.RMSNorm) or type(module).__name__ == "RMSNorm":
        if getattr(module, "weight", None) is None:
            raise _unsupported(f"a non-affine RMSNorm as {where}")
        if module.eps is None:
            # torch then uses finfo(dtype).eps: 1.2e-7 in fp32 but 7.8e-3 in bf16, which
            # mmssl's one float norm_eps cannot follow
            raise _unsupported(f"RMSNorm(eps=None) as {where} (a dtype-dependent eps)")
        return "rmsnorm", float(module.eps)  # type: ignore[arg-type]
    raise _unsupported(f"{type(module).__name__} as {where}")


def _act(module: nn.Module) -> str:
    name = type(module).__name__
    key = (name, getattr(module, "approximate", None))
    if key not in ACTS:
        raise _unsupported(f"activation {name}")
    return ACTS[key]


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise _unsupported(what)


def config_from_module(model: Any) -> ModelConfig:
    """A built timm VisionTransformer (duck-typed nn.Module) -> ModelConfig, read from its modules."""
    if type(model).__name__ != "VisionTransformer" or not hasattr(model, "blocks"):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer")
    pe = model.patch_embed
    _check(type(pe).__name__ == "PatchEmbed", f"a {type(pe).__name__} stem (hybrid ViT)")
    img, patch = tuple(pe.img_size), tuple(pe.patch_size)
    _check(img[0] == img[1] and patch[0] == patch[1], "a non-square image or patch size")
    _check(isinstance(pe.norm, nn.Identity), "a patch-embedding norm")
    _check(getattr(model, "num_reg_tokens", 0) == 0, "register tokens")
    _check(not getattr(model, "no_embed_class", False), "no_embed_class")
    _check(getattr(model, "attn_pool", None) is None, "attention pooling")
    _check(
        isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
        "fc_norm (norm after pooling)",
    )
    _check(not isinstance(model.norm, nn.Identity), "no final norm")
    pool = {"token": "token", "avg": "mean"}.get(model.global_pool)
    _check(pool is not None, f"global_pool={model.global_pool!r}")
    _check(not getattr(model, "pool_include_prefix", False), "pool_include_prefix")
    dim = model.embed_dim
    norm_kind, eps = _norm(model.norm, "final norm")
    if not isinstance(model.norm_pre, nn.Identity):
        _check(
            _norm(model.norm_pre, "norm_pre") == (norm_kind, eps), "norm_pre unlike the other norms"
        )
    blocks = list(model.blocks)
    b0 = blocks[0]
    for b in blocks:
        _check(type(b).__name__ == "Block", f"{type(b).__name__} blocks")
        _check(type(b.attn).__name__ == "Attention", f"{type(b.attn).__name__} attention")
        _check(type(b.mlp).__name__ == "Mlp", f"{type(b.mlp).__name__} MLPs")
        _check(
            b.attn.attn_dim == dim and getattr(b.attn, "gate", None) is None,
            "an attention width other than embed_dim or gated attention",
        )
        _check(
            isinstance(b.attn.norm, nn.Identity) and isinstance(b.mlp.norm, nn.Identity),
            "attention/MLP inner norms",
        )
        _check(b.attn.proj.bias is not None, "a bias-free attention projection")
        for where in ("norm1", "norm2"):
            _check(_norm(getattr(b, where), where) == (norm_kind, eps), "mixed norms")
    qk_norm = not isinstance(b0.attn.q_norm, nn.Identity)
    if qk_norm:
        # mmssl's qk-norm is nn.LayerNorm at its default eps.
        _check(
            isinstance(b0.attn.q_norm, nn.LayerNorm) and b0.attn.q_norm.eps == 1e-5,
            "a q/k norm other than LayerNorm(eps=1e-5)",
        )
    init_values = getattr(b0.ls1, "init_values", None) if hasattr(b0.ls1, "gamma") else None
    vision = VisionConfig(
        image_size=img[0],
        patch_size=patch[0],
        in_chans=pe.proj.in_channels,
        dim=dim,
        depth=len(blocks),
        num_heads=b0.attn.num_heads,
        block=BlockConfig(
            mlp_ratio=b0.mlp.fc1.out_features / dim,
            qkv_bias=b0.attn.qkv.bias is not None,
            qk_norm=qk_norm,
            norm=norm_kind,  # type: ignore[arg-type]
            norm_eps=eps,
            act=_act(b0.mlp.act),  # type: ignore[arg-type]
            mlp_bias=b0.mlp.fc1.bias is not None,
            init_values=float(init_values) if init_values else None,
        ),
        patch_bias=pe.proj.bias is not None,
        class_token=model.cls_token is not None,
        pos_embed="learned" if model.pos_embed is not None else "none",
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        pool=pool,  # type: ignore[arg-type]
    )
    return ModelConfig(vision=vision)


def timm_vit_config(model_or_name: nn.Module | str) -> ModelConfig:
    """The mmssl ModelConfig of a timm ViT: a built model, or a timm model name (built on the
    meta device without weights, so nothing downloads and nothing is initialised)."""
    if isinstance(model_or_name, str):
        timm = require("timm")
        if model_or_name.startswith("hf-hub:") or model_or_name.startswith("hf_hub:"):
            raise ValueError(f"{model_or_name!r}: mmssl does not download configs; use a timm name")
        try:
            with torch.device("meta"):
                model_or_name = timm.create_model(model_or_name, pretrained=False)
        except RuntimeError as err:
            raise ValueError(f"unknown timm model {model_or_name!r} ({err})") from None
    if not isinstance(model_or_name, nn.Module):
        raise TypeError(f"expected a timm model or name, got {type(model_or_name).__name__}")
    cfg = config_from_module(model_or_name)
    check_model_config(cfg, "timm config")  # e.g. a NaN eps would give NaN features
    return cfg


def load_timm_vit(source: Source, config: ModelConfig | str | None = None) -> MultimodalModel:
    """timm ViT weights -> an mmssl vision-only MultimodalModel in eval mode (fp32).

    source: a timm VisionTransformer, its state dict, or a `.safetensors` / torch weights file.
    config: a ModelConfig or a timm model name ('vit_small_patch16_224'); optional when
        `source` is a model (read from it).
    """
    return load_peer(
        source,
        config,
        timm_vit_config,
        convert_timm_vit_state_dict,
        PEER,
        "a timm model name such as 'vit_small_patch16_224', or a ModelConfig",
    )
