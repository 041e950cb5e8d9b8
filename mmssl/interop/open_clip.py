"""open_clip / OpenAI CLIP ViT models -> mmssl MultimodalModel.

open_clip's default tower is the same pre-norm ViT as mmssl's: MultiheadAttention's
`in_proj` is the fused qkv (q, k, v order), `visual.proj` and `text_projection` are
(D, E) matrices applied as `x @ proj` (mmssl's bias-free Linear holds their transpose), and
the text tower pools at the argmax token (the end-of-text id is the largest), which is the
last valid token that mmssl pools at when `text_mask = text != 0`.  A tower that pools at
the first eos token (`pool_type="eos"`) needs `text_mask = text != PAD`, PAD the id its
tokenizer pads with: 1 for the XLM-R tokenizers of open_clip's "worldwide" configs, whose
configs do not record it.  Loading such a tower warns, unless its config sets `pad_id` 0.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from mmssl.interop.weights import (
    Rule,
    Source,
    StateDict,
    keep,
    load_peer,
    rename,
    require,
    transpose,
)
from mmssl.models.config import BlockConfig, ModelConfig, TextConfig, VisionConfig
from mmssl.models.io import check_model_config
from mmssl.models.multimodal import MultimodalModel
from mmssl.models.registry import user_stacklevel

PEER = "open_clip"
BLOCK_NAMES = {
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ls_1": "ls1",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ls_2": "ls2",
}
TOP_NAMES = {
    "visual.conv1.weight": ("visual.patch_embed.proj.weight", keep),
    "visual.class_embedding": ("visual.cls_token", lambda t: t.reshape(1, 1, -1)),
    "visual.positional_embedding": ("visual.pos_embed", lambda t: t.unsqueeze(0)),
    "visual.ln_pre.weight": ("visual.norm_pre.weight", keep),
    "visual.ln_pre.bias": ("visual.norm_pre.bias", keep),
    "visual.ln_post.weight": ("visual.norm.weight", keep),
    "visual.ln_post.bias": ("visual.norm.bias", keep),
    "visual.proj": ("visual.proj.weight", transpose),
    "token_embedding.weight": ("text.token_embed.weight", keep),
    "positional_embedding": ("text.pos_embed", keep),
    "ln_final.weight": ("text.norm.weight", keep),
    "ln_final.bias": ("text.norm.bias", keep),
    "text_projection": ("text.proj.weight", transpose),
    "logit_scale": ("logit_scale", keep),
}
# Kept by OpenAI's JIT checkpoints: not weights, and recomputed by mmssl.
SKIP = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
BLOCK_RE = re.compile(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)")
ACTS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}

# Options of open_clip's tower configs that change the computation, with the values mmssl
# reproduces.  Anything else is refused by name.
VISION_SUPPORTED = {
    "attentional_pool": (False,),
    "pool_type": ("tok", "avg"),
    "pos_embed_type": ("learnable",),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
    "timm_model_name": (None,),
    "act_kwargs": (None,),
}
TEXT_SUPPORTED = {
    "hf_model_name": (None,),
    "embed_cls": (False,),
    "no_causal_mask": (False,),
    "pool_type": ("argmax", "eos"),
    "proj_type": ("linear",),
    "proj_bias": (False,),
    "act_kwargs": (None,),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
# keys of OpenAI's checkpoints, whose towers use QuickGELU
OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")


def _rule(key: str) -> tuple[str, Any] | None:
    if key.startswith("text."):  # CustomTextCLIP keeps the text tower under `text.`
        key = key[len("text.") :]
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    m = BLOCK_RE.fullmatch(key)
    if m is None:
        return None
    tower, index, rest = m.groups()
    prefix = "visual" if tower.startswith("visual") else "text"
    for peer_name, name in BLOCK_NAMES.items():
        if rest == peer_name or rest.startswith(peer_name + "."):
            return f"{prefix}.trunk.blocks.{index}.{name}{rest[len(peer_name) :]}", keep
    return None


def convert_open_clip_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig | None = None
) -> StateDict:
    """open_clip CLIP / CustomTextCLIP keys -> mmssl MultimodalModel keys.

    Unknown keys are an error listing them.  The mapping does not depend on `cfg`; given, a
    state dict of OpenAI's (its `input_resolution`, ...) for a cfg without QuickGELU warns:
    such weights loaded with GELU without a word (image 0.022, text 0.041 off the peer).
    """
    towers = [t for t in (cfg.vision, cfg.text) if t is not None] if cfg is not None else []
    if any(k in state_dict for k in OPENAI_KEYS) and any(
        t.block.act != "quick_gelu" for t in towers
    ):
        warnings.warn(
            "these are OpenAI CLIP weights (they carry input_resolution), whose towers use "
            "QuickGELU, but the config's use GELU: load them with a '-quickgelu' config "
            "(e.g. 'ViT-B-32-quickgelu')",
            stacklevel=user_stacklevel(),
        )
    rule: Rule = _rule
    sd = {k: v for k, v in state_dict.items() if k not in SKIP}
    return rename(sd, rule, PEER)


def _check_supported(
    section: Mapping[str, Any], supported: dict[str, tuple[Any, ...]], where: str
) -> None:
    for key, allowed in supported.items():
        if key in section and section[key] not in allowed:
            raise ValueError(
                f"open_clip {where}.{key}={section[key]!r} is not supported by mmssl "
                f"(supported: {list(allowed)})"
            )


def _square(size: Any) -> int | None:
    """An image or patch size: an int, or a pair of equal ints (a JSON config's list)."""
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _eps(section: Mapping[str, Any]) -> float:
    return float((section.get("norm_kwargs") or {}).get("eps", 1e-5))


def config_from_dict(model_cfg: Mapping[str, Any]) -> ModelConfig:
    """An open_clip model config dict (`open_clip.get_model_config(name)`) -> ModelConfig."""
    for key in ("init_logit_bias", "multimodal_cfg"):
        if model_cfg.get(key) is not None:
            raise ValueError(f"open_clip {key} (SigLIP bias / CoCa decoder) is not supported")
    v, t = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    _check_supported(v, VISION_SUPPORTED, "vision_cfg")
    _check_supported(t, TEXT_SUPPORTED, "text_cfg")
    pad = t.get("pad_id")  # set only in a config that names it: the tokenizer pads anyway
    if t.get("pool_type") == "eos" and pad != 0:  # mmssl pools at the mask's last True
        mask = (
            f"text != {pad}"
            if pad is not None
            else "text != the id its tokenizer pads with (1 for the XLM-R tokenizers of "
            "open_clip's worldwide configs)"
        )
        warnings.warn(
            f"this open_clip text tower pools at its first end-of-text token (id "
            f"{t.get('eos_id', 2)}): pass encode_text text_mask = {mask}, so that the mask "
            "ends at that token; text != 0 pools a pad when the pad id is another",
            stacklevel=user_stacklevel(),
        )
    if not isinstance(v.get("layers", 12), int):
        raise ValueError("open_clip vision_cfg.layers is a ResNet layout; only ViT towers load")
    act: Literal["gelu", "quick_gelu"] = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    image_size, patch_size = _square(v.get("image_size", 224)), _square(v.get("patch_size", 16))
    if image_size is None or patch_size is None:
        raise ValueError("open_clip non-square image_size/patch_size is not supported")
    width = v.get("width", 768)
    pool: Literal["token", "mean"] = "token" if v.get("pool_type", "tok") == "tok" else "mean"
    if pool == "mean" and v.get("final_ln_after_pool", False):
        # With token pooling the norm commutes with pooling; with the mean it does not.
        raise ValueError(
            "open_clip vision_cfg.final_ln_after_pool with pool_type='avg' is not supported"
        )
    if v.get("final_ln_after_pool", False):
        warnings.warn(
            "open_clip vision_cfg.final_ln_after_pool: the pooled features and embeddings "
            "match open_clip's, but forward_features' tokens carry the final norm, which "
            "open_clip leaves off its tokens",
            stacklevel=user_stacklevel(),
        )
    vision = VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        dim=width,
        depth=v.get("layers", 12),
        num_heads=width // v.get("head_width", 64),
        block=BlockConfig(
            mlp_ratio=v.get("mlp_ratio", 4.0),
            norm_eps=_eps(v),
            act=act,
            init_values=v.get("ls_init_value"),
        ),
        pre_norm=not v.get("no_ln_pre", False),
        patch_bias=False,
        pool=pool,
    )
    text = TextConfig(
        vocab_size=t.get("vocab_size", 49408),
        context_length=t.get("context_length", 77),
        dim=t.get("width", 512),
        depth=t.get("layers", 12),
        num_heads=t.get("heads", 8),
        block=BlockConfig(
            mlp_ratio=t.get("mlp_ratio", 4.0),
            norm_eps=_eps(t),
            act=act,
            init_values=t.get("ls_init_value"),
        ),
        lm_head=False,
    )
    return ModelConfig(vision=vision, text=text, embed_dim=model_cfg.get("embed_dim", 512))


