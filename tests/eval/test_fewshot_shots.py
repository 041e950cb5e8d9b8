"""Few-shot with fewer train images in a class than --shots asks is an error naming the class
and the largest k that works: it used to give that class all it had in every draw and report
a "k-shot" result with a ±0 spread."""

from __future__ import annotations

import pytest
import torch

from mmssl.eval import fewshot
from mmssl.eval.cli import main
from mmssl.eval.features_file import save_features
from mmssl.eval.loading import EvalError


def _features(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return torch.randn(len(y), 4, generator=torch.Generator().manual_seed(0)), y


def test_evaluate_refuses_a_k_larger_than_a_class():
    x, y = _features([5, 2, 9, 3])
    want = (
        "4-shot needs 4 train images of every class, but class 1 has 2, class 3 has 3: the "
        "largest k every class allows is 2"
    )
    with pytest.raises(EvalError) as err:
        fewshot.evaluate(x, y, x, y, shots=(1, 4), seeds=(0, 1))
    assert str(err.value) == want
    res = fewshot.evaluate(x, y, x, y, shots=(1, 2), seeds=(0, 1), methods=("prototype",))
    assert set(res["prototype"]) == {1, 2}


def test_the_cli_says_which_class_is_short(tmp_path, capsys, tiny_model_dir):
    x, y = _features([6, 3])
    path = tmp_path / "f.safetensors"
    save_features(path, {"features": x, "label": y, "__key__": []}, {})
    argv = ["fewshot", "--model", tiny_model_dir, "--train", str(path), "--test", str(path)]
    assert main([*argv, "--shots", "1,4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "4-shot needs 4 train images of every class, but class 1 has 3" in err
    assert "the largest k every class allows is 3" in err
