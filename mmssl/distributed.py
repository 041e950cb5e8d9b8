"""Every torch.distributed call in mmssl lives here.

Each function behaves as a single process (rank 0 of 1) when no process group is
initialised, so losses and tasks are written once and run the same on a laptop and on a
cluster.

Gradient convention: data parallelism (DDP, DeepSpeed) *averages* parameter gradients over
ranks. The autograd functions here therefore all-reduce (sum) the incoming gradients in
backward, so that on every rank the gradient of a local input is ``world_size * dL/dx_local``
of the global loss L, and the rank-average of parameter gradients equals the single-process
gradient exactly. Returning only the local slice of the gradient without the sum (lightly's
old GatherLayer) silently drops every other rank's contribution.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# ----------------------------------------------------------------------------- process info


def is_initialized() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def destroy() -> None:
    """Tear the default process group down, if there is one: a launched rank does it itself
    before the interpreter's own teardown (PyTorch asks for this; a rank that now and then
    aborted at exit with "terminate called without an active exception" did not)."""
    if is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank on this node, from the LOCAL_RANK environment variable set by launchers (default 0)."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer, got {value!r}") from None


def barrier() -> None:
    """Wait for every rank; a no-op for one process."""
    if is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- gathers


_equal_batches = False


@contextlib.contextmanager
def equal_batches() -> Iterator[None]:
    """Within this block every rank's gathered tensors have the same dim-0 size.

    The gathers then skip exchanging sizes, a collective plus a device-to-host copy (a
    host sync on GPU) per gather.  The training loop holds it: every rank's micro-batch has
    `train.micro_batch_size` rows.  Unequal sizes inside the block give wrong offsets."""
    global _equal_batches
    before, _equal_batches = _equal_batches, True
    try:
        yield
    finally:
        _equal_batches = before


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    if _equal_batches:
        return [n] * world_size()
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_cat(x: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate every rank's `x` along dim 0; ranks may hold different dim-0 sizes."""
    x = x.contiguous()
    sizes = _gather_sizes(x.shape[0], x.device)
    max_n = max(sizes)
    if x.shape[0] < max_n:
        # all_gather needs equal shapes: pad, gather, then strip the padding
        pad = x.new_zeros((max_n - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out, sizes = _all_gather_cat(x)
        ctx.offset = sum(sizes[: rank()])
        ctx.n = x.shape[0]
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # every rank's loss may depend on this rank's rows: sum all of them, keep our slice
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (B_r, ...) of every rank into (sum_r B_r, ...), differentiably.

    Backward all-reduces (sums) the gradient of the gathered tensor and returns this rank's
    rows. Trailing dims must match across ranks; dim 0 may differ. Identity for one process.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (B_r, ...) of every rank along dim 0, detached from autograd."""
    if world_size() == 1:
        return x.detach()
    with torch.no_grad():
        return _all_gather_cat(x.detach())[0]


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's value of the integer `n` (e.g. its local batch size), in rank order."""
    if world_size() == 1:
        return [n]
    return _gather_sizes(n, torch.device(device))


# ----------------------------------------------------------------------------- reductions


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks, as a new tensor (the input is left untouched); no gradient."""
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of `x` over ranks, as a new tensor; no gradient."""
    return all_reduce_sum(x) / world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order. Only for trusted, in-job objects."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------- neighbours


def _exchange(x: Tensor, to_rank: int, from_rank: int) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, to_rank),
        dist.P2POp(dist.irecv, out, from_rank),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, to_rank: int, from_rank: int) -> Tensor:
        ctx.to_rank, ctx.from_rank = to_rank, from_rank
        return _exchange(x, to_rank, from_rank)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # the gradient of what we received belongs to the sender: send it back the other way
        return _exchange(grad, ctx.from_rank, ctx.to_rank), None, None


def neighbour_exchange_with_grad(x: Tensor, to_rank: int, from_rank: int) -> Tensor:
    """Send `x` to `to_rank`, return the same-shaped tensor received from `from_rank`.

    Differentiable: backward sends the received tensor's gradient back to `from_rank` and
    receives the gradient of `x` from `to_rank`. Every rank must call it with the same shape.
    """
    if world_size() == 1:
        return x
    return _NeighbourExchange.apply(x, to_rank, from_rank)


def send_right_recv_left(x: Tensor) -> Tensor:
    """Ring step: send `x` to rank+1, return the tensor of rank-1 (with gradient)."""
    w, r = world_size(), rank()
    return neighbour_exchange_with_grad(x, (r + 1) % w, (r - 1) % w)
