"""timm conversion: what the converter cannot express is refused by name (blocks whose
norms differ from the final norm, no final norm, ...), not converted into another model.
(nn.GELU with the tanh approximation converts with parity: test_interop's tiny variants.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from mmssl.interop.timm import timm_vit_config  # noqa: E402


def test_a_block_norm_of_another_eps_is_refused():
    with torch.device("meta"):
        peer = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    peer.blocks[1].norm2.eps = 1e-3  # the final norm keeps timm's 1e-6
    with pytest.raises(ValueError, match="mixed norms"):
        timm_vit_config(peer)


# timm options the converter cannot express: each refused by name, not converted wrong
def _no_final_norm(m):
    m.norm = nn.Identity()


def _other_norm_pre(m):
    m.norm_pre = nn.LayerNorm(m.embed_dim, eps=1e-3)


def _pool_prefix(m):
    m.pool_include_prefix = True


def _bias_free_proj(m):
    m.blocks[0].attn.proj = nn.Linear(m.embed_dim, m.embed_dim, bias=False)


@pytest.mark.parametrize(
    "edit, match",
    [
        (_no_final_norm, "no final norm"),
        (_other_norm_pre, "norm_pre unlike the other norms"),
        (_pool_prefix, "pool_include_prefix"),
        (_bias_free_proj, "bias-free attention projection"),
    ],
)
def test_timm_edited_options_are_named(edit, match):
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        peer = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4)
    edit(peer)
    with pytest.raises(ValueError, match=match):
        timm_vit_config(peer)
