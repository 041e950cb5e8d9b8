"""Loading weights from other libraries into mmssl models.

One module per peer: open_clip (OpenAI-style CLIP ViT), timm (ViT), Hugging Face GPT-2.
Each offers a config derivation (`*_config`), a pure key mapping (`convert_*_state_dict`)
and a loader (`load_*`) that returns a MultimodalModel in eval mode.  The peer libraries
are optional (the `interop` extra) and imported only where a function needs them; nothing
downloads, and weight files are read without unpickling arbitrary objects.
"""

from typing import TYPE_CHECKING

from mmssl import _submodule_attributes
from mmssl.interop.hf_gpt2 import convert_hf_gpt2_state_dict, gpt2_model_config, load_hf_gpt2
from mmssl.interop.open_clip import (
    convert_open_clip_state_dict,
    load_open_clip,
    open_clip_model_config,
)
from mmssl.interop.timm import convert_timm_vit_state_dict, load_timm_vit, timm_vit_config
from mmssl.interop.weights import read_state_dict

__all__ = [
    "convert_hf_gpt2_state_dict",
    "convert_open_clip_state_dict",
    "convert_timm_vit_state_dict",
    "gpt2_model_config",
    "load_hf_gpt2",
    "load_open_clip",
    "load_timm_vit",
    "open_clip_model_config",
    "read_state_dict",
    "timm_vit_config",
]

if not TYPE_CHECKING:  # `mmssl.interop.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
