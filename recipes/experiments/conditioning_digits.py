"""The conditioning experiment (issue 7): does conditioning on the augmentation keep colour?

Data: the demo's coloured digits at 16x16 (1,439 train / 358 test, 10 digits x 8 hues).
Views: crop + full-circle hue shift + brightness + grayscale, so plain SimCLR is pushed to be
blind to colour.  Every variant trains the same tiny ViT with SimCLR for the same steps;
then a frozen-feature logistic probe reads the digit and, separately, the colour of clean
held-out images, and the omega-usage diagnostic (mmssl.eval.sensitivity) reports how much
the loss rises when the descriptors (all, each group, the hue strength alone) are shuffled,
and the centred cosine of f(x) and f(t(x)) per augmentation type.

    nice -n 10 python recipes/experiments/conditioning_digits.py --out runs/conditioning \
        --seeds 0 1 2

writes `results.jsonl` (one row per run; the grid resumes from it), `table.md` (mean +- std
over seeds) and `results.png`.  Several processes started with the same --out share the grid
(each run is claimed first): the 3-seed grid of RESULTS_conditioning.md ran as one for its
first 4 runs, then two.  The evaluation is fixed in advance (probe C=1 on standardised
features, no tuning).

Settings, chosen before any result was seen (from step-time measurements only):
- Budget: 12 variants x 3 seeds in about 40 minutes on a shared 2-core CPU (load 5-11 from
  other jobs), so about 65 s per run, of which about 10 s is evaluation (estimates made
  before the run; measured: 135 s per run, 116 s of training, 46 minutes on two processes).
- One torch thread and one BLAS thread: on the loaded machine a 2-thread SimCLR step took
  4.5 s against 0.6 s with one thread, and a 2-thread sklearn probe 30 s against 0.4 s.
- 16x16 images with 4x4 patches (16 tokens, as the prototype's 16x16 input), mean pooling
  and no class token: the lead measured that a class-token ViT learns digit shape slowly on
  this data (supervised: ~40% after 50 steps with class-token pooling, ~63% at step 40
  with mean pooling).
- dim 48, depth 3, 3 heads, batch 128: about 0.3 s per conditioned step at load ~10, so
  200 steps (~60 s, ~18 epochs) fit the budget.  Smaller batches with more steps were
  preferred to batch 256 with 100 steps (same cost): more updates for the conditioning to
  be learnt.  The prototype ran 600 steps of batch 256 on a CNN; this is a third of its
  steps at half its batch, a known handicap stated up front.
- AdamW lr 1e-3, weight decay 0.05, 5% warmup then cosine; temperature 0.2; condition
  dim 32 (descriptor MLP hidden 64); hypernetwork rank K=32; projector 48 -> 256 -> 64.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import mmssl

sys.path.insert(0, str(Path(__file__).parent))
from common import check_args, check_batch_size, demo_digits, probe, run_grid  # noqa: E402

from mmssl.data.augment import AugmentConfig, make_views
from mmssl.eval.sensitivity import (
    centred_cosines,
    conditioned_simclr_loss,
    features,
    omega_usage,
    single_augmentations,
)
from mmssl.objectives import AugSelfHead, nt_xent_loss
from mmssl.schema import merge

DIM, DEPTH, NUM_HEADS = 48, 3, 3  # see the module docstring
COND = {"dim": 32, "hidden_dim": 64}
VARIANTS: dict[str, dict] = {
    "plain": {},
    "concat": {"projector": {"cond": "concat"}, "condition": COND},
    "film": {"projector": {"cond": "film"}, "condition": COND},
    "hyper": {"projector": {"cond": "hyper", "hyper_rank": 32}, "condition": COND},
    "adaln": {"vision": {"cond_dim": 32}, "condition": COND},
    "prefix": {"vision": {"cond_tokens": 1}, "condition": COND},
    "augself": {},
}
CONDITIONED = ["concat", "film", "hyper", "adaln", "prefix"]
ALL_VARIANTS = list(VARIANTS) + [f"{v}_shuffled" for v in CONDITIONED]
# Post-hoc ablation, added after the grid above had run (not part of it, not in the default
# list): omega with its color_diff group zeroed, in training and in the diagnostics.  It
# tests the explanation of RESULTS_conditioning.md (color_diff is an additive shortcut).
ABLATIONS = ["hyper_nocd", "concat_nocd"]
COLOR_DIFF = slice(5, 8)  # v1 layout: mmssl.descriptor.DESCRIPTOR_V1.group("color_diff")

SIZE = 16
BASE = {
    "vision": {
        "image_size": SIZE,
        "patch_size": 4,
        "dim": DIM,
        "depth": DEPTH,
        "num_heads": NUM_HEADS,
        "pool": "mean",
        "class_token": False,
    },
    "projector": {"hidden_dim": 256, "out_dim": 64},
}
VIEWS = AugmentConfig(
    scale=(0.25, 1.0),
    flip_p=0.5,
    jitter_p=0.8,
    brightness=0.4,
    contrast=0.0,
    saturation=0.0,
    hue=0.5,
    grayscale_p=0.2,
    blur_p=0.0,
)
# One augmentation type at a time, for the centred cosines: crop, brightness, hue, grayscale.
SINGLE = single_augmentations(VIEWS)
TEMPERATURE = 0.2


def _without_color_diff(aug: torch.Tensor) -> torch.Tensor:
    out = aug.clone()
    out[:, COLOR_DIFF] = 0.0  # the neutral value
    return out


def _one_type(images: list[torch.Tensor], cfg: AugmentConfig, k: int) -> Callable:
    """t(x) for the centred cosines: views of `images` (x is their clean version, in order)."""
    return lambda _x: make_views(images, 1, SIZE, cfg, np.random.default_rng([99, k]))[0][0]


def run(variant: str, seed: int, data: dict, steps: int, batch_size: int) -> dict:
    no_cd = variant.endswith("_nocd")
    base = variant.removesuffix("_shuffled").removesuffix("_nocd")
    shuffled = variant.endswith("_shuffled")
    t_run = time.perf_counter()
    torch.manual_seed(seed)
    model = mmssl.create_model("test_tiny_simclr", **merge(BASE, VARIANTS[base]))
    head = AugSelfHead(model.cfg.vision.dim, hidden=256) if base == "augself" else None
    params = list(model.parameters()) + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s / steps, 1)))
    )
    rng = np.random.default_rng(seed)
    train_images = list(data["train"]["images"])
    t0 = time.perf_counter()
    losses = []
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(train_images), batch_size, replace=False)
        views, augs = make_views([train_images[i] for i in idx], 2, SIZE, VIEWS, rng)
        if no_cd:
            augs = [_without_color_diff(a) for a in augs]
        if shuffled:  # the control: descriptors that do not belong to the view
            augs = [a[torch.from_numpy(rng.permutation(batch_size))] for a in augs]
        if head is None:
            loss = conditioned_simclr_loss(model, views, augs, TEMPERATURE)
        else:
            f1, f2 = (model.forward_features(v)["pooled"] for v in views)
            loss = nt_xent_loss(model.project(f1), model.project(f2), TEMPERATURE)
            loss = loss + head(f1, f2, augs[0], augs[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_time = time.perf_counter() - t0
    model.eval()
    clean = {s: data[s]["images"].float() / 255.0 for s in ("train", "test")}
    f_train, f_test = features(model, clean["train"]), features(model, clean["test"])
    row = {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "train_seconds": round(train_time, 1),
        "final_loss": float(np.mean(losses[-20:])),
        "digit_acc": probe(f_train, data["train"]["digit"], f_test, data["test"]["digit"]),
        "color_acc": probe(f_train, data["train"]["color"], f_test, data["test"]["color"]),
    }
    diag_rng = np.random.default_rng(1234)
    test_images = list(data["test"]["images"])
    batches = []
    for _ in range(3):
        idx = diag_rng.choice(len(test_images), min(256, len(test_images)), replace=False)
        views, augs = make_views([test_images[i] for i in idx], 2, SIZE, VIEWS, diag_rng)
        batches.append((views, [_without_color_diff(a) for a in augs] if no_cd else augs))
    if model.conditioner is not None:
        row.update(omega_usage(model, batches, TEMPERATURE, seed=seed))
    mean = f_train.mean(0)
    single = {name: _one_type(test_images, cfg, k) for k, (name, cfg) in enumerate(SINGLE.items())}
    row.update(
        {f"cos/{k}": v for k, v in centred_cosines(model, clean["test"], single, mean).items()}
    )
    row["run_seconds"] = round(time.perf_counter() - t_run, 1)
    return row


def summarise(rows: list[dict], out: Path) -> str:
    cols = [
        "color_acc",
        "digit_acc",
        "rise/all",
        "rise/hue",
        "rise/color",
        "rise/color_diff",
        "rise/crop",
        "cos/hue",
        "cos/crop",
        "final_loss",
        "run_seconds",
    ]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant in ALL_VARIANTS + ABLATIONS:
        sel = [r for r in rows if r["variant"] == variant]
        if not sel:
            continue
        cells = []
        for c in cols:
            vals = [r[c] for r in sel if c in r]
            cells.append(f"{np.mean(vals):.2f} ± {np.std(vals):.2f}" if vals else "n/a")
        lines.append(f"| {variant} (n={len(sel)}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in ALL_VARIANTS + ABLATIONS if any(r["variant"] == v for r in rows)]

    def stat(metric: str, v: str) -> tuple[float, float]:
        vals = [r[metric] for r in rows if r["variant"] == v and metric in r]
        return (float(np.mean(vals)), float(np.std(vals))) if vals else (np.nan, 0.0)

    panels = [
        ("accuracy (%)", [("color_acc", "colour probe"), ("digit_acc", "digit probe")], (0, 100)),
        (
            "loss rise",
            [("rise/all", "all of omega"), ("rise/color_diff", "color_diff"), ("rise/hue", "hue")],
            None,
        ),
        ("centred cosine", [("cos/hue", "f(x) vs f(hue(x))"), ("cos/crop", "crop")], (-0.1, 1)),
    ]
    fig, axes = plt.subplots(3, 1, figsize=(max(7, len(names) * 0.8), 8), sharex=True)
    x = np.arange(len(names))
    for ax, (ylabel, metrics, ylim) in zip(axes, panels):
        width = 0.8 / len(metrics)
        for i, (metric, label) in enumerate(metrics):
            means, stds = zip(*(stat(metric, v) for v in names))
            offset = (i - (len(metrics) - 1) / 2) * width
            ax.bar(x + offset, means, width, yerr=stds, label=label)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, names, rotation=45, ha="right")
    axes[0].set_title("Conditioned SimCLR on coloured digits: probes and omega-usage diagnostics")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/conditioning")
    parser.add_argument("--data", default=None, help="demo-data dir (written if missing)")
    parser.add_argument("--variants", nargs="*", default=ALL_VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: best on a shared, loaded CPU)"
    )
    args = parser.parse_args(argv)
    check_args(parser, args, ALL_VARIANTS + ABLATIONS)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # sklearn's BLAS threads fight the other jobs as well
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = demo_digits(Path(args.data) if args.data else out / "demo-data", size=SIZE)
    check_batch_size(parser, args.batch_size, len(data["train"]["images"]))
    rows = run_grid(
        out,
        args.variants,
        args.seeds,
        args.steps,
        lambda variant, seed: run(variant, seed, data, args.steps, args.batch_size),
        {
            "batch_size": args.batch_size,
            "data": str(Path(args.data).resolve()) if args.data else None,
        },
    )
    print(summarise(rows, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
