"""`mmssl eval fewshot --limit N` on features files scores the first N rows of each file,
exactly as a run on files cut to N rows by hand: the features are cut with their labels."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmssl.eval.cli import run_task
from mmssl.eval.features_file import save_features

ROWS, LIMIT = 40, 10


def _file(path: Path, seed: int, rows: int = ROWS, full: dict | None = None) -> dict:
    """A features file of 2 classes (class means apart, plus noise) and no vision digest,
    so the task reads it without loading a model; `full`: write its first `rows` rows."""
    if full is None:
        g = torch.Generator().manual_seed(seed)
        label = torch.arange(ROWS) % 2
        means = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
        full = {
            "features": means[label] + 0.8 * torch.randn(ROWS, 4, generator=g),
            "label": label,
            "__key__": [f"s{seed}_{i:03d}" for i in range(ROWS)],
        }
    feats = {
        "features": full["features"][:rows].clone(),
        "label": full["label"][:rows].clone(),
        "__key__": full["__key__"][:rows],
    }
    save_features(path, feats, {"fields": "label"})
    return full


def _fewshot(model: str, train: Path, test: Path, out: Path, *limit: str) -> dict:
    res = run_task(
        ["fewshot", "--model", model, "--train", str(train), "--test", str(test)]
        + ["--shots", "1,2", "--seeds", "3", "--out", str(out), *limit]
    )
    top1 = [
        x
        for x in (out / "summary.md").read_text(encoding="utf-8").splitlines()
        if x.startswith("Top-1")
    ]
    return {"results": json.loads(json.dumps(res)), "summary": top1}


def test_fewshot_limit_cuts_features_files(tmp_path: Path, tiny_model_dir: str) -> None:
    train_full = _file(tmp_path / "train.safetensors", seed=1)
    test_full = _file(tmp_path / "test.safetensors", seed=2)
    _file(tmp_path / "train10.safetensors", 1, LIMIT, train_full)
    _file(tmp_path / "test10.safetensors", 2, LIMIT, test_full)

    got = _fewshot(
        tiny_model_dir,
        tmp_path / "train.safetensors",
        tmp_path / "test.safetensors",
        tmp_path / "limited",
        "--limit",
        str(LIMIT),
    )
    want = _fewshot(
        tiny_model_dir,
        tmp_path / "train10.safetensors",
        tmp_path / "test10.safetensors",
        tmp_path / "by_hand",
    )
    assert got == want
    assert f"on {LIMIT} test images" in got["summary"][0]


def test_the_same_file_as_train_and_test_warns(tmp_path: Path, tiny_model_dir: str) -> None:
    """A probe scored on its own training samples reported a "test" accuracy without a word;
    two different files do not warn."""
    import warnings

    import pytest

    _file(tmp_path / "train.safetensors", seed=1)
    _file(tmp_path / "test.safetensors", seed=2)
    same = tmp_path / "sub" / ".." / "train.safetensors"
    (tmp_path / "sub").mkdir()
    with pytest.warns(RuntimeWarning, match="--train and --test are the same data"):
        _fewshot(tiny_model_dir, tmp_path / "train.safetensors", same, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _fewshot(
            tiny_model_dir,
            tmp_path / "train.safetensors",
            tmp_path / "test.safetensors",
            tmp_path / "b",
        )