def _layer_scale(ls: nn.Module) -> float | None:
    """open_clip's LayerScale keeps no init value; the first gamma entry stands for it (it only
    matters if the mmssl model is re-initialised)."""
    gamma = getattr(ls, "gamma", None)
    return None if gamma is None else float(f"{float(gamma.detach().flatten()[0]):.6g}")


def config_from_module(model: Any) -> ModelConfig:
    """A built open_clip CLIP model (duck-typed nn.Module) -> ModelConfig, read from its modules."""
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ValueError(f"{type(model).__name__} is not an open_clip CLIP model with a ViT tower")
    text = getattr(model, "text", model)  # CustomTextCLIP nests the text tower
    if not hasattr(text, "token_embedding"):
        raise ValueError("only open_clip's own text transformer loads (not an HF text tower)")
    v_block, t_block = visual.transformer.resblocks[0], text.transformer.resblocks[0]
    act_names = {type(b.mlp.gelu).__name__ for b in (v_block, t_block)}
    if len(act_names) != 1 or next(iter(act_names)) not in ACTS:
        raise ValueError(f"open_clip activation {sorted(act_names)} is not supported")
    for block in (v_block, t_block):  # act_kwargs, refused by name in a config dict too
        approximate = getattr(block.mlp.gelu, "approximate", "none")
        if approximate != "none":
            raise ValueError(
                f"open_clip GELU(approximate={approximate!r}) is not supported (act_kwargs)"
            )
    vision_cfg = {
        "image_size": visual.image_size[0]
        if visual.image_size[0] == visual.image_size[1]
        else None,
        "patch_size": visual.patch_size[0]
        if visual.patch_size[0] == visual.patch_size[1]
        else None,
        "width": visual.transformer.width,
        "layers": visual.transformer.layers,
        "head_width": visual.transformer.width // v_block.attn.num_heads,
        "mlp_ratio": v_block.mlp.c_fc.out_features / visual.transformer.width,
        "ls_init_value": _layer_scale(v_block.ls_1),
        "no_ln_pre": isinstance(visual.ln_pre, nn.Identity),
        "pool_type": visual.pool_type,
        "final_ln_after_pool": visual.final_ln_after_pool,
        "attentional_pool": visual.attn_pool is not None,
        "norm_kwargs": {"eps": v_block.ln_1.eps},
    }
    text_cfg = {
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "width": text.transformer.width,
        "layers": text.transformer.layers,
        "heads": t_block.attn.num_heads,
        "mlp_ratio": t_block.mlp.c_fc.out_features / text.transformer.width,
        "ls_init_value": _layer_scale(t_block.ls_1),
        # a plain CLIP keeps no cls_emb, but its position table has the class token's row
        "embed_cls": getattr(text, "cls_emb", None) is not None
        or text.positional_embedding.shape[0] != text.context_length,
        "no_causal_mask": getattr(text, "attn_mask", None) is None,
        "pool_type": getattr(text, "text_pool_type", None) or text.pool_type,
        "eos_id": getattr(text, "text_eos_id", getattr(text, "eos_id", 2)),
        "proj_bias": isinstance(text.text_projection, nn.Linear),
        "norm_kwargs": {"eps": t_block.ln_1.eps},
    }
    for block, cfg_of in ((v_block, vision_cfg), (t_block, text_cfg)):
        if type(block).__name__ != "ResidualAttentionBlock":  # qk-norm, scaled cosine, ...
            cfg_of["block_type"] = type(block).__name__
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError("open_clip init_logit_bias (SigLIP bias) is not supported")
    for cfg in (vision_cfg, text_cfg):
        for key in ("image_size", "patch_size"):
            if key in cfg and cfg[key] is None:
                raise ValueError(f"open_clip non-square {key} is not supported")
    return config_from_dict(
        {
            "embed_dim": visual.output_dim,
            "quick_gelu": ACTS[next(iter(act_names))] == "quick_gelu",
            "vision_cfg": vision_cfg,
            "text_cfg": text_cfg,
        }
    )


