"""`train.freeze`: parts of the model a run keeps as they start (not trained).

Each entry is a prefix of the model's parameter names, as its state dict and exports name
them: `visual` (the image tower), `text`, `visual.patch_embed`, `visual.trunk.blocks.0`, ...
A parameter is frozen when its name is the prefix or starts with the prefix and a dot.
Frozen parameters keep their initialisation, or train.init_from's weights: with `visual`
frozen and a pretrained image tower loaded, a CLIP run is LiT (locked-image tuning, open_clip's
`--lock-image`); `visual.patch_embed` frozen at its random initialisation is MoCo v3's
random patch projection (drawn at mmssl's init, std 0.02; MoCo v3 draws it xavier-uniform,
about 2.4x larger for ViT-S/16).  They get no gradient, no weight decay and no optimizer
state.  The conditioning parts (adaLN-Zero modulation and gates, prefix tokens' projection,
a conditioned projector's conditioning weights) under a prefix stay trained: frozen at their
start (zero, or a random draw for the prefix tokens) they would never act or only add noise,
and freezing a pretrained tower to train only its new conditioning is the point of adding
it; a prefix that names such a part itself (`...norm1.modulation`) freezes it.
Under `precision: bf16` DeepSpeed holds every module weight in bf16 and keeps fp32 masters of
the trained ones only, so a frozen tensor is held, and exported, rounded to bf16.

Checked at validation: every prefix names a parameter, and something is left to train; a
freeze that leaves nothing the objectives reach stops at the first step, with that reason
(`Task.forward`).
"""

from __future__ import annotations

import logging

from torch import nn

from mmssl import distributed
from mmssl.schema import ConfigError

_log = logging.getLogger("mmssl.train")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def conditioning_parts(model: nn.Module) -> list[str]:
    """The names of the conditioning parts of `model` (modules or a parameter) that a tower
    gains when conditioned: the adaLN-Zero modulation and gates and a conditioned projector's
    conditioning weights (each module's `reset_conditioning` zeroes them), and the prefix
    tokens (`PrefixTokens`, the whole module)."""
    from mmssl.models.condition import PrefixTokens, Projector
    from mmssl.nn.norm import ConditionedGate, ConditionedNorm

    kinds: dict[type, tuple[str, ...]] = {ConditionedNorm: ("modulation",)}
    kinds |= {ConditionedGate: ("gate",), Projector: ("cond_in", "film", "hyper_weight")}
    parts = []
    for where, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PrefixTokens):
            parts.append(where)
        attrs = next((a for k, a in kinds.items() if isinstance(module, k)), ())
        parts += [f"{where}.{a}" if where else a for a in attrs if getattr(module, a) is not None]
    return parts


def frozen_names(model: nn.Module, prefixes: list[str]) -> list[str]:
    """The parameter names of `model` under `prefixes`, a shared parameter by every name (a
    shared trunk is `visual.trunk` and `text.trunk`: either prefix freezes it), but for the
    zero-initialised conditioning under a prefix that does not name it; ConfigError for a
    prefix that names no parameter, or when nothing would train."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    unknown = [p for p in prefixes if not any(_under(n, p) for n in names)]
    if unknown:
        tops = sorted({n.split(".")[0] for n in names})
        raise ConfigError(
            f"train.freeze: {unknown} name no parameter of the model; parameter names start "
            f"with {tops} (e.g. {names[0]!r}), as in its exports"
        )
    # a conditioning part stays trained unless a prefix names it or lies inside it
    kept = [c for c in conditioning_parts(model) if not any(_under(p, c) for p in prefixes)]
    frozen = [
        n
        for n in names
        if any(_under(n, p) for p in prefixes) and not any(_under(n, c) for c in kept)
    ]
    params = dict(model.named_parameters(remove_duplicate=False))
    if {id(params[n]) for n in frozen} == {id(p) for p in params.values()}:
        raise ConfigError(
            f"train.freeze: {prefixes} freeze every parameter of the model: nothing of it would "
            "train (a head of the objectives' own is dropped at export)"
        )
    return frozen


def check_freeze(prefixes: list[str], cfg: object) -> None:
    """validate's check of train.freeze against the model config `cfg` (a meta model)."""
    if not prefixes:
        return
    import torch

    from mmssl.models.multimodal import MultimodalModel

    with torch.device("meta"):
        model = MultimodalModel(cfg)  # type: ignore[arg-type]
    frozen_names(model, prefixes)


def apply_freeze(model: nn.Module, prefixes: list[str]) -> None:
    """Stop training the parameters of `model` under `prefixes` (before the engine is built:
    DeepSpeed gives them no optimizer state)."""
    if not prefixes:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    names = frozen_names(model, prefixes)
    for name in names:
        params[name].requires_grad_(False)
    if distributed.rank() == 0:
        tensors = {id(params[n]): params[n] for n in names}  # a shared trunk once
        count = sum(p.numel() for p in tensors.values())
        _log.info(
            "train.freeze %s: %d tensors, %d parameters not trained", prefixes, len(tensors), count
        )
        under = [n for n in params if any(_under(n, p) for p in prefixes) and n not in names]
        if under:  # the zero-initialised conditioning under the prefixes
            _log.info(
                "train.freeze: %d conditioning tensors under %s trained (frozen at their start "
                "they would never act; name them to freeze them)",
                len(under),
                prefixes,
            )
