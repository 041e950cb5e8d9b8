"""The matrix-multiply floor of a training step: its GEMMs and its optimizer step alone.

`gemm_floor(step, optimizer)` runs `step` once, records every matmul it dispatches
(forward and backward: mm, addmm, bmm, baddbmm, convolution and SDPA's fused CPU kernel,
with their shapes, strides and dtypes as autocast hands them over) and returns a function
that replays those calls on views of the same layouts into storages of their own, one per
storage of the step, then the optimizer's step.  No eager path of the model can be faster than
that replay: it is the same kernels doing the same FLOPs with every layer norm, GELU,
softmax, copy and cast taken away.  Its time, as a fraction of the matmul peak, is
therefore the most a step can reach with these kernels, which is how the ViT bench tells
a target the code misses from one these kernels cannot reach at this shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FLOOR_PATH = "floor: the bf16 step's GEMMs + fused AdamW alone"  # the bench row's name

GEMMS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution.default,  # a ViT's patch embedding
    torch.ops.aten.convolution_backward.default,
    # attention through SDPA's fused CPU kernel (mmssl's bf16 `auto` above 256 x 256 pairs)
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


class Layout(NamedTuple):
    """A GEMM operand as the replay rebuilds it: its layout, and where in which storage the
    step's operand lived.  Operands of one storage (a weight and its transpose, q, k and v
    of one qkv buffer) become views of one replay storage; operands the step kept apart
    (each block's weights and activations) stay apart: the step's working set."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    storage: int  # the address of the step's storage
    offset: int  # elements into it

    @property
    def end(self) -> int:
        """One past the last element of the storage this layout reads."""
        return self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)


class _Recorder(TorchDispatchMode):
    """Keeps (op, arguments as layouts) of every GEMM dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, tuple, dict]] = []  # (op, layouts and scalars, kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in GEMMS:
            layout = tuple(
                Layout(
                    tuple(a.shape),
                    a.stride(),
                    a.dtype,
                    a.untyped_storage().data_ptr(),
                    a.storage_offset(),
                )
                if isinstance(a, torch.Tensor)
                else a
                for a in args
            )
            self.calls.append((func, layout, dict(kwargs)))
        return func(*args, **kwargs)


def record_gemms(step: Callable[[], object]) -> list[tuple[object, tuple, dict]]:
    """The GEMM calls of one run of `step` (forward and backward), in order."""
    recorder = _Recorder()
    with recorder:
        step()
    return recorder.calls


def gemm_floor(step: Callable[[], object], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A replay of `step`'s GEMMs followed by `optimizer.step()`.

    `step` runs once here (it should be a whole training step, so that the optimizer
    has gradients and state when the replay steps it).
    """
    calls = record_gemms(step)
    layouts = [a for _, args, _ in calls for a in args if isinstance(a, Layout)]
    sizes: dict[tuple[int, torch.dtype], int] = {}  # each storage as far as it is read
    for a in layouts:
        key = (a.storage, a.dtype)
        sizes[key] = max(sizes.get(key, 0), a.end)
    storages = {key: torch.randn(n).to(key[1]) for key, n in sizes.items()}
    replay = []
    for func, args, kwargs in calls:
        real = tuple(
            storages[a.storage, a.dtype].as_strided(a.shape, a.stride, a.offset)
            if isinstance(a, Layout)
            else a
            for a in args
        )
        replay.append((func, real, kwargs))

    def floor_step() -> None:
        for func, args, kwargs in replay:
            func(*args, **kwargs)
        optimizer.step()

    return floor_step
