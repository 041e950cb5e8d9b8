"""A features file is read only by the model it fits: the same vision weights, the same image
preprocessing (size, mean, std) and, for zero-shot, embeddings as wide as its text tower's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmssl.eval.cli import main, run_task
from mmssl.eval.features import main as features_main
from mmssl.eval.features_file import load_features, save_features

pytestmark = pytest.mark.slow


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmssl eval: error:") and "\n" not in err
    return err


def _with_preprocess(src: str, dest: Path, preprocess: dict) -> str:
    """A copy of the exported model `src` whose config.json records `preprocess`: the same
    weights (so the same vision digest), images prepared otherwise."""
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["preprocess"] = preprocess
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


def _tasks_on(model: str, f: str, shards: str, out: Path) -> list[list[str]]:
    """zeroshot on the file, and fewshot and linear trained on it and tested on shards."""
    return [
        ["zeroshot", "--model", model, "--data", f, "--classes", "color"]
        + ["--label-field", "label", "--out", str(out / "z")],
        ["fewshot", "--model", model, "--train", f, "--test", shards]
        + ["--shots", "1", "--seeds", "1", "--out", str(out / "f")],
        ["linear", "--model", model, "--train", f, "--test", shards, "--out", str(out / "l")],
    ]


def test_a_features_file_of_other_preprocessing_is_refused(
    tmp_path, capsys, tiny_model_dir, test_shards
):
    # the same weights on images normalised otherwise: zero-shot, few-shot and linear used to
    # score the stale file (repro: top-1 0.27 from the file against 0.10 from the shards)
    f = str(tmp_path / "t.safetensors")
    assert features_main(["--model", tiny_model_dir, "--data", test_shards, "--out", f]) == 0
    capsys.readouterr()
    norm = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    renorm = _with_preprocess(tiny_model_dir, tmp_path / "renorm", norm)
    want = (
        f"mmssl eval: error: {f} holds features of images prepared otherwise than --model "
        "prepares them (mean null in the file, [0.5, 0.5, 0.5] for --model; std null in the "
        f"file, [0.25, 0.25, 0.25] for --model; extracted with {tiny_model_dir}): its features "
        "would not match this model's; extract them again with `mmssl features`"
    )
    for argv in _tasks_on(renorm, f, test_shards, tmp_path / "renorm_out"):
        assert _err(capsys, argv) == want, argv[0]

    small = _with_preprocess(tiny_model_dir, tmp_path / "small", {"image_size": 16})
    err = _err(capsys, _tasks_on(small, f, test_shards, tmp_path / "small_out")[0])
    assert "(image_size 32 in the file, 16 for --model; extracted with" in err

    # what the file records: test_tiny_clip's 32 px images, config.json without a preprocess
    # record, so no normalisation
    recorded = json.loads(load_features(f)["metadata"]["preprocess"])
    assert recorded == {"image_size": 32, "mean": None, "std": None}

    # extracted again with the renormalising model: accepted, and equal to its shards
    g = str(tmp_path / "renorm.safetensors")
    assert features_main(["--model", renorm, "--data", test_shards, "--out", g]) == 0
    common = ["--classes", "color", "--label-field", "label"]
    a, b = (
        run_task(["zeroshot", "--model", renorm, "--data", data, *common, "--out", out])
        for data, out in ((test_shards, str(tmp_path / "a")), (g, str(tmp_path / "b")))
    )
    assert a["num_samples"] == b["num_samples"] == 12
    assert a["top1"] == b["top1"] and a["per_class"] == b["per_class"]


def test_a_features_file_without_a_preprocessing_record_is_refused(
    tmp_path, capsys, tiny_model_dir, test_shards
):
    # an older file records the weights but not the preprocessing: nothing to check it with
    f = str(tmp_path / "t.safetensors")
    assert features_main(["--model", tiny_model_dir, "--data", test_shards, "--out", f]) == 0
    feats = load_features(f)
    meta = {k: v for k, v in feats.pop("metadata").items() if k != "preprocess"}
    old = str(tmp_path / "old.safetensors")
    save_features(old, feats, meta)
    capsys.readouterr()
    for argv in _tasks_on(tiny_model_dir, old, test_shards, tmp_path):
        err = _err(capsys, argv)
        assert f"{old} does not record the image preprocessing" in err, argv[0]
        assert "extract them again with `mmssl features`" in err


def test_zeroshot_refuses_embeddings_of_another_width(tmp_path, capsys, tiny_model_dir):
    # a hand-written file (no digest, so any model reads it) with 5-wide embeddings against
    # test_tiny_clip's 16-wide class embeddings: a RuntimeError traceback from the product
    f = tmp_path / "d5.safetensors"
    n = 6
    feats = {
        "features": torch.ones(n, 32),
        "embeddings": torch.ones(n, 5),
        "label": torch.arange(n) % 3,
        "__key__": [f"k{i}" for i in range(n)],
    }
    save_features(f, feats, {"fields": "label"})
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", str(f), "--classes", "color"]
    err = _err(capsys, [*argv, "--label-field", "label", "--out", str(tmp_path / "z")])
    assert err == (
        f"mmssl eval: error: {f} holds 5-wide embeddings, but --model's class embeddings are "
        "16 wide: they come from another model; extract the features with this one"
    )
