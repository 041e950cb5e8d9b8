"""Does a conditioned encoder use its condition?  `mmssl eval sensitivity` and its parts.

- **Loss rise under shuffling** (`omega_usage`): the SimCLR loss on fixed augmented batches,
  with the true descriptors, then with all of omega shuffled across the batch, then with one
  descriptor group (crop, color, color_diff, blur, grayscale) shuffled at a time, and the
  hue strength alone (`PARTS`).  A mechanism that ignores omega shows no rise; one that uses it to undo an augmentation gets
  worse when the descriptor no longer matches the view.
- **Centred cosine** (`centred_cosines`) between f(x) and f(t(x)) for one augmentation type
  at a time, x being the view with every augmentation off (rendered as t(x) is).  Features
  are centred by the training mean first: post-activation features share a large common
  component, so raw cosines are near 1 for any pair and say little about invariance.

The CLI reads images from shards (labels are not needed).  Views follow `--augment`
overrides of `AugmentConfig`; when `--model` is a training run directory, its recipe's
`data.augment` and SimCLR temperature are the defaults, so the batches look like training;
otherwise a note on stderr names the built-in defaults used.
Batch i holds images [i*B, (i+1)*B) and its two views are drawn from
`numpy.random.default_rng([seed, i])`; the shuffles from `torch.Generator` seeded `seed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmssl.descriptor import get_layout
from mmssl.models.condition import DescriptorEncoder
from mmssl.models.multimodal import MultimodalModel
from mmssl.objectives import nt_xent_loss


def ssl_embedding(model: MultimodalModel, pooled: Tensor, cond: Tensor | None) -> Tensor:
    """What SimCLR compares, as in training without a task-owned head: the model's
    (conditioned) projector, else its image projection, else the pooled features."""
    if model.projector is not None:
        return model.project(pooled, cond)
    visual = model.visual
    assert visual is not None
    return visual.proj(pooled) if visual.proj is not None else pooled


def conditioned_simclr_loss(
    model: MultimodalModel,
    views: list[Tensor],
    augs: list[Tensor],
    temperature: float,
) -> Tensor:
    """SimCLR loss with each view conditioned on its own descriptor (both branches).

    views: two (B, 3, H, W); augs: two (B, 13), on any device; the loss is on the model's.
    Unconditioned models ignore augs.
    """
    from mmssl.eval.loading import model_device

    dev = model_device(model)
    z = []
    for view, aug in zip(views, augs):
        c = model.condition(aug.to(dev))
        z.append(ssl_embedding(model, model.forward_pooled(view.to(dev), c), c))
    return nt_xent_loss(z[0], z[1], temperature)


# Single descriptor dims also shuffled alone: the hue strength is the one a circular hue shift
# needs undone, while the rest of the color group (and color_diff) may carry it partly.
PARTS = {"hue": ("color", 3)}


def _shuffled(aug: Tensor, sl: slice, generator: torch.Generator) -> Tensor:
    out = aug.clone()
    perm = torch.randperm(aug.shape[0], generator=generator)
    out[:, sl] = aug[perm][:, sl]
    return out


@torch.no_grad()
def omega_usage(
    model: MultimodalModel,
    batches: list[tuple[list[Tensor], list[Tensor]]],
    temperature: float,
    seed: int = 0,
    version: str = "v1",
) -> dict[str, float]:
    """Mean SimCLR loss on `batches` ((views, augs) pairs) and its rise when omega is shuffled.

    Returns {"loss", "rise/all", "rise/<group>" for every group of the layout, and
    "rise/<part>" for the single dims of `PARTS` (the hue strength alone)}.
    """
    layout = get_layout(version)
    g = torch.Generator().manual_seed(seed)
    slices = {"all": slice(0, layout.dim)} | {grp.name: grp.slice for grp in layout.groups}
    for part, (group, offset) in PARTS.items():
        if group in layout.names:
            start = layout.group(group).start + offset
            slices[part] = slice(start, start + 1)
    totals = dict.fromkeys(["loss", *(f"rise/{k}" for k in slices)], 0.0)
    for views, augs in batches:
        base = conditioned_simclr_loss(model, views, augs, temperature).item()
        totals["loss"] += base
        for name, sl in slices.items():
            shuffled = [_shuffled(a, sl, g) for a in augs]
            rise = conditioned_simclr_loss(model, views, shuffled, temperature).item() - base
            totals[f"rise/{name}"] += rise
    return {k: v / len(batches) for k, v in totals.items()}


@torch.no_grad()
def features(model: MultimodalModel, images: Tensor, batch_size: int = 512) -> Tensor:
    """Pooled features (N, D), on the CPU, for downstream use: those of the un-augmented
    images (the neutral descriptor's condition for a backbone-conditioned model, see
    MultimodalModel.forward_features)."""
    from mmssl.eval.loading import model_device

    dev = model_device(model)
    return torch.cat(
        [model.forward_pooled(c.to(dev)).float().cpu() for c in images.split(batch_size)]
    )


@torch.no_grad()
def centred_cosines(
    model: MultimodalModel,
    images: Tensor,
    transforms: dict[str, Callable[[Tensor], Tensor]],
    mean: Tensor,
) -> dict[str, float | None]:
    """Mean cosine of (f(x) - mean) and (f(t(x)) - mean) for each named transform t, over
    the images where both are defined: None when none is (a feature equal to the mean, as
    every feature of a collapsed encoder is; F.cosine_similarity called that 0, "sensitive").

    images: (N, 3, H, W) clean images; mean: (D,) training-mean feature.
    """
    raw = features(model, images)
    tol = 1e-4 * float(raw.norm(dim=-1).max())  # float error of a difference of such features
    ref = raw - mean
    out: dict[str, float | None] = {}
    for name, t in transforms.items():
        other = features(model, t(images)) - mean
        na, nb = ref.norm(dim=-1), other.norm(dim=-1)
        ok = (na > tol) & (nb > tol)
        cos = (ref * other).sum(-1)[ok] / (na[ok] * nb[ok])
        out[name] = cos.mean().item() if len(cos) else None
    return out


def identity_augmentation(cfg: Any) -> Any:
    """`cfg` (an AugmentConfig) with every augmentation off: the whole image (a centre square
    of a non-square one), unflipped, unjittered, in colour, sharp."""
    return dataclasses.replace(
        cfg,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )


def single_augmentations(cfg: Any) -> dict[str, Any]:
    """One AugmentConfig per augmentation type that `cfg` (an AugmentConfig) applies, with only
    that type on, always applied: crop (with cfg's flip), brightness, contrast, saturation,
    hue, grayscale, blur."""
    off = identity_augmentation(cfg)
    out: dict[str, Any] = {}
    # a config read from YAML or `--augment` holds the pair as a list, never equal to a tuple
    if tuple(cfg.scale) != (1.0, 1.0) or cfg.flip_p > 0:
        out["crop"] = dataclasses.replace(off, scale=cfg.scale, ratio=cfg.ratio, flip_p=cfg.flip_p)
    for name in ("brightness", "contrast", "saturation", "hue"):
        if cfg.jitter_p > 0 and getattr(cfg, name) > 0:
            out[name] = dataclasses.replace(off, jitter_p=1.0, **{name: getattr(cfg, name)})
    if cfg.grayscale_p > 0:
        out["grayscale"] = dataclasses.replace(off, grayscale_p=1.0)
    if cfg.blur_p > 0:
        out["blur"] = dataclasses.replace(off, blur_p=1.0)
    return out


def view_augmentations(configs: list[Any]) -> dict[str, Any]:
    """`single_augmentations` of every view's AugmentConfig: each type any view applies, named
    by its view ("hue (view 2)") where two views apply it at different strengths."""
    out: dict[str, Any] = {}
    for v, c in enumerate(configs):
        for name, one in single_augmentations(c).items():
            if out.get(name, one) != one:
                name = f"{name} (view {v + 1})"
            out.setdefault(name, one)
    return out


# ---------------------------------------------------------------------------- the CLI task

DEFAULT_TEMPERATURE = 0.1  # without --temperature or a run recipe's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sensitivity` task's options."""
    parser.add_argument("--data", required=True, help="image shards for the augmented batches")
    parser.add_argument(
        "--train",
        default=None,
        help="image shards for the training-mean feature (default: --data)",
    )
    parser.add_argument(
        "--augment",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="AugmentConfig override, repeatable (e.g. hue=0.5, scale=[0.25,1.0])",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"SimCLR temperature (default: the run recipe's, else {DEFAULT_TEMPERATURE})",
    )
    parser.add_argument("--batches", type=int, default=4, help="fixed augmented batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cosines-only",
        action="store_true",
        help="skip the omega-usage part (models without a descriptor conditioner)",
    )


def _recipe_path(model_path: str) -> Path:
    # "~/run" expanded as the model's own path is (loading.resolve_model_dir): without it the
    # model loaded but its recipe was not found, and the defaults were used without a word
    return Path(model_path).expanduser() / "recipe.yaml"


def _recipe_defaults(
    model_path: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], float | None]:
    """(data.augment, data.view_augment, SimCLR temperature) of a run directory's recipe;
    ({}, [], None) otherwise."""
    path = _recipe_path(model_path)
    if not path.is_file():
        return {}, [], None
    from mmssl.eval.loading import EvalError
    from mmssl.schema import ConfigError
    from mmssl.train.recipe import read_yaml

    try:
        data = read_yaml(path)
    except ConfigError as err:
        raise EvalError(str(err)) from None
    augment = dict((data.get("data") or {}).get("augment") or {})
    per_view = [dict(v or {}) for v in (data.get("data") or {}).get("view_augment") or []]
    for key, obj in (data.get("objectives") or {}).items():
        obj = obj or {}
        if (obj.get("type") or key) == "simclr" and "temperature" in obj:
            return augment, per_view, float(obj["temperature"])
    return augment, per_view, None


