"""Buffers a module carries in its state dict only while they are set: the condition that
cond=None stands for (`VisionEncoder.cond_default`, `MultimodalModel.cond_prompt`).

Such a buffer is None in a model built from its config and set later (by `load_encoder`, or
from an export's config.json), so it is registered non-persistent and written by hand.  A
state dict that holds it sets it on load, even on a module that has none; one without it
leaves the module's as it is (a whole model's, or one saved before these were kept).  A
module that cannot read it reports it as an unexpected key, a wrong shape or dtype is a load
error, and a float tensor takes the module's dtype and device, as `load_state_dict` casts
into an existing buffer (with `assign=True` the saved tensor itself is taken).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def save_carried(
    module: nn.Module, name: str, destination: Any, prefix: str, keep_vars: bool
) -> None:
    """Write buffer `name` of `module` into `destination` (a state dict) when it is set."""
    value = getattr(module, name)
    if value is not None:
        destination[prefix + name] = value if keep_vars else value.detach()


def load_carried(
    module: nn.Module,
    name: str,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    unexpected_keys: list[str],
    error_msgs: list[str],
    problem: Callable[[torch.Tensor], str | None],
) -> None:
    """Take buffer `name` out of `state_dict` (load_state_dict's own copy) and set it.

    problem(saved): None if the module can take it, "" if it reads no such buffer (an
    unexpected key), else why the tensor does not fit (a load error)."""
    key = prefix + name
    saved = state_dict.pop(key, None)
    if saved is None:
        return
    why = problem(saved)
    if why == "":
        unexpected_keys.append(key)
        return
    if why is not None:
        error_msgs.append(f"{key}: {why}")
        return
    if local_metadata.get("assign_to_params_buffers", False):
        setattr(module, name, saved.detach())
        return
    ref = next(module.parameters(), None)
    device = ref.device if ref is not None else saved.device
    dtype = ref.dtype if saved.is_floating_point() and ref is not None else saved.dtype
    setattr(module, name, saved.detach().to(device=device, dtype=dtype, copy=True))
