"""Linear head + cross-entropy in one op, without the fp32 (N, V) tensors of the plain path.

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` (the way an
LM step scores its logits under bf16 autocast), but:

- the logits stay one (N, V) tensor in the compute dtype (bf16 under autocast), made by
  one large matmul;
- the softmax runs over blocks of rows small enough to stay in cache (fp32), and each
  block's gradient (softmax - one-hot) overwrites its logits in place, during the forward;
- the backward is two large matmuls with that buffer: d hidden = G W, d weight = G^T H;
- the buffer's rows are padded to a multiple of 64 (`_padded_rows`): the matmuls are
  faster on aligned rows (the weight gradient's, 1.3x at GPT-2's vocabulary).

The plain path instead writes the fp32 logits, their fp32 log-softmax, a zero-filled fp32
gradient, its fp32 log-softmax backward and a bf16 copy: ~7 passes over N x V x 4 bytes,
which at GPT-2's vocabulary (50,257) cost as much as the transformer's matmuls on a CPU
(`bench/bench_gpt.py`).  Same idea as Liger-Kernel's fused linear cross-entropy.

The gradient is computed for the summed loss and scaled by the incoming gradient at the
end, so any later normalisation (token mean, global count) stays outside.  The forward
computes the gradient only when one is needed (grad mode on and an input requiring it).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_BLOCK_BYTES = 1 << 22  # fp32 bytes of one softmax block (4 MiB: about half an L2 per core)
_ROW_ALIGN = 64  # the (N, V) buffer's rows are padded to a multiple of this many elements


def check_label_smoothing(value: object) -> None:
    """A label smoothing is a number in [0, 1): F.cross_entropy takes a negative one without
    a word, and the fused path took anything (1.5 gave a loss)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not 0 <= float(value) < 1:  # type: ignore[arg-type]
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {value!r}")


def _padded_rows(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight in dtype, in a buffer of a multiple of _ROW_ALIGN rows (zeros after its own).

    The logits `h @ w.T` then have rows of that many elements: with GPT-2's 50,257 (odd)
    the weight-gradient matmul over them (d W = G^T H) took 1.3x as long as with 50,304
    (bf16, 2,048 x 384 hidden, AMD EPYC; a strided (N, 50,257) view of the padded buffer
    was as slow as the unpadded one).  As nanoGPT pads GPT-2's vocabulary, but inside the
    op: the model keeps its vocabulary.  The padding rows are zeros, so their logits are 0
    and never read; under autocast the weight is cast anyway, the cast writes the buffer.
    In fp32 the copy is extra, held for the forward only (the backward's d hidden = G W
    reads the weight itself: as fast with G's padded rows as without).
    """
    v = weight.shape[0]
    rows = -(-v // _ROW_ALIGN) * _ROW_ALIGN
    if rows == v:
        return weight.to(dtype)
    out = weight.new_empty((rows, weight.shape[1]), dtype=dtype)
    out[:v].copy_(weight)
    out[v:].zero_()
    return out


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype autocast would give F.linear here, else the hidden states' dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        label_smoothing: float,
        dtype: torch.dtype,
        need_grad: bool,
    ) -> Tensor:
        h, w = hidden.to(dtype), _padded_rows(weight, dtype)
        buf = h @ w.t()  # (N, V padded): its padding columns are 0, as is their gradient
        n, v = buf.shape[0], weight.shape[0]
        logits = buf[:, :v]  # becomes the gradient, block by block
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        acc = torch.promote_types(dtype, torch.float32)  # the softmax's dtype
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        rows = max(1, _BLOCK_BYTES // (4 * v))
        eps = float(label_smoothing)
        ignored = (~valid).nonzero()[:, 0]  # the one host sync: none per block
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            logp = F.log_softmax(logits[r0:r1].to(acc), dim=-1)  # (r, V), fp32 for bf16
            t, ok = safe[r0:r1, None], valid[r0:r1]
            loss = -logp.gather(1, t)[:, 0]
            if eps > 0:
                loss = (1 - eps) * loss - eps * logp.mean(dim=-1)
            total += torch.where(ok, loss, 0.0).sum(dtype=torch.float64)
            if need_grad:
                g = logp.exp_()  # softmax
                if eps > 0:
                    g.sub_(eps / v)
                g.scatter_add_(1, t, torch.full_like(t, eps - 1.0, dtype=g.dtype))
                logits[r0:r1].copy_(g)
        if need_grad and ignored.numel():
            # the ignored rows' gradient is 0: zeroed once here, as a masked_fill_ of every
            # block cost a pass over it (~5% of a GPT-2 step, where each row's last is ignored)
            logits.index_fill_(0, ignored, 0.0)
        if need_grad:
            # the weight as given where no cast was made (fp32): the padded copy is then
            # freed after the forward instead of held as a second weight
            ctx.save_for_backward(h, weight if weight.dtype == dtype else w[:v], buf)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            ctx.vocab = v
        return total.to(acc)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h, w, g = ctx.saved_tensors

        def scaled(grad: Tensor, dtype: torch.dtype) -> Tensor:
            # scale in at least fp32: grad_out rounded to bf16 (1/3 -> 0.33398) would bias
            # every element of the gradient by the same factor, up to 0.4%
            acc = torch.promote_types(dtype, torch.float32)
            return grad.to(acc).mul_(grad_out.to(acc)).to(dtype)

        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = scaled(g[:, : ctx.vocab] @ w, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = scaled((g.t() @ h)[: ctx.vocab], ctx.dtypes[1])
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T` against `targets`.

    hidden (N, D), weight (V, D), targets (N,) int64 (`ignore_index` rows count 0).  Returns
    a scalar in fp32 (fp64 for fp64 inputs); differentiable in hidden and weight.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} != ({hidden.shape[0]},)")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        # an integer hidden cast the weight to int64 and scored integer logits
        raise TypeError(
            f"hidden and weight must be floating point, got {hidden.dtype}, {weight.dtype}"
        )
    if targets.dtype not in (torch.int64, torch.int32):  # what gather takes as an index
        raise TypeError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    check_label_smoothing(label_smoothing)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        ignore_index,
        float(label_smoothing),
        _compute_dtype(hidden),
        need_grad,
    )