def augment_config(overrides: dict[str, Any], items: list[str]) -> Any:
    """AugmentConfig from recipe overrides plus `KEY=VALUE` strings; EvalError naming the key."""
    import yaml

    from mmssl.data.augment import AugmentConfig
    from mmssl.eval.loading import EvalError
    from mmssl.schema import ConfigError, from_dict

    merged = dict(overrides)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalError(f"--augment expects KEY=VALUE, got {item!r}")
        merged[key.strip()] = yaml.safe_load(value)
    try:
        return from_dict(AugmentConfig, merged, "augment")
    except ConfigError as err:
        raise EvalError(str(err)) from None


def _value(v: Any) -> str:
    """An AugmentConfig value as `--augment` reads it (YAML: a pair as a list)."""
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(map(_value, v)) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def defaults_note(args: argparse.Namespace, omega: bool) -> str | None:
    """Which built-in defaults stand in for a run's when --model has no recipe.yaml (an
    exported model: `mmssl export` writes none beside it) and the options do not set them;
    None otherwise.  `omega`: the omega-usage part runs (the temperature is used)."""
    from mmssl.data.augment import AugmentConfig

    if _recipe_path(args.model).is_file():
        return None
    used, options = [], []
    if omega and args.temperature is None:
        used.append(f"temperature {DEFAULT_TEMPERATURE}")
        options.append("--temperature")
    if not args.augment:
        # written as --augment takes them, to be copied and changed
        cfg = dataclasses.asdict(AugmentConfig())
        used.append("augment " + ", ".join(f"{k}={_value(v)}" for k, v in cfg.items()))
        options.append("--augment")
    if not used:
        return None
    return (
        f"{args.model} is no run directory (no recipe.yaml), so the defaults are used, not "
        f"the run's: {'; '.join(used)}; set them with {' / '.join(options)}, or pass the run "
        "directory as --model"
    )


