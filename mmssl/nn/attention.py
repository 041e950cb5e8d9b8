"""Multi-head attention: fused SDPA kernels, or three plain ops where those are faster.

Self-attention uses one fused qkv projection.  With `cross=True` the queries come from `x`
and the keys and values from another sequence (`context`), for a caption decoder that
attends to image tokens.

Incremental decoding: a self-attention takes `kv_cache` (a `LayerKVCache`) and appends the
keys and values of its new positions; a cross-attention takes `context_cache` (a
`ContextKVCache`) and projects the context's keys and values on its first call only, so
the context must be the same tensor for every call with that cache (one caption).  Calls
without a cache project everything, as in training.

Query rows: a self-attention given `rows` (B,) computes the output of one query row per
sample (keys and values still from every row), for a caller that reads that row only: the
last block of a tower pooled at its class or end-of-text token (`Transformer` `rows`).

Kernels (`Attention.kernel`, set for a whole model with `set_attention_kernel`):
- "sdpa": `F.scaled_dot_product_attention`, fused kernels where they exist (GPUs);
- "matmul": softmax(q k^T / sqrt(d)) v as matmul, softmax, matmul, with the same masks
  and the same result (a query that may attend to nothing gets zeros, as from SDPA);
- "auto" (default): "matmul" on CPU in bf16/fp16 for short sequences, else "sdpa".  There
  the fused flash kernel's backward is slow: at 50 tokens (ViT-S/16 at 112 px, ViT-B/32
  at 224 px) matmul + softmax + matmul ran forward + backward 3.6-5x faster, and still
  1.3-1.9x at 197-256 tokens (`python bench/bench_attention.py`).  Past
  `MATMUL_MAX_SCORES` query x key pairs it gains little, and the (B, H, Nq, Nk)
  probabilities it keeps for the backward grow with the square of the length.
  In bf16 it rounds the scores and probabilities to bf16, as timm's and open_clip's
  non-fused paths do: its error against fp64 is about 1.7x that of the flash kernel,
  which keeps them in fp32 (0.35% against 0.2% of the mean output magnitude).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.nn.kv_cache import ContextKVCache, LayerKVCache
from mmssl.nn.pos_embed import apply_rotary

KERNELS = ("auto", "sdpa", "matmul")
# "auto" takes the matmul kernel on CPU in bf16/fp16 up to this many query x key pairs per
# head (bench/bench_attention.py, forward + backward, 2 threads): 3.6-5x faster than SDPA at
# 50-77 tokens, 2.9x at 128 (causal), 1.3-1.9x at 197-256, 1.0-1.3x at 512.  In fp32 it
# measured 0.7-1.0x forward + backward at 50 tokens (0.97-1.4x forward only), so fp32 keeps
# SDPA.
MATMUL_MAX_SCORES = 256 * 256


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


def matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal)` (no dropout, default
    scale) as matmul, softmax, matmul.  attn_mask: bool, True = may attend.

    As SDPA: `is_causal` aligns the triangle top-left, and a query row that may attend to
    no key gets zeros.
    """
    if attn_mask is not None and is_causal:
        raise ValueError("pass attn_mask or is_causal, not both (see merge_masks)")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be bool, got {attn_mask.dtype}")
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if is_causal:  # top-left: query i sees keys 0..i, never nothing
        nq, nk = q.shape[-2], k.shape[-2]
        causal = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill_(~causal, float("-inf")).softmax(-1) @ v
    if attn_mask is None:
        return scores.softmax(-1) @ v
    probs = scores.masked_fill_(~attn_mask, float("-inf")).softmax(-1)
    empty = ~attn_mask.any(-1, keepdim=True)  # rows of -inf only: NaN after the softmax
    return probs.masked_fill(empty, 0.0) @ v  # not in place: softmax saved probs


def check_rows(rows: torch.Tensor, batch: int) -> None:
    """ValueError unless `rows` is (batch,) int64, one query row per sample."""
    if rows.shape != (batch,) or rows.dtype != torch.long:
        raise ValueError(
            f"rows must be (B,) = ({batch},) int64, got {tuple(rows.shape)} {rows.dtype}"
        )


