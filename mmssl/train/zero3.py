"""What DeepSpeed's ZeRO-3 and engine need of a `mmssl.train.tasks.Task`.

The towers' own forward methods (`forward_features`, `forward_tokens`) are called
directly, not through `nn.Module.__call__`, so ZeRO-3 would not gather the parameters
those modules own directly (class token, position tables, logit scale, the tied embedding
used by the LM head).  `register_zero3_params` makes the Task gather them for its forward.

DeepSpeed (0.19) mishandles 0-d parameters (its broadcast views them as bytes, its clipping
makes them (1,)): the Task stores each (logit scale, SigLIP bias) as (1,)
(`promote_scalar_params`), export as 0-d.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from mmssl.train.tasks import Task


def promote_scalar_params(module: nn.Module) -> None:
    """Replace every 0-d parameter of `module` by a (1,)-shaped one holding the same value."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.dim() == 0:
                sub._parameters[name] = nn.Parameter(p.detach().reshape(1), p.requires_grad)


def zero3_external_params(task: Task) -> list[Tensor]:
    """Parameters used outside their owning module's `__call__`: the direct parameters of the
    model, its towers and caption decoder, and the LM head's weight (the tied embedding, or
    `lm_head`'s, which the fused next-token loss reads directly)."""
    model = task.model
    owners = [model, model.visual, model.text, model.caption]
    params: list[Tensor] = [p for m in owners if m is not None for p in m.parameters(recurse=False)]
    if model.text is not None and model.text.cfg.lm_head:
        params.append(model.text.head_weight())
    return params


def register_zero3_params(task: Task) -> None:
    """Have ZeRO-3 gather `zero3_external_params` for the whole of `task.forward`."""
    from deepspeed.runtime.zero import register_external_parameter

    for p in zero3_external_params(task):
        register_external_parameter(task, p)
