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

from typing import Any

import torch
from torch import nn


class CarriesBuffer(nn.Module):
    """A module with one carried buffer, named by `CARRIED`, checked by `carried_problem`."""

    CARRIED = ""

    def carried_problem(self, saved: torch.Tensor) -> str | None:
        """None if this module can take `saved`, "" if it reads no such buffer (an unexpected
        key), else why the tensor does not fit (a load error)."""
        raise NotImplementedError

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        value = getattr(self, self.CARRIED)
        if value is not None:
            destination[prefix + self.CARRIED] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + self.CARRIED
        saved = state_dict.pop(key, None)  # load_state_dict's own copy of the caller's dict
        if saved is not None:
            why = self.carried_problem(saved)
            if why == "":
                unexpected_keys.append(key)
            elif why is not None:
                error_msgs.append(f"{key}: {why}")
            else:
                setattr(self, self.CARRIED, _adopted(self, saved, local_metadata))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _adopted(module: nn.Module, saved: torch.Tensor, local_metadata: Any) -> torch.Tensor:
    """`saved` as the module keeps it: its device, a float in its dtype; as saved with
    assign=True."""
    if local_metadata.get("assign_to_params_buffers", False):
        return saved.detach()
    ref = next(module.parameters(), None)
    device = ref.device if ref is not None else saved.device
    dtype = ref.dtype if saved.is_floating_point() and ref is not None else saved.dtype
    return saved.detach().to(device=device, dtype=dtype, copy=True)
