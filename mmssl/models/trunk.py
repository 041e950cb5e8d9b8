"""Building a tower's Transformer from its BlockConfig (one place, so every tower agrees)."""

from __future__ import annotations

from mmssl.models.config import BlockConfig
from mmssl.nn import Transformer


def build_trunk(
    dim: int,
    depth: int,
    num_heads: int,
    block: BlockConfig,
    *,
    causal: bool,
    cond_dim: int | None = None,
    cond_depth: int | None = None,
    grad_checkpointing: bool = False,
    cross_attn: bool = False,
    context_dim: int | None = None,
) -> Transformer:
    """A stack of `depth` mmssl Blocks with the options of `block`."""
    return Transformer(
        dim,
        depth,
        num_heads,
        causal=causal,
        drop_path=block.drop_path,
        cond_dim=cond_dim,
        cond_depth=cond_depth,
        grad_checkpointing=grad_checkpointing,
        mlp_ratio=block.mlp_ratio,
        qkv_bias=block.qkv_bias,
        qk_norm=block.qk_norm,
        norm=block.norm,
        norm_eps=block.norm_eps,
        mlp=block.mlp,
        act=block.act,
        mlp_bias=block.mlp_bias,
        init_values=block.init_values,
        cross_attn=cross_attn,
        context_dim=context_dim,
    )
