"""Multi-head attention through `F.scaled_dot_product_attention` (fused kernels where they exist).

Self-attention uses one fused qkv projection.  With `cross=True` the queries come from `x`
and the keys and values from another sequence (`context`), for a caption decoder that
attends to image tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.nn.pos_embed import apply_rotary


def merge_masks(
    attn_mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """SDPA takes a mask or `is_causal`, not both; fold the causal triangle into a bool mask.

    attn_mask: bool, broadcastable to (B, H, q_len, k_len), True = may attend.
    """
    if attn_mask is None or not is_causal:
        return attn_mask, is_causal
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return attn_mask & causal, False


class Attention(nn.Module):
    """x: (B, N, D) -> (B, N, D).  Optional qk-norm (per head, LayerNorm) and rotary positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        cross: bool = False,
        context_dim: int | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        b, n, d = x.shape
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context sequence")
            q = self._heads(self.q(x))
            k, v = (self._heads(t) for t in self.kv(context).chunk(2, dim=-1))
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and not self.cross:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        attn_mask, is_causal = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