def read_images(pattern: str, limit: int | None, max_pixels: int) -> list[Tensor]:
    """uint8 (3, H, W) images of the shards in order (`max_pixels`: the decoder's limit);
    DataError when there are none."""
    from mmssl.data.decode import BadSample, decode_image, find_image
    from mmssl.data.errors import DataError
    from mmssl.eval.data import iter_raw, shard_urls

    images: list[Tensor] = []
    first_without = None
    for index, key, files in iter_raw(shard_urls(pattern)):
        if limit is not None and index >= limit:
            break
        try:
            images.append(decode_image(find_image(files), max_pixels))
        except BadSample as bad:
            if bad.kind != "missing_image":
                raise DataError(f"sample {key!r} of {pattern}: {bad.kind} {bad.detail}") from None
            first_without = first_without or key
    if not images:
        raise DataError(
            f"shards {pattern} hold no images (sample {first_without!r} has none); "
            "sensitivity needs image shards"
        )
    return images


def _normalise(x: Tensor, pre: Any) -> Tensor:
    if pre.mean is None or pre.std is None:
        return x
    return (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)


def omega_problem(model: MultimodalModel) -> str | None:
    """Why the omega-usage diagnostic cannot run on `model`, or None."""
    if model.conditioner is None:
        return "the model has no conditioner (no `condition` section in its config)"
    if not isinstance(model.conditioner, DescriptorEncoder):
        return "the model is conditioned on text, not on augmentation descriptors"
    return None


