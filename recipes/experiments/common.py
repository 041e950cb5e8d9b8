"""What the digit experiments share: the demo data in memory, the frozen-feature probe, and
the resumable grid of (seed, variant) runs that appends one JSON row per run."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def demo_digits(data_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The demo digits as uint8 images (N, 3, 32, 32) with digit and colour labels, per split.

    Writes them with `mmssl demo-data` first when `data_dir` holds none.
    """
    from PIL import Image

    if not (data_dir / "digits" / "manifest.json").exists():
        from mmssl.data.demo import write_demo

        write_demo(str(data_dir))
    out = {}
    for split in ("train", "test"):
        images, digits, colors = [], [], []
        for shard in sorted((data_dir / "digits").glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers()}
                for name in sorted(n for n in members if n.endswith(".png")):
                    png = tar.extractfile(members[name]).read()  # type: ignore[union-attr]
                    meta = json.loads(tar.extractfile(members[name[:-4] + ".json"]).read())  # type: ignore[union-attr]
                    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                    images.append(torch.from_numpy(img.copy()).permute(2, 0, 1))
                    digits.append(meta["digit"])
                    colors.append(meta["color"])
        out[split] = {
            "images": torch.stack(images),
            "digit": torch.tensor(digits),
            "color": torch.tensor(colors),
        }
    return out


def probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Accuracy (%) of a logistic regression (C=1, fixed in advance) on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.numpy())
    clf = LogisticRegression(max_iter=3000, C=1.0)
    clf.fit(scaler.transform(train_x.numpy()), train_y.numpy())
    return 100.0 * float((clf.predict(scaler.transform(test_x.numpy())) == test_y.numpy()).mean())


def run_grid(
    out: Path, variants: list[str], seeds: list[int], steps: int, run: Callable[[str, int], dict]
) -> list[dict]:
    """Run every (seed, variant) not yet in out/results.jsonl; returns the rows of `steps`."""
    results = out / "results.jsonl"
    rows = (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )
    done = {(r["variant"], r["seed"], r["steps"]) for r in rows}
    for seed in seeds:
        for variant in variants:
            if (variant, seed, steps) in done:
                continue
            row = run(variant, seed)
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
    return [r for r in rows if r["steps"] == steps]
