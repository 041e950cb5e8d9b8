"""The eval tasks on bad input (empty or malformed class lists, unlabelled or float-labelled
shards, mismatched tokenizers, feature files of another model or of the wrong shape, bad probe
options, towers that cannot be compared): each is one `mmssl eval: error:` line and exit code 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mmssl.eval.cli import main
from mmssl.models.io import load_pretrained

pytestmark = pytest.mark.slow


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmssl eval: error:") and "\n" not in err
    return err


def test_empty_class_list(tmp_path, capsys, tiny_model_dir, test_shards):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"classnames": [], "templates": ["a {}."]}))
    err = _err(
        capsys,
        [
            "zeroshot",
            "--model",
            tiny_model_dir,
            "--data",
            test_shards,
            "--classes",
            str(f),
            "--out",
            str(tmp_path / "out"),  # a directory of its own
        ],
    )
    assert "class list is empty" in err


def test_template_without_placeholder(tmp_path, capsys, tiny_model_dir, test_shards):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"classnames": ["a", "b"], "templates": ["a photo.", "a {}."]}))
    err = _err(
        capsys,
        [
            "zeroshot",
            "--model",
            tiny_model_dir,
            "--data",
            test_shards,
            "--classes",
            str(f),
            "--out",
            str(tmp_path / "out"),  # a directory of its own
        ],
    )
    assert "'a photo.'" in err and "{}" in err


def test_shards_without_labels(tmp_path, capsys, tiny_model_dir, unlabelled_shards, test_shards):
    err = _err(
        capsys,
        [
            "zeroshot",
            "--model",
            tiny_model_dir,
            "--data",
            unlabelled_shards,
            "--classes",
            "color",
            "--label-field",
            "label",
            "--out",
            str(tmp_path),
        ],
    )
    assert "no 'label' field" in err and "labelled" in err
    err = _err(
        capsys,
        [
            "fewshot",
            "--model",
            tiny_model_dir,
            "--train",
            unlabelled_shards,
            "--test",
            test_shards,
            "--out",
            str(tmp_path),
        ],
    )
    assert "no 'label' field" in err


def test_tokenizer_not_matching_checkpoint(tmp_path, capsys, tiny_model_dir, test_shards):
    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["tokenizer"]["sha256"] = "0" * 64
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _err(
        capsys,
        [
            "zeroshot",
            "--model",
            str(bad),
            "--data",
            test_shards,
            "--classes",
            "color",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "does not match" in err and "sha256" in err
    # an explicit tokenizer with another vocabulary is refused too
    err = _err(
        capsys,
        [
            "retrieval",
            "--model",
            tiny_model_dir,
            "--data",
            test_shards,
            "--tokenizer",
            "clip",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "does not match" in err


def test_missing_model_and_shards(tmp_path, capsys, tiny_model_dir):
    err = _err(
        capsys,
        ["zeroshot", "--model", str(tmp_path / "nope"), "--data", "x.tar", "--classes", "digit"],
    )
    assert "model path not found" in err
    err = _err(
        capsys,
        [
            "zeroshot",
            "--model",
            tiny_model_dir,
            "--data",
            str(tmp_path / "x-{0..1}.tar"),
            "--classes",
            "digit",
            "--out",
            str(tmp_path),
        ],
    )
    assert "matches no file" in err


def test_zeroshot_refuses_a_features_file_of_another_model(
    tmp_path, capsys, tokenizer, tiny_model_dir, test_shards
):
    from eval_helpers import make_tiny_model_dir

    from mmssl.eval.features import main as features_main

    other = make_tiny_model_dir(str(tmp_path / "other"), tokenizer, seed=1)  # same shapes
    f = str(tmp_path / "other.safetensors")
    assert features_main(["--model", other, "--data", test_shards, "--out", f]) == 0
    capsys.readouterr()
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", f, "--classes", "color"]
    err = _err(capsys, [*argv, "--label-field", "label", "--out", str(tmp_path / "z")])
    assert "another vision tower" in err


def test_zeroshot_on_an_empty_features_file_is_one_line(tmp_path, capsys, tiny_model_dir):
    # topk_accuracy raised a bare ValueError (a traceback from the CLI) on 0 rows
    from mmssl.eval.features_file import save_features, vision_digest

    model = load_pretrained(tiny_model_dir)
    empty = {
        "features": torch.zeros(0, model.visual.cfg.dim),
        "embeddings": torch.zeros(0, model.visual.proj.out_features),
        "label": torch.zeros(0, dtype=torch.int64),
        "__key__": [],
    }
    f = tmp_path / "empty.safetensors"
    save_features(f, empty, {"fields": "label", "vision_sha256": vision_digest(model)})
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", str(f), "--classes", "color"]
    err = _err(capsys, [*argv, "--label-field", "label", "--out", str(tmp_path / "z")])
    assert err == f"mmssl eval: error: {f} has no feature rows: there are no images to classify"


def test_probes_refuse_a_features_file_of_another_model(
    tmp_path, capsys, tokenizer, tiny_model_dir, train_shards, test_shards
):
    # same shapes, other weights: a probe fit on one model's features and scored on another's
    # (the test split extracted with --model) used to report a number
    from eval_helpers import make_tiny_model_dir

    from mmssl.eval.features import main as features_main

    other = make_tiny_model_dir(str(tmp_path / "other"), tokenizer, seed=1)
    f = str(tmp_path / "other.safetensors")
    assert features_main(["--model", other, "--data", train_shards, "--out", f]) == 0
    capsys.readouterr()
    for task, extra in (("fewshot", ["--shots", "1", "--seeds", "1"]), ("linear", [])):
        argv = [task, "--model", tiny_model_dir, "--train", f, "--test", test_shards, *extra]
        err = _err(capsys, [*argv, "--out", str(tmp_path / task)])
        assert "another vision tower" in err and other in err


def test_bad_feature_files_and_probe_options(tmp_path, capsys, tiny_model_dir, test_shards):
    from mmssl.eval.features_file import save_features

    def feats(n: int, d: int = 4, labels: int | None = None) -> dict:
        g = torch.Generator().manual_seed(n)
        y = torch.arange(labels if labels is not None else n) % 2
        return {"features": torch.randn(n, d, generator=g), "label": y, "__key__": []}

    files = {}
    for name, f in [("good", feats(20)), ("rows", feats(20, labels=19)), ("wide", feats(20, 5))]:
        files[name] = tmp_path / f"{name}.safetensors"
        save_features(files[name], f, {})
    files["nofeat"] = tmp_path / "nofeat.safetensors"
    save_features(files["nofeat"], {"label": torch.zeros(3), "__key__": []}, {})
    files["cut"] = tmp_path / "cut.safetensors"
    files["cut"].write_bytes(files["good"].read_bytes()[:50])
    good = str(files["good"])

    def fewshot(train: str, *extra: str) -> str:
        argv = ["fewshot", "--model", tiny_model_dir, "--train", train, "--test", good]
        return _err(capsys, [*argv, "--shots", "2", "--out", str(tmp_path / "o"), *extra])

    assert "not a readable features file" in fewshot(str(files["cut"]))
    assert "no (N, D) 'features' tensor" in fewshot(str(files["nofeat"]))
    assert "has shape (19,) but there are 20 feature rows" in fewshot(str(files["rows"]))
    assert "5 dims but test features 4" in fewshot(str(files["wide"]))
    assert "no 'features' labels" in fewshot(good, "--label-field", "features")
    assert "--temperature must be > 0 for knn" in fewshot(good, "--temperature", "0")
    assert "--weight-decay must be > 0 for logistic" in fewshot(good, "--weight-decay", "0")
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in _err(
        capsys,
        ["fewshot", "--model", tiny_model_dir, "--train", good, "--test", good]
        + ["--out", str(tmp_path / "file")],
    )
    linear = ["linear", "--model", tiny_model_dir, "--train", good, "--test", good]
    for bad in ("nan", "inf", "0"):
        err = _err(capsys, [*linear, "--decays", f"1e-3,{bad}", "--out", str(tmp_path / "l")])
        assert "weight decays must be positive" in err
    finetune = ["finetune", "--model", tiny_model_dir, "--train", test_shards, "--test"]
    err = _err(
        capsys, [*finetune, test_shards, "--deepspeed", "nope", "--out", str(tmp_path / "f")]
    )
    assert "no DeepSpeed JSON 'nope'" in err


def test_float_labels_in_shards_are_refused(tmp_path, capsys, tiny_model_dir, test_shards):
    # .long() used to make 2.5 class 2 without a word, as it did for a features file
    from eval_helpers import png_bytes

    from mmssl.data.shards import ShardWriter

    writer = ShardWriter(str(tmp_path / "s"), "train", max_count=10)
    for i, label in enumerate([0, 1, 2.5, 1]):
        image = png_bytes(np.full((32, 32, 3), 60 * i, dtype=np.uint8))
        writer.write({"__key__": f"k{i:04d}", "png": image, "json": {"label": label}})
    writer.close()
    shards = str(tmp_path / "s" / writer.pattern)
    want = f"shards {shards}: 'label' is 2.5 at sample 'k0002'; labels must be whole class indices"
    argv = ["fewshot", "--model", tiny_model_dir, "--train", shards, "--test", test_shards]
    assert want in _err(capsys, [*argv, "--shots", "1", "--out", str(tmp_path / "f")])
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", shards, "--classes", "color"]
    assert want in _err(capsys, [*argv, "--label-field", "label", "--out", str(tmp_path / "z")])


def test_zeroshot_template_longer_than_the_context_is_one_line(
    tmp_path, capsys, tiny_model_dir, test_shards
):
    # cut to the context silently, every class's prompt was the same row: top-1 0.0, no word
    f = tmp_path / "c.json"
    long = "a blurry photo of {} " + "with many more words " * 8
    f.write_text(json.dumps({"classnames": ["red", "green", "blue"], "templates": [long]}))
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", test_shards, "--classes", str(f)]
    err = _err(capsys, [*argv, "--out", str(tmp_path / "z")])
    assert "longer than the text context of 32 tokens" in err and "shorten the template" in err
    assert "'a blurry photo of " in err
    assert not (tmp_path / "z" / "results.json").exists()


@pytest.mark.parametrize("task", ["zeroshot", "retrieval"])
def test_towers_of_unequal_widths_without_projection_are_one_line(
    tmp_path, capsys, tokenizer, test_shards, task
):
    from eval_helpers import make_tiny_model_dir

    model = make_tiny_model_dir(
        str(tmp_path / "m"), tokenizer, embed_dim=None, text={"dim": 16, "num_heads": 2}
    )
    argv = [task, "--model", model, "--data", test_shards, "--out", str(tmp_path / "o")]
    err = _err(capsys, argv + (["--classes", "color"] if task == "zeroshot" else []))
    assert err == (
        "mmssl eval: error: the model's image embeddings are 32 wide and its text embeddings "
        "16: they cannot be compared (without a projection, embed_dim null, the towers' widths "
        "must be equal)"
    )
