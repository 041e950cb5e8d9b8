"""A model whose weights diverged (NaN) is refused by every scoring task, in one line, rather
than scored: zero-shot and retrieval gave 0.0 (below chance) and the LM's choice tasks 0.0 as
results, and its samples a traceback.  `mmssl features` writes what the model gives and warns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmssl.eval.cli import main, run_task
from mmssl.eval.loading import EvalError
from mmssl.models.io import load_pretrained, read_config, save_pretrained


@pytest.fixture(scope="module")
def diverged(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(vision diverged, text diverged): one NaN in a final norm of each tower."""
    extra = {k: v for k, v in read_config(tiny_model_dir).items() if k != "model"}
    out = []
    for tower in ("visual", "text"):
        model = load_pretrained(tiny_model_dir)
        with torch.no_grad():
            getattr(model, tower).norm.weight[0] = float("nan")
        out.append(str(save_pretrained(model, tmp_path_factory.mktemp(tower), extra)))
    return out[0], out[1]


def test_zeroshot_refuses_nan_image_and_class_embeddings(diverged, test_shards, tmp_path):
    for model, what in zip(diverged, ("12 of 12 image", "8 of 8 class embedding")):
        argv = ["zeroshot", "--model", model, "--data", test_shards, "--classes", "color"]
        with pytest.raises(EvalError, match=f"^{what} feature rows are not finite"):
            run_task([*argv, "--out", str(tmp_path / "z")])
        assert not (tmp_path / "z").exists()


def test_retrieval_refuses_nan_image_and_caption_embeddings(diverged, test_shards, tmp_path):
    for model, what in zip(diverged, ("image", "caption embedding")):
        with pytest.raises(EvalError, match=f"{what} feature rows are not finite"):
            run_task(
                ["retrieval", "--model", model, "--data", test_shards, "--out", str(tmp_path / "r")]
            )


def test_lm_refuses_nan_logits_before_scoring(diverged, text_shards, tmp_path, capsys):
    argv = ["lm", "--model", diverged[1], "--data", text_shards, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmssl eval: error: the model's next-token logits are not finite")
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_features_writes_nan_rows_and_warns(diverged, test_shards, tmp_path: Path, capsys) -> None:
    from mmssl.eval.features import main as features
    from mmssl.eval.features_file import load_features

    out = tmp_path / "f.safetensors"
    assert features(["--model", diverged[0], "--data", test_shards, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "mmssl features: warning: 12 rows are not finite (NaN or inf)" in err
    assert torch.isnan(load_features(out)["features"]).any(1).all()  # written as it came
