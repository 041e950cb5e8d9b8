"""`torch.compile` of the Blocks, optional and with a fallback to eager.

Only the Blocks are compiled: they hold nearly all the FLOPs, they are identical within a
stack (one compiled graph serves every block of the same shapes), and the code around
them (patch embedding, pooling, heads, losses) keeps its data-dependent Python.  A block
whose compilation fails (no C++ compiler, an unsupported op) warns once and the whole
stack runs eagerly from then on, so a recipe with `compile: true` still trains on any machine.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._functorch.config as functorch_config
from torch import nn

from mmssl.nn.block import Block


class _Fallback:
    """The eager-fallback state shared by the Blocks of one `compile_blocks` call: the first
    compilation error switches them all to eager, so a model warns once and does not pay
    for a failing compilation in every block."""

    def __init__(self) -> None:
        self.reason: str | None = None


class CompiledForward:
    """A Block's forward through torch.compile, falling back to the eager forward on a
    compilation error.  Stored as the block's `forward` attribute; `eager` is the original."""

    def __init__(self, block: Block, fallback: _Fallback | None = None, **options: Any):
        self.eager: Callable[..., torch.Tensor] = block.forward
        self.options = options
        self.compiled = torch.compile(self.eager, **options)
        self.fallback = fallback or _Fallback()

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledForward:
        # The compiled function wraps this block's bound forward and deepcopy keeps functions
        # as they are: a copied model (a fine-tuning copy, an EMA teacher) would run the
        # original's weights.  The copy's block gets a compiled forward of its own; the
        # fallback state is copied once per model through `memo`, so its blocks still share it.
        eager = self.eager
        if not isinstance(eager, types.MethodType):
            raise TypeError(f"CompiledForward.eager must be a bound forward, got {eager!r}")
        block = copy.deepcopy(eager.__self__, memo)
        new = CompiledForward.__new__(CompiledForward)
        new.eager = types.MethodType(eager.__func__, block)
        new.options = dict(self.options)
        new.compiled = torch.compile(new.eager, **new.options)
        new.fallback = copy.deepcopy(self.fallback, memo)
        return new

    @property
    def failed(self) -> str | None:
        """Why compilation failed (then every call runs eagerly), or None."""
        return self.fallback.reason

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # the one-row last block of a pooled-only call (`Transformer` rows) runs eagerly: a
        # graph of its own per variant doubled the graphs that all Blocks share under
        # dynamo's recompile limit (8 per code object), for ~1/4 of one block's work
        if self.fallback.reason is not None or kwargs.get("rows") is not None:
            return self.eager(*args, **kwargs)
        try:
            if not torch.is_grad_enabled():  # no backward to compile
                return self.compiled(*args, **kwargs)
            # the backward compiles with the forward, not lazily in loss.backward(), so that
            # a failure there falls back here too instead of stopping the step (set by hand:
            # config.patch() builds a class per call, ~50 us a block)
            lazy = functorch_config.force_non_lazy_backward_lowering
            functorch_config.force_non_lazy_backward_lowering = True
            try:
                return self.compiled(*args, **kwargs)
            finally:
                functorch_config.force_non_lazy_backward_lowering = lazy
        except Exception as err:  # noqa: BLE001 -- filtered by _is_compile_error
            if not _is_compile_error(err):
                raise
            # dynamo also wraps the model's own errors (a wrong shape): the eager call
            # re-raises those as they are, and only a call that works eagerly disables compile
            out = self.eager(*args, **kwargs)
            self.fallback.reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            warnings.warn(
                "torch.compile of the mmssl Blocks failed, running them eagerly "
                f"({self.fallback.reason})",
                RuntimeWarning,
                stacklevel=2,
            )
            return out


def _is_compile_error(err: Exception) -> bool:
    """Errors of dynamo or a backend, as opposed to errors of the model's own code."""
    import torch._dynamo.exc as dynamo_exc

    kinds: tuple[type[BaseException], ...] = (dynamo_exc.TorchDynamoException,)
    try:
        from torch._inductor.exc import InductorError

        kinds += (InductorError,)
    except ImportError:
        pass
    return isinstance(err, kinds)


def compile_blocks(
    module: nn.Module,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
) -> int:
    """Compile every Block inside `module` in place; returns how many were compiled.

    backend (a name or a dynamo backend callable), mode, dynamic: passed to `torch.compile`.
    Parameters, state_dict keys and outputs are unchanged; `uncompile_blocks` undoes it.
    The Blocks of one call share their fallback: one compilation error runs them all eagerly.
    """
    from torch._dynamo import list_backends

    known = set(list_backends(exclude_tags=())) | {"inductor"}
    if isinstance(backend, str) and backend not in known:
        raise ValueError(f"unknown torch.compile backend {backend!r}; one of {sorted(known)}")
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(module).__name__} contains no mmssl Block to compile")
    fallback = _Fallback()
    for block in blocks:
        if not isinstance(block.forward, CompiledForward):
            block.forward = CompiledForward(  # type: ignore[method-assign]
                block, fallback, backend=backend, mode=mode, dynamic=dynamic
            )
    return len(blocks)


def uncompile_blocks(module: nn.Module) -> int:
    """Restore the eager forward of every compiled Block in `module`; returns how many."""
    count = 0
    for block in module.modules():
        if isinstance(block, Block) and isinstance(block.forward, CompiledForward):
            del block.forward  # the instance attribute; the class method shows through again
            count += 1
    return count