def query_rows(
    q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, N, d) -> (B, H, 1, d): query row rows[b] of sample b, and the mask of those
    rows, (B, H or 1, 1, Nk) or None, with `is_causal` folded in (row r sees keys 0..r)."""
    b, h, n, d = q.shape
    check_rows(rows, b)
    q = q.gather(2, rows.view(b, 1, 1, 1).expand(b, h, 1, d))
    mask = None
    if attn_mask is not None:  # (Nq, Nk) or (B or 1, H or 1, Nq or 1, Nk)
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        m = m.expand(b, m.shape[1], n, m.shape[3])
        mask = m.gather(2, rows.view(b, 1, 1, 1).expand(b, m.shape[1], 1, m.shape[3]))
    if is_causal:
        keys = torch.arange(n, device=q.device)
        causal = (keys <= rows[:, None]).view(b, 1, 1, n)
        mask = causal if mask is None else mask & causal
    return q, mask


def _use_matmul(kernel: str, q: torch.Tensor, k: torch.Tensor) -> bool:
    if kernel != "auto":
        return kernel == "matmul"
    if q.device.type != "cpu":
        return False
    low = q.dtype in (torch.bfloat16, torch.float16)
    return low and q.shape[-2] * k.shape[-2] <= MATMUL_MAX_SCORES


def set_attention_kernel(module: nn.Module, kernel: str) -> int:
    """Set the kernel of every `Attention` inside `module`; returns how many were set."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    found = [m for m in module.modules() if isinstance(m, Attention)]
    for m in found:
        m.kernel = kernel
    return len(found)


class Attention(nn.Module):
    """x: (B, N, D) -> (B, N, D).  Optional qk-norm (per head, LayerNorm) and rotary positions.

    attn_mask: bool, True = may attend, (Nq, Nk) or (B or 1, H or 1, Nq, Nk); 3-D is refused.
    """

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
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
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
        self.kernel = "auto"  # see the module docstring and set_attention_kernel

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)

    def _context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, N, Dc) -> keys (k-normed) and values (B, H, N, d) of a cross-attention."""
        k, v = (self._heads(t) for t in self.kv(context).chunk(2, dim=-1))
        return self.k_norm(k), v

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: LayerKVCache | None = None,
        context_cache: ContextKVCache | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """rows (B,) int64: compute query row rows[b] of sample b only, (B, N, D) -> (B, 1, D)
        (self-attention without a kv cache; see the module docstring).
        kv_cache (self-attention): the keys and values of earlier positions; x holds the
        positions after them (their rope is for those positions), and the cache gets this
        call's keys and values.  context_cache (cross-attention): the context's keys and
        values, projected by the first call with this cache and reused after."""
        b, n, d = x.shape
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context sequence")
            if is_causal or rope is not None:
                # a causal triangle over the context (query i sees context keys <= i), and
                # rotary positions shared by queries and context, mean nothing here
                raise ValueError("is_causal and rope are for self-attention, not cross-attention")
            if kv_cache is not None:
                raise ValueError("a kv cache is for self-attention; cross-attention: context_cache")
            q = self.q_norm(self._heads(self.q(x)))
            if context_cache is None:
                k, v = self._context_kv(context)
            else:
                k, v = context_cache.keys_values(context, self._context_kv)
        else:
            if context is not None or context_cache is not None:
                raise ValueError("a context (or its cache) is for cross-attention (cross=True)")
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            if is_causal and q.shape[-2] < k.shape[-2]:
                # SDPA aligns is_causal top-left, but the cached keys come before these
                # queries: the triangle is bottom-right, and one query sees every key
                if q.shape[-2] > 1 and attn_mask is None:
                    attn_mask = torch.ones(
                        q.shape[-2], k.shape[-2], dtype=torch.bool, device=x.device
                    )
                is_causal = attn_mask is not None
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            # an additive float mask worked on one kernel only (SDPA in fp32, not causal)
            raise TypeError(f"attn_mask must be bool (True = may attend), got {attn_mask.dtype}")
        if attn_mask is not None and attn_mask.dim() == 3:
            # (B, N, N) would broadcast as (1, B, N, N): batch rows applied to heads, silently
            # wrong when B == H (nn.MultiheadAttention reads 3-D as (B * H, N, N) instead)
            raise ValueError(
                f"a 3-D attn_mask {tuple(attn_mask.shape)} is ambiguous; pass (Nq, Nk), or "
                "(B, 1, Nq, Nk) for one mask per sample (attn_mask[:, None])"
            )
        if rows is not None:
            if self.cross or kv_cache is not None:
                raise ValueError("rows is for a self-attention without a kv cache")
            q, attn_mask = query_rows(q, attn_mask, is_causal, rows)
            n, is_causal = 1, False
        attn_mask, is_causal = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], x.device)
        if _use_matmul(self.kernel, q, k):
            out = matmul_attention(q, k, v, attn_mask, is_causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
