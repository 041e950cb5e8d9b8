"""THE Block, and Transformer: a stack of Blocks.

Every tower in mmssl (vision, text, shared trunk, caption decoder) is built from this one
class.  Options that are off are identity modules, so `forward` reads like the maths:

    x = x + drop_path(gate1(ls1(attn(norm1(x, c))), c))
    x = x + drop_path(ls_x(cross_attn(norm_x(x), context)))      # caption decoders only
    x = x + drop_path(gate2(ls2(mlp(norm2(x, c))), c))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmssl.nn.attention import Attention, check_rows
from mmssl.nn.kv_cache import ContextKVCache, KVCache, LayerKVCache
from mmssl.nn.layers import DropPath, LayerScale
from mmssl.nn.mlp import build_mlp
from mmssl.nn.norm import ConditionedGate, ConditionedNorm, Norm, Ungated


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), rows (B,) int64 -> (B, 1, D): row rows[b] of sample b."""
    return x.gather(1, rows.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))


class CrossAttentionBranch(nn.Module):
    """Pre-norm residual cross-attention to a context sequence: x + attn(norm(x), context)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        norm: str,
        norm_eps: float,
        qkv_bias: bool,
        context_dim: int | None,
        init_values: float | None,
        drop_path: float,
    ):
        super().__init__()
        self.norm = Norm(dim, norm, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, cross=True, context_dim=context_dim)
        self.ls = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        context_cache: ContextKVCache | None = None,
    ) -> torch.Tensor:
        """x (B, N, D), context (B, M, D_context) -> (B, N, D); `context_cache` holds the context's
        keys and values once projected (decoding), so later calls need not project it again."""
        h = self.attn(self.norm(x), context=context, context_cache=context_cache)
        return x + self.drop_path(self.ls(h))


class NoCrossAttention(nn.Module):
    """Stands in for CrossAttentionBranch in blocks without one: x passes as it is (the
    context and its cache, which CrossAttentionBranch takes, are ignored)."""

    def forward(self, x: torch.Tensor, *_ignored: object) -> torch.Tensor:
        """x (B, N, D), returned as it is."""
        return x


class Block(nn.Module):
    """Pre-norm transformer block.  x: (B, N, D) -> (B, N, D).

    cond_dim: when set, norms and gates are adaLN-Zero conditioned on a (B, cond_dim) vector
    (equal to the plain block at init, and when called with cond=None).
    cross_attn: adds a cross-attention sub-layer over a `context` sequence.
    kv_cache (forward): the layer's cache; the self-attention appends to it, and the
    cross-attention projects the context's keys and values into `kv_cache.context` once.
    rows (forward): (B,) int64, compute only row rows[b] of sample b (its keys and values
    from every row): (B, N, D) -> (B, 1, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm: str = "layernorm",
        norm_eps: float = 1e-6,
        mlp: str = "mlp",
        act: str = "gelu",
        mlp_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        cond_dim: int | None = None,
        cross_attn: bool = False,
        context_dim: int | None = None,
    ):
        super().__init__()
        if cond_dim:
            self.norm1: nn.Module = ConditionedNorm(dim, cond_dim, norm, norm_eps)
            self.norm2: nn.Module = ConditionedNorm(dim, cond_dim, norm, norm_eps)
            self.gate1: nn.Module = ConditionedGate(dim, cond_dim)
            self.gate2: nn.Module = ConditionedGate(dim, cond_dim)
        else:
            self.norm1, self.norm2 = Norm(dim, norm, norm_eps), Norm(dim, norm, norm_eps)
            self.gate1, self.gate2 = Ungated(), Ungated()
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.cross: nn.Module = (
            CrossAttentionBranch(
                dim, num_heads, norm, norm_eps, qkv_bias, context_dim, init_values, drop_path
            )
            if cross_attn
            else NoCrossAttention()
        )
        self.mlp = build_mlp(mlp, dim, mlp_ratio, act, mlp_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        attn_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: LayerKVCache | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D), or (B, 1, D) with `rows`; cond (B, C) or None; context
        (B, M, D_context) for the cross-attention; rope: (cos, sin) from RotaryEmbedding."""
        h = self.attn(
            self.norm1(x, cond),
            attn_mask=attn_mask,
            is_causal=is_causal,
            rope=rope,
            kv_cache=kv_cache,
            rows=rows,
        )
        if rows is not None:  # the residual stream of those rows only
            x = take_rows(x, rows)
        x = x + self.drop_path(self.gate1(self.ls1(h), cond))
        x = self.cross(x, context, kv_cache.context if kv_cache is not None else None)
        x = x + self.drop_path(self.gate2(self.ls2(self.mlp(self.norm2(x, cond))), cond))
        return x


class Transformer(nn.Module):
    """A stack of `depth` Blocks.  x: (B, N, D) -> (B, N, D).

    causal: the default attention pattern of the stack (True for language models).  A shared
        trunk overrides it per call with `is_causal=`.
    cond_depth: condition only the top k blocks (None: all, when cond_dim is set).
    drop_path: the maximum rate, increased linearly with depth.
    rows (forward): (B,) int64 for a caller that reads one row per sample (a class or
        end-of-text token): the last block computes only row rows[b] of sample b, its keys
        and values still from every row, and the stack returns (B, 1, D).  The same values
        as the full output's rows, without ~3/4 of the last block's compute.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        causal: bool = False,
        drop_path: float = 0.0,
        cond_dim: int | None = None,
        cond_depth: int | None = None,
        grad_checkpointing: bool = False,
        **block_kwargs: object,
    ):
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = grad_checkpointing
        if cond_depth is not None and not 1 <= cond_depth <= depth:
            # 0 or less conditioned no block (cond accepted and ignored); more was all blocks
            raise ValueError(f"cond_depth must be in [1, depth={depth}], got {cond_depth}")
        first_conditioned = depth - (depth if cond_depth is None else cond_depth)
        if not 0.0 <= drop_path <= 1.0:  # a negative rate was silently no drop path
            raise ValueError(f"drop_path must be in [0, 1], got {drop_path}")
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                drop_path=rates[i],
                cond_dim=cond_dim if i >= first_conditioned else None,
                **block_kwargs,  # type: ignore[arg-type]
            )
            for i in range(depth)
        )

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        is_causal: bool | None = None,
        attn_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """kv_cache: run x as the positions after the cached ones (incremental decoding);
        rows: see the class docstring."""
        kwargs: dict[str, Any] = dict(
            is_causal=self.causal if is_causal is None else is_causal,
            attn_mask=attn_mask,
            context=context,
            rope=rope,
        )
        if kv_cache is not None and len(kv_cache.layers) != len(self.blocks):
            raise ValueError(
                f"kv cache of {len(kv_cache.layers)} layers for {len(self.blocks)} blocks"
            )
        if rows is not None:  # before any block runs (or appends to a cache)
            check_rows(rows, x.shape[0])
            if kv_cache is not None:
                raise ValueError("rows is for a self-attention without a kv cache")
            if not self.blocks:
                return take_rows(x, rows)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache.layers[i] if kv_cache is not None else None
            if i == last and rows is not None:  # (absent otherwise: one compiled graph)
                kwargs["rows"] = rows
            if layer_cache is not None:  # a recomputed checkpoint would append twice
                x = block(x, cond, kv_cache=layer_cache, **kwargs)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, use_reentrant=False, **kwargs)
            else:
                x = block(x, cond, **kwargs)
        return x