def open_clip_model_config(model_or_cfg: str | Mapping[str, Any] | nn.Module) -> ModelConfig:
    """The mmssl ModelConfig of an open_clip model.

    model_or_cfg: an open_clip architecture name ('ViT-B-32', 'ViT-L-14-quickgelu', ...;
    read from open_clip's bundled configs, nothing downloads), its config dict, or a built
    open_clip model.
    """
    cfg = _model_config(model_or_cfg)
    check_model_config(cfg, "open_clip config")  # e.g. a NaN eps would give NaN features
    return cfg


def _model_config(model_or_cfg: str | Mapping[str, Any] | nn.Module) -> ModelConfig:
    if isinstance(model_or_cfg, nn.Module):
        return config_from_module(model_or_cfg)
    if isinstance(model_or_cfg, str):
        if model_or_cfg.startswith("hf-hub:"):
            raise ValueError(
                f"{model_or_cfg!r}: mmssl does not download configs; pass the config dict"
            )
        open_clip = require("open_clip")
        cfg = open_clip.get_model_config(model_or_cfg)
        if cfg is None:
            raise ValueError(
                f"unknown open_clip model {model_or_cfg!r}; see open_clip.list_models()"
            )
        return config_from_dict(cfg)
    if isinstance(model_or_cfg, Mapping):
        return config_from_dict(model_or_cfg)
    raise TypeError(
        f"expected an open_clip name, config dict or model, got {type(model_or_cfg).__name__}"
    )


def load_open_clip(
    source: Source, config: ModelConfig | str | Mapping[str, Any] | None = None
) -> MultimodalModel:
    """open_clip weights -> an mmssl MultimodalModel in eval mode (fp32).

    source: an open_clip model, its state dict, or a `.safetensors` / torch weights file.
    config: the architecture; optional for a model (read from it).  A ModelConfig, an
        open_clip architecture name ('ViT-B-32-quickgelu'), or an open_clip config dict.
        Weights alone do not say the activation or head count, so a state dict needs one.
    Compare text as open_clip does by passing `text_mask = text != 0` to `encode_text`, or
    `text != pad_id` for a tower that pools at its eos token (loading one warns so).
    """
    return load_peer(
        source,
        config,
        open_clip_model_config,
        convert_open_clip_state_dict,
        PEER,
        "an open_clip model name such as 'ViT-B-32', its config dict, or a ModelConfig",
    )
