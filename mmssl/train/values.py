"""Range checks of a recipe's values that its schema cannot express.

`mmssl.schema.from_dict` checks keys and types; `recipe.validate` checks what spans several
sections.  Here: every number finite and within 64 bits (YAML reads `1e400` as inf and has
no integer limit; torch and numpy seeds overflow), and the sizes, seeds and strengths that
no other check covers, so that a bad value is one line naming its dotted key before
anything is built or written.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mmssl.schema import ConfigError

if TYPE_CHECKING:
    from mmssl.train.recipe import Recipe


def check_values(recipe: Recipe) -> None:
    """Every number finite and within 64 bits, and the sizes, seeds and strengths that the
    other checks do not cover in range; a ConfigError names the dotted key."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{where} must be a finite number, got {node}")
        elif isinstance(node, int) and not isinstance(node, bool) and not -(2**63) <= node < 2**63:
            raise ConfigError(f"{where} must fit in 64 bits, got {node}")

    walk(recipe.to_dict(), "")
    d, o, t, ev = recipe.data, recipe.optim, recipe.train, recipe.eval
    checks: list[tuple[str, bool, str, Any]] = [
        ("data.image_size", d.image_size is None or d.image_size > 0, "> 0", d.image_size),
        (
            "data.context_length",
            d.context_length is None or d.context_length > 1,
            "> 1",
            d.context_length,
        ),
        ("data.seed", d.seed >= 0, ">= 0", d.seed),
        ("train.seed", t.seed >= 0, ">= 0", t.seed),
        ("train.grad_clip", t.grad_clip is None or t.grad_clip >= 0, ">= 0", t.grad_clip),
        ("optim.lr", o.lr >= 0, ">= 0", o.lr),
        ("optim.weight_decay", o.weight_decay >= 0, ">= 0", o.weight_decay),
        ("optim.eps", o.eps > 0, "> 0", o.eps),
        ("optim.betas", all(0 <= b < 1 for b in o.betas), "in [0, 1)", o.betas),
        (
            "optim.layer_decay",
            o.layer_decay is None or 0 < o.layer_decay <= 1,
            "in (0, 1]",
            o.layer_decay,
        ),
        ("eval.every", ev.every >= 0, ">= 0", ev.every),
        ("eval.batches", ev.batches >= 1, ">= 1", ev.batches),
    ]
    for name, src in d.sources.items():
        where = f"data.sources.{name}"
        checks += [
            (f"{where}.shuffle", src.shuffle >= 1, ">= 1", src.shuffle),
            (
                f"{where}.context_length",
                src.context_length is None or src.context_length > 1,
                "> 1",
                src.context_length,
            ),
        ]
    for key, obj in recipe.objectives.items():
        where = f"objectives.{key}"
        checks += [
            (f"{where}.max_logit_scale", obj.max_logit_scale > 0, "> 0", obj.max_logit_scale),
            (
                f"{where}.label_smoothing",
                0 <= obj.label_smoothing < 1,
                "in [0, 1)",
                obj.label_smoothing,
            ),
            (f"{where}.hidden", obj.hidden >= 1, ">= 1", obj.hidden),
            (
                f"{where}.projector_dim",
                obj.projector_dim is None or obj.projector_dim >= 1,
                ">= 1",
                obj.projector_dim,
            ),
            (f"{where}.window", obj.window >= 1, ">= 1", obj.window),
            (
                f"{where}.displacement",
                obj.displacement is None or obj.displacement >= 0,
                ">= 0",
                obj.displacement,
            ),
        ]
    for key, ok, what, value in checks:
        if not ok:
            raise ConfigError(f"{key} must be {what}, got {value}")
    # the pipeline's own checks, here under the recipe's keys: the normalisation (both
    # halves, std > 0), and data.augment on its own (AugmentConfig range-checks every field,
    # pairs included), so that a bad value there is not reported under a data.view_augment
    # entry it is merged into later
    from mmssl.data.args import check_norm
    from mmssl.data.augment import AugmentConfig
    from mmssl.data.errors import DataError
    from mmssl.schema import from_dict

    try:
        check_norm(d.mean, d.std, "data.")
    except DataError as err:
        raise ConfigError(str(err)) from None
    from_dict(AugmentConfig, dict(d.augment), "data.augment")
