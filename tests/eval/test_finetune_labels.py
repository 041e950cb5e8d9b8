"""The fine-tuning head's width from the train labels, checked before anything trains: a label
beyond --num-classes was refused only when a drawn batch held it (exit 0 otherwise, its class
never predicted), a negative one blamed --num-classes, and sparse ids ({3, 2**62}) built a
head of 1 + the largest id (132 MB for two classes at 1e6; an allocation traceback at 2**62)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmssl.data.shards import ShardWriter
from mmssl.eval.cli import main
from mmssl.eval.finetune import head_size
from mmssl.eval.loading import EvalError


@pytest.mark.parametrize(
    "labels, given, want",
    [
        ([0, 5, 9], None, 10),  # gaps: columns for the missing ids, as before
        ([0, 1], 5, 5),
        (list(range(1000)), None, 1000),
        ([3, 9999], None, 10_000),  # sparse but small: built
    ],
)
def test_the_head_covers_the_labels(labels, given, want):
    assert head_size(torch.tensor(labels), given) == want


@pytest.mark.parametrize(
    "labels, given, says",
    [
        ([0, 1, 9], 2, "train labels run up to 9 but --num-classes is 2"),
        ([-1, 0, 1], None, "train labels must be >= 0"),
        ([-1, 0, 1], 2, "train labels must be >= 0"),
        ([3, 10**6], None, "the 2 train labels are sparse ids up to 1000000: a head of 1000001"),
        ([3, 2**62], None, "sparse ids"),
    ],
)
def test_labels_the_head_cannot_take_are_refused(labels, given, says):
    with pytest.raises(EvalError, match=says):
        head_size(torch.tensor(labels), given)
    assert head_size(torch.tensor([3, 10**6]), 10**6 + 1) == 10**6 + 1  # asked for: built


@pytest.mark.slow
def test_a_train_label_no_batch_draws_is_refused_before_training(tmp_path, capsys):
    """One train image of 16 has label 9, --num-classes 2, one step of 2 images: it passed
    (exit 0) unless the draw held it."""
    from mmssl.models.io import save_pretrained
    from mmssl.models.registry import create_model

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        with ShardWriter(str(tmp_path / "data"), split) as w:
            for i, label in enumerate([0, 1] * 7 + [9, 0]):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "png")
                w.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "json": {"label": label}})
    model = tmp_path / "model"
    save_pretrained(create_model("test_tiny_vit"), model, extra={"preprocess": {"image_size": 32}})
    argv = ["finetune", "--model", str(model), "--num-classes", "2", "--steps", "1"]
    argv += ["--train", str(tmp_path / "data/train-000000.tar"), "--train-batch-size", "2"]
    argv += ["--test", str(tmp_path / "data/test-000000.tar"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "train labels run up to 9 but --num-classes is 2" in capsys.readouterr().err


def test_a_label_equal_to_num_classes_is_refused():
    with pytest.raises(EvalError, match="train labels run up to 2 but --num-classes is 2"):
        head_size(torch.tensor([0, 1, 2]), 2)
    assert head_size(torch.tensor([0, 1, 2]), 3) == 3


def test_the_sparse_limit_is_ten_thousand_columns_for_few_labels():
    assert head_size(torch.tensor([3, 9_999]), None) == 10_000
    with pytest.raises(EvalError, match="sparse ids up to 10000"):
        head_size(torch.tensor([3, 10_000]), None)
    # many labels: 10 x distinct
    labels = torch.arange(2_000) * 10  # 2000 distinct, up to 19990: 19991 <= 20000
    assert head_size(labels, None) == 19_991
    with pytest.raises(EvalError, match="sparse ids"):
        head_size(torch.cat([labels, torch.tensor([30_000])]), None)  # 30001 > 20010
