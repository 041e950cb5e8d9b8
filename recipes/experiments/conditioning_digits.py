"""The conditioning experiment (issue 7): does conditioning on the augmentation keep colour?

Data: the demo's coloured digits (32x32, 8 hues).  Views: crop + full-circle hue shift +
brightness + grayscale, so plain SimCLR is pushed to be blind to colour.  Every variant
trains the same tiny ViT with SimCLR for the same steps; then a frozen-feature logistic
probe reads the digit and, separately, the colour of clean held-out images, and the
omega-usage diagnostic (mmssl.eval.sensitivity) reports how much the loss rises when the
descriptors are shuffled, and the centred cosine of f(x) and f(t(x)) per augmentation.

    python recipes/experiments/conditioning_digits.py --out runs/conditioning

writes `results.jsonl` (one row per run), `table.md` (mean +- std over seeds) and
`results.png`.  The evaluation is fixed in advance (probe C=1 on standardised features,
no tuning); the settings below were chosen before looking at results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mmssl

sys.path.insert(0, str(Path(__file__).parent))
from common import demo_digits, probe, run_grid  # noqa: E402

from mmssl.data.augment import AugmentConfig, make_views
from mmssl.eval.sensitivity import centred_cosines, conditioned_simclr_loss, features, omega_usage
from mmssl.objectives import AugSelfHead, nt_xent_loss
from mmssl.schema import merge

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

BASE = {
    "vision": {"image_size": 32, "patch_size": 8, "dim": 96, "depth": 4, "num_heads": 4},
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
# One augmentation type at a time, for the centred cosines.
SINGLE = {
    "crop": AugmentConfig(scale=(0.25, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
    "hue": AugmentConfig(
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=1.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.5,
        grayscale_p=0.0,
        blur_p=0.0,
    ),
    "brightness": AugmentConfig(
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=1.0,
        brightness=0.4,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
    ),
    "grayscale": AugmentConfig(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=1.0, blur_p=0.0
    ),
}
TEMPERATURE = 0.2


def run(variant: str, seed: int, data: dict, steps: int, batch_size: int) -> dict:
    base = variant.removesuffix("_shuffled")
    shuffled = variant.endswith("_shuffled")
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
        views, augs = make_views([train_images[i] for i in idx], 2, 32, VIEWS, rng)
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
        batches.append(make_views([test_images[i] for i in idx], 2, 32, VIEWS, diag_rng))
    if model.conditioner is not None:
        row.update(omega_usage(model, batches, TEMPERATURE, seed=seed))
    mean = f_train.mean(0)
    single = {}
    for name, cfg in SINGLE.items():
        r = np.random.default_rng(99)
        single[name] = (
            lambda c, rr: (
                lambda x: make_views(
                    [(im * 255).round().to(torch.uint8) for im in x], 1, 32, c, rr
                )[0][0]
            )
        )(cfg, r)
    row.update(
        {f"cos/{k}": v for k, v in centred_cosines(model, clean["test"], single, mean).items()}
    )
    return row


def summarise(rows: list[dict], out: Path) -> str:
    cols = ["color_acc", "digit_acc", "rise/all", "rise/color", "cos/hue", "train_seconds"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant in ALL_VARIANTS:
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

    names = [v for v in ALL_VARIANTS if any(r["variant"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    x = np.arange(len(names))
    for i, (metric, label) in enumerate(
        [("color_acc", "colour probe"), ("digit_acc", "digit probe")]
    ):
        means = [np.mean([r[metric] for r in rows if r["variant"] == v]) for v in names]
        stds = [np.std([r[metric] for r in rows if r["variant"] == v]) for v in names]
        ax.bar(x + (i - 0.5) * 0.4, means, 0.4, yerr=stds, label=label)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("Frozen-feature probes after conditioned SimCLR (coloured digits)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/conditioning")
    parser.add_argument("--data", default=None, help="demo-data dir (written if missing)")
    parser.add_argument("--variants", nargs="*", default=ALL_VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = demo_digits(Path(args.data) if args.data else out / "demo-data")
    rows = run_grid(
        out,
        args.variants,
        args.seeds,
        args.steps,
        lambda variant, seed: run(variant, seed, data, args.steps, args.batch_size),
    )
    print(summarise(rows, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
