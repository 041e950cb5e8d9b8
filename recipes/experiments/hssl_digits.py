"""The H-SSL experiment (issue 11): fiber positives versus augmented views, and the ablation.

Data: the demo's coloured digits (32x32).  Encoder: a tiny ViT with patch 4 (an 8x8 token
grid), rope, no class token, mean pooling and local attention (`attn_window` 1), so its
token grid is equivariant to whole-patch shifts away from the border.  Every variant trains
the same encoder and projection head with the same sampler of fiber positions, then a
logistic-regression probe (C=1, standardised features, not tuned) reads the digit from the
frozen pooled features of clean held-out images.

Variants:
- `hssl`: one forward pass per image; positives are two 4x4-patch windows (fibers) of its
  lifted token grid, at positions u1, u2 drawn independently and uniformly (5x5 choices);
  negatives are the fibers of the other images.
- `simclr`: the matching augmentation-based SimCLR.  Two forward passes per image, of the
  views T_g x (x moved by g = e - u whole patches, zero fill), each represented by its
  window at the fixed reference e = (2, 2).  By equivariance that window is the fiber at u
  of f(x), except where the window's receptive field meets the image border (the exact
  case, with the border out of reach, is a test in tests/test_hssl.py).
- `hssl_unstructured`: `hssl` with the structure removed: the 5x5 fibers are mixed by a
  fixed random orthogonal map before sampling, so the sampled pairs are no longer related
  by translations.
- `random_init`: the probe on the untrained encoder, for reference.

    python recipes/experiments/hssl_digits.py --out runs/hssl

writes `results.jsonl` (one row per run; reruns skip finished runs), `table.md` (mean +-
std over seeds) and `results.png`.  All settings were fixed before the first run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mmssl

sys.path.insert(0, str(Path(__file__).parent))
from common import check_args, check_batch_size, demo_digits, probe, run_grid  # noqa: E402

from mmssl.models.lifting import remove_structure, translate, translation_lift
from mmssl.objectives import nt_xent_loss
from mmssl.objectives.hssl import gather_fibers, sample_fiber_pairs

VARIANTS = ["hssl", "simclr", "hssl_unstructured", "random_init"]
VISION = {
    "image_size": 32,
    "patch_size": 4,
    "dim": 32,
    "depth": 3,
    "num_heads": 2,
    "attn_window": 1,
}
GRID, WINDOW = 8, 4  # fibers: (GRID - WINDOW + 1)^2 = 5x5 window positions
REFERENCE = torch.tensor([2, 2])  # e: the window a SimCLR view is read at
TEMPERATURE = 0.2


@torch.no_grad()
def features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled features (N, D) of float images (N, 3, H, W) in [0, 1]."""
    return torch.cat(
        [
            encoder.forward_features(images[i : i + batch_size])["pooled"]
            for i in range(0, len(images), batch_size)
        ]
    )


def step_loss(
    variant: str,
    encoder: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    gen: torch.Generator,
    seed: int,
) -> torch.Tensor:
    """The loss of one batch x (B, 3, 32, 32); the same fiber sampler for every variant."""
    size = GRID - WINDOW + 1
    u1, u2 = sample_fiber_pairs(x.shape[0], (size, size), None, gen)

    def lift(images: torch.Tensor) -> torch.Tensor:  # (B, 5, 5, D)
        return translation_lift(encoder.forward_features(images)["tokens"], (GRID, GRID), WINDOW)

    if variant == "simclr":
        views = torch.cat([translate(x, REFERENCE - u1, 4), translate(x, REFERENCE - u2, 4)])
        at_e = lift(views)[:, REFERENCE[0], REFERENCE[1]]  # (2B, D)
        f1, f2 = at_e.chunk(2)
    else:
        lifted = lift(x)
        if variant == "hssl_unstructured":
            lifted = remove_structure(lifted, seed=seed)
        f1, f2 = gather_fibers(lifted, u1), gather_fibers(lifted, u2)
    return nt_xent_loss(head(f1), head(f2), TEMPERATURE)


def run(variant: str, seed: int, data: dict, steps: int, batch_size: int) -> dict:
    torch.manual_seed(seed)
    encoder = mmssl.create_model("test_tiny_vit_local", vision=VISION).visual
    dim = VISION["dim"]
    head = nn.Sequential(nn.Linear(dim, 128), nn.GELU(), nn.Linear(128, 64))
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s / steps, 1)))
    )
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    train_images = data["train"]["images"]
    losses: list[float] = []
    t0 = time.perf_counter()
    encoder.train()
    for _ in range(steps if variant != "random_init" else 0):
        idx = torch.from_numpy(rng.choice(len(train_images), batch_size, replace=False))
        loss = step_loss(variant, encoder, head, train_images[idx].float() / 255.0, gen, seed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_time = time.perf_counter() - t0
    encoder.eval()
    clean = {s: data[s]["images"].float() / 255.0 for s in ("train", "test")}
    f_train, f_test = features(encoder, clean["train"]), features(encoder, clean["test"])
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "train_seconds": round(train_time, 1),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "digit_acc": probe(f_train, data["train"]["digit"], f_test, data["test"]["digit"]),
    }


def summarise(rows: list[dict], out: Path) -> str:
    cols = ["digit_acc", "final_loss", "train_seconds"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    names = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    for variant in names:
        sel = [r for r in rows if r["variant"] == variant]
        cells = []
        for c in cols:
            vals = [r[c] for r in sel if r.get(c) is not None]
            cells.append(f"{np.mean(vals):.2f} ± {np.std(vals):.2f}" if vals else "n/a")
        lines.append(f"| {variant} (n={len(sel)}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(names))
    means = [np.mean([r["digit_acc"] for r in rows if r["variant"] == v]) for v in names]
    stds = [np.std([r["digit_acc"] for r in rows if r["variant"] == v]) for v in names]
    ax.bar(x, means, 0.6, yerr=stds, capsize=4, color="tab:blue")
    for i, v in enumerate(names):  # every seed, so the spread is visible
        accs = [r["digit_acc"] for r in rows if r["variant"] == v]
        ax.scatter(np.full(len(accs), i), accs, color="black", s=12, zorder=3)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("digit probe accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Digit probe on frozen features (coloured digits)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/hssl")
    parser.add_argument("--data", default=None, help="demo-data dir (written if missing)")
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    check_args(parser, args, VARIANTS)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = demo_digits(Path(args.data) if args.data else out / "demo-data")
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
