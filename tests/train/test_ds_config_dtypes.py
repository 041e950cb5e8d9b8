"""data_types.grad_accum_dtype in a recipe's DeepSpeed JSON: refused where DeepSpeed cannot
run it (stage 0: "unsupported mix" at start-up) or where its checkpoints cannot be exported
(stage 1 with bf16 swaps in BF16_Optimizer, whose checkpoints zero_to_fp32 cannot read: a
run trained to its end and `mmssl export` failed); the stages that take it are left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import synthetic_recipe

from mmssl.schema import ConfigError
from mmssl.train.ds_config import deepspeed_config
from mmssl.train.recipe import load_recipe


def _config(tmp_path: Path, stage: int, accum: object, precision: str, **zero: object) -> dict:
    path = tmp_path / f"z{stage}.json"
    types = {"grad_accum_dtype": accum} if isinstance(accum, str) else accum
    data = {"zero_optimization": {"stage": stage, **zero}, "data_types": types}
    path.write_text(json.dumps(data))
    recipe = load_recipe(
        synthetic_recipe(tmp_path, "r", 1), [f"train.deepspeed={path}", f"precision={precision}"]
    )
    return deepspeed_config(recipe, 1)


@pytest.mark.parametrize(
    "stage, accum, precision, says",
    [
        (0, "fp32", "bf16", "DeepSpeed cannot start so"),
        (0, "bf16", "fp32", "DeepSpeed cannot start so"),
        (1, "fp32", "bf16", "BF16_Optimizer, whose checkpoints mmssl export cannot read"),
        (1, "float32", "bf16", "BF16_Optimizer"),  # DeepSpeed's other names of fp32
        (2, "half-ish", "bf16", "must be fp32, bf16 or fp16, got 'half-ish'"),
        (2, "int8", "bf16", "must be fp32, bf16 or fp16"),
        (2, "fp32 as text", "bf16", "must be fp32"),
    ],
)
def test_refused(tmp_path: Path, stage: int, accum: str, precision: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        _config(tmp_path, stage, accum, precision)


def test_data_types_must_be_an_object(tmp_path: Path) -> None:
    """`"data_types": ["fp32"]` was an AttributeError traceback from --validate."""
    with pytest.raises(ConfigError, match=r'data_types must be an object, got \["fp32"\]'):
        _config(tmp_path, 2, ["fp32"], "bf16")


@pytest.mark.parametrize(
    "stage, accum, precision",
    # the ZeRO optimizer (not BF16_Optimizer) at stage 1: fp16 accumulation, fp32 weights
    [(0, "fp32", "fp32"), (1, "bf16", "bf16"), (1, "fp16", "bf16"), (1, "bf16", "fp32")]
    + [(1, "fp32", "fp32")]
    + [(2, "fp32", "bf16"), (3, "fp32", "bf16")],
)
def test_taken(tmp_path: Path, stage: int, accum: str, precision: str) -> None:
    assert _config(tmp_path, stage, accum, precision)["data_types"] == {"grad_accum_dtype": accum}


def test_stage_1_with_the_optimizer_offloaded_keeps_the_zero_optimizer(tmp_path: Path) -> None:
    """DeepSpeed swaps in BF16_Optimizer only without an optimizer offload."""
    offload = {"offload_optimizer": {"device": "cpu"}}
    assert _config(tmp_path, 1, "fp32", "bf16", **offload)["data_types"]
    # DeepSpeed counts a cpu offload only: with nvme it still takes BF16_Optimizer
    with pytest.raises(ConfigError, match="BF16_Optimizer"):
        nvme = {"offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}
        _config(tmp_path, 1, "fp32", "bf16", **nvme)


def _comm(tmp_path: Path, key: str, value: object, precision: str) -> dict:
    path = tmp_path / "comm.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: value}))
    recipe = load_recipe(
        synthetic_recipe(tmp_path, "r", 1), [f"train.deepspeed={path}", f"precision={precision}"]
    )
    return deepspeed_config(recipe, 1)


@pytest.mark.parametrize("key", ["communication_data_type", "seq_parallel_communication_data_type"])
@pytest.mark.parametrize(
    "value, precision",
    [("fp16", "fp32"), ("bf16", "fp32"), ("FP16", "bf16"), ("fp16", "bf16"), (16, "bf16")],
)
def test_a_communication_dtype_below_the_recipes_precision_is_refused(
    tmp_path: Path, key: str, value: object, precision: str
) -> None:
    """DeepSpeed casts the gradients to it for the all-reduce: fp16 in an fp32 run changed
    the weights of a one-rank run (5.9e-5 in 3 steps), and fp16 sums past 65504 overflow."""
    with pytest.raises(ConfigError) as err:
        _comm(tmp_path, key, value, precision)
    assert f"{key}={json.dumps(value)} with {precision} training" in str(err.value)


@pytest.mark.parametrize(
    "value, precision", [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("BF16", "bf16")]
)
def test_a_communication_dtype_at_or_above_the_recipes_precision_runs(
    tmp_path: Path, value: str, precision: str
) -> None:
    assert (
        _comm(tmp_path, "communication_data_type", value, precision)["communication_data_type"]
        == value
    )