def run(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """The `sensitivity` task: writes results.json, summary.md under args.out."""
    from mmssl.data.augment import make_views
    from mmssl.eval.loading import EvalError
    from mmssl.eval.report import md_table

    if args.batches < 1:
        raise EvalError(f"--batches must be >= 1, got {args.batches}")
    recipe_augment, per_view, recipe_temperature = _recipe_defaults(args.model)
    cfg = augment_config(recipe_augment, args.augment)
    # the run's two views as it trained them (BYOL-style view_augment: the quickstart's
    # second view alone shifts hue), each with the --augment overrides
    views = [augment_config({**recipe_augment, **v}, args.augment) for v in per_view]
    if views and len(views) != 2:
        raise EvalError(f"the run's data.view_augment has {len(views)} views; this task draws 2")
    temperature = args.temperature if args.temperature is not None else recipe_temperature
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if temperature <= 0:
        raise EvalError(f"--temperature must be > 0, got {temperature}")
    loaded = ctx.load()
    model, pre = loaded.model.eval(), loaded.preprocess
    images = read_images(args.data, args.limit, pre.max_pixels)
    train_images = read_images(args.train, args.limit, pre.max_pixels) if args.train else images
    size = pre.image_size

    def views_of(imgs: list[Tensor], c: Any, rng: np.random.Generator, n: int) -> Any:
        v, a = make_views(imgs, n, size, c, rng)
        return [_normalise(x, pre) for x in v], a

    problem = None if args.cosines_only else omega_problem(model)
    # an export's config.json keeps the preprocessing but no recipe: say so, rather than
    # measure with augmentations (and a temperature) that may not be the run's in silence
    note = defaults_note(args, omega=not args.cosines_only and problem is None)
    if note:
        print(f"mmssl eval: note: {note}", file=sys.stderr)
    omega = None
    batches: list[Any] = []
    if not args.cosines_only and problem is None:
        for i in range(min(args.batches, max(1, len(images) // args.batch_size))):
            chunk = images[i * args.batch_size : (i + 1) * args.batch_size]
            batches.append(views_of(chunk, views or cfg, np.random.default_rng([args.seed, i]), 2))
        if len(batches[0][0][0]) < 2:
            raise EvalError("the omega-usage diagnostic needs at least 2 images per batch")
        omega = omega_usage(model, batches, temperature, seed=args.seed)
    if len(train_images) < 2:  # one image's feature is the mean: every cosine undefined
        raise EvalError("the centred cosines need at least 2 images for the training mean")
    # x is the view with every augmentation off, not pre(images): that resizes then crops, a
    # view crops then resizes, so for a non-square image every t(x) also differed from x by
    # resampling (0.02-0.04 per pixel), read as sensitivity.  The training mean likewise.
    off = identity_augmentation(cfg)  # the same view whatever the rng draws
    clean = views_of(images, off, np.random.default_rng(0), 1)[0][0]
    mean = features(model, views_of(train_images, off, np.random.default_rng(0), 1)[0][0]).mean(0)

    def single(c: Any, k: int) -> Callable[[Tensor], Tensor]:
        # t(x) is rendered from the decoded images (x is their all-off view, in order)
        return lambda _x: views_of(images, c, np.random.default_rng([args.seed, 100 + k]), 1)[0][0]

    singles = view_augmentations(views or [cfg])
    transforms = {name: single(c, k) for k, (name, c) in enumerate(singles.items())}
    cosines = centred_cosines(model, clean, transforms, mean)
    res = {
        "omega_usage": omega,
        "omega_error": problem,
        "centred_cosine": cosines,
        "temperature": temperature,
        "augment": dataclasses.asdict(cfg),
        "view_augment": [dataclasses.asdict(c) for c in views],
        "num_images": len(images),
        "num_train_images": len(train_images),
        "batches": len(batches),
        "batch_size": len(batches[0][0][0]) if batches else 0,
        "seed": args.seed,
    }
    parts = []
    if omega is not None:
        rows = [[k.removeprefix("rise/"), v] for k, v in omega.items() if k.startswith("rise/")]
        parts.append(
            f"SimCLR loss on {res['batches']} fixed augmented batch(es) of {res['batch_size']}: "
            f"**{omega['loss']:.4f}**; its rise when descriptors are shuffled across the batch:\n\n"
            + md_table(["shuffled", "loss rise"], rows)
        )
    elif problem is not None:
        parts.append(f"Omega-usage diagnostic not run: {problem}.")
    parts.append(
        "Centred cosine of f(x) and f(t(x)) (features minus the mean over "
        f"{len(train_images)} {'--train' if args.train else '--data'} images), one augmentation "
        "type at a time:\n\n"
        + md_table(
            ["augmentation", "centred cosine"],
            [
                [k, "undefined (every feature equals the mean)" if v is None else v]
                for k, v in cosines.items()
            ],
        )
    )
    data = {"data": args.data, "train": args.train or args.data}
    ctx.report("sensitivity", res, data=data, summary="\n\n".join(parts))
    if problem is not None:
        raise EvalError(
            f"omega-usage diagnostic: {problem}; the centred cosines were written to "
            f"{Path(args.out) / 'results.json'} (pass --cosines-only to skip this part)"
        )
    return res
