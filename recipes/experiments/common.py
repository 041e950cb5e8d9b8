"""What the digit experiments share: the check of their arguments, the demo data in memory,
the frozen-feature probe, and the resumable grid of (seed, variant) runs that appends one
JSON row per run."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def check_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, variants: list[str]
) -> None:
    """`parser.error` (exit 2, one line) unless --variants names known variants and --seeds
    and every number is in range: called right after parsing, before anything is written.
    --batch-size >= 2: a contrastive loss needs negatives (its upper bound, the training
    split, is checked by `check_batch_size` once the data is read)."""
    unknown = sorted(set(args.variants) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {variants}")
    if not args.variants:
        parser.error("--variants needs at least one variant")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if min(args.seeds) < 0:
        parser.error(f"--seeds must be >= 0 (numpy seeds), got {min(args.seeds)}")
    for option, least in (("steps", 1), ("batch_size", 2), ("threads", 1)):
        value = getattr(args, option)
        if value < least:
            parser.error(f"--{option.replace('_', '-')} must be >= {least}, got {value}")


def check_batch_size(parser: argparse.ArgumentParser, batch_size: int, train: int) -> None:
    """`parser.error` when a batch (drawn without replacement) exceeds the training split."""
    if batch_size > train:
        parser.error(f"--batch-size must be at most the {train} training images, got {batch_size}")


def demo_digits(data_dir: Path, size: int = 32) -> dict[str, dict[str, torch.Tensor]]:
    """The demo digits as uint8 images (N, 3, size, size) with digit and colour labels, per
    split.  Writes them (`mmssl.data.demo.write_demo`) first when `data_dir` holds none; an
    existing directory of another size is an error rather than a silent resize.
    """
    from PIL import Image

    if not (data_dir / "digits" / "manifest.json").exists():
        from mmssl.data.demo import write_demo

        write_demo(str(data_dir), size=size)
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
        if images and tuple(images[0].shape[1:]) != (size, size):
            raise SystemExit(
                f"{data_dir} holds {tuple(images[0].shape[1:])} digits, expected {size}x{size}"
            )
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


def _rows(results: Path) -> list[dict]:
    return (
        [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        if results.exists()
        else []
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(path: Path) -> bool:
    """Take the run `path` names for this process; False if a live process holds it.  A claim
    whose process died (a crash, a kill) is stale and taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = path.read_text().strip()
            if not text or _alive(int(text)):  # empty: being written by its owner right now
                return False
            path.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_grid(
    out: Path,
    variants: list[str],
    seeds: list[int],
    steps: int,
    run: Callable[[str, int], dict],
    setting: dict | None = None,
) -> list[dict]:
    """Run every (seed, variant) not yet in out/results.jsonl; returns the rows of `steps`
    and `setting` (what else decides a result, e.g. batch size and data: recorded in each
    row, so that a run with another batch size is not taken for one already done).

    Several processes may share `out` (e.g. one per core): before each run the results are
    re-read and the run is claimed (out/claims/), so no run is done twice.
    """
    results = out / "results.jsonl"
    claims = out / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    setting = {"steps": steps, **(setting or {})}

    def same(r: dict) -> bool:
        return all(r.get(k) == v for k, v in setting.items())

    def done(variant: str, seed: int) -> bool:
        return any((r["variant"], r["seed"]) == (variant, seed) and same(r) for r in _rows(results))

    for seed in seeds:
        for variant in variants:
            if done(variant, seed):
                continue
            key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:12]
            claim = claims / f"{variant}-seed{seed}-{key}"
            if not _claim(claim):
                continue
            if done(variant, seed):  # finished by another process since the first look
                claim.unlink(missing_ok=True)
                continue
            try:
                row = {**run(variant, seed), **setting}
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            finally:
                claim.unlink(missing_ok=True)
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
    return [r for r in _rows(results) if same(r)]
