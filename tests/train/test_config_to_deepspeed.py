"""The configuration layer (schema, recipe, values, ds_config) against expectations that do
not come from it: the value the recipe text states, the range its docs and messages state,
and DeepSpeed's own config parser (`DeepSpeedConfig`, which asserts train_batch_size ==
micro batch x gradient accumulation x world size) reading the config mmssl builds.  Each
test caught a mutant the other tests let through (a mutation audit)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from mmssl.schema import ConfigError
from mmssl.train.ds_config import deepspeed_config
from mmssl.train.recipe import check_ranges, grad_accum_steps, load_recipe
from mmssl.train.values import check_values


def _recipe(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return load_recipe(path, list(overrides))


class _Dist:
    """Stand-in for deepspeed.comm as seen by DeepSpeedConfig: rank 0 of `world` ranks."""

    def __init__(self, world: int) -> None:
        self.world = world

    def get_rank(self) -> int:
        return 0

    def get_world_size(self, *_: object) -> int:
        return self.world


def _deepspeed_parse(config: dict, world: int, monkeypatch: pytest.MonkeyPatch):
    """DeepSpeed's own reading of `config` for `world` data-parallel ranks."""
    import deepspeed.runtime.config as dsc

    monkeypatch.setattr(dsc, "dist", _Dist(world))
    return dsc.DeepSpeedConfig(json.loads(json.dumps(config)))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ds_batch_sizes_satisfy_deepspeeds_relation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: int
) -> None:
    recipe = _recipe(
        tmp_path,
        """
        train: {global_batch_size: 32, micro_batch_size: 4, deepspeed: zero1}
        """,
    )
    accum = grad_accum_steps(recipe, world)
    assert accum == 32 // (4 * world)  # the recipe text's numbers
    ds = deepspeed_config(recipe, accum)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == accum
    # DeepSpeed's documented relation, checked by DeepSpeed itself
    parsed = _deepspeed_parse(ds, world, monkeypatch)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu) == (32, 4)
    assert parsed.gradient_accumulation_steps == accum


def test_ds_maps_precision_clipping_optimizer_and_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(
        tmp_path,
        """
        precision: bf16
        optim: {lr: 3.0e-4, weight_decay: 0.1, betas: [0.9, 0.95], eps: 1.0e-6}
        train: {global_batch_size: 8, micro_batch_size: 8, grad_clip: 0.5, deepspeed: zero2}
        """,
    )
    parsed = _deepspeed_parse(deepspeed_config(recipe, 1), 1, monkeypatch)
    assert parsed.bfloat16_config.enabled is True and parsed.float16_config.enabled is False
    assert parsed.gradient_clipping == 0.5
    assert parsed.zero_optimization_stage == 2
    assert parsed.optimizer_name == "adamw"
    params = parsed.optimizer_params
    assert {k: params[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        "lr": 3e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-6,
        "weight_decay": 0.1,
    }


def test_ds_fp32_and_no_clipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path, "train: {grad_clip: null, deepspeed: zero0}\nprecision: fp32\n")
    parsed = _deepspeed_parse(deepspeed_config(recipe, 1), 1, monkeypatch)
    assert parsed.bfloat16_config.enabled is False and parsed.float16_config.enabled is False
    assert parsed.gradient_clipping == 0.0  # DeepSpeed's "off"


def test_ds_json_partial_optimizer_does_not_drop_the_recipes_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the JSON repeats a recipe key with a value the recipe agrees with (a subset): accepted,
    # and the recipe's full values are what DeepSpeed gets
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 1},
                "optimizer": {"type": "AdamW"},
                "bf16": {"enabled": True},
            }
        )
    )
    recipe = _recipe(
        tmp_path,
        f"""
        precision: bf16
        optim: {{lr: 3.0e-4}}
        train: {{global_batch_size: 8, micro_batch_size: 8, deepspeed: {path}}}
        """,
    )
    parsed = _deepspeed_parse(deepspeed_config(recipe, 1), 1, monkeypatch)
    assert parsed.optimizer_params["lr"] == 3e-4
    assert parsed.bfloat16_config.enabled is True


@pytest.mark.parametrize(
    "overrides",
    [
        ("train.steps=10", "train.stop_at=10"),  # "stop after this step": 1..train.steps
        ("train.steps=10", "schedule.warmup_steps=10"),  # 0..train.steps, stated in the error
        ("schedule.min_lr_ratio=1.0",),  # [0, 1]: a cosine schedule that stays at lr
        ("schedule.min_lr_ratio=0.0",),
        ("train.stop_at=1",),
    ],
)
def test_range_bounds_that_the_docs_include_are_accepted(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    recipe = _recipe(tmp_path, "name: x\n", overrides)
    check_ranges(recipe)
    check_values(recipe)


def _refused(tmp_path: Path, *overrides: str) -> str:
    recipe = _recipe(tmp_path, "name: x\n", overrides)
    with pytest.raises(ConfigError) as info:
        check_ranges(recipe)
        check_values(recipe)
    return str(info.value)


def test_adam_beta_of_one_is_refused_as_torch_refuses_it(tmp_path: Path) -> None:
    import torch

    # the reference: torch's AdamW refuses beta2 = 1 (bias correction 1 - 1**t = 0)
    with pytest.raises(ValueError, match="beta"):
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], betas=(0.9, 1.0))
    assert "optim.betas" in _refused(tmp_path, "optim.betas=[0.9, 1.0]")
    assert "optim.betas" in _refused(tmp_path, "optim.betas=[1.0, 0.999]")


def test_values_out_of_their_stated_ranges_are_refused(tmp_path: Path) -> None:
    cases = {
        # label smoothing 1 makes the target uniform: no signal (stated range [0, 1))
        "objectives.clip.label_smoothing=1.0": "label_smoothing",
        # layer decay 0: lr * 0**k = 0, the lower blocks never train (stated (0, 1])
        "optim.layer_decay=0.0": "optim.layer_decay",
        # 0 held-out batches: an eval loss over nothing
        "eval.batches=0": "eval.batches",
        # a NaN learning rate
        "optim.lr=.nan": "optim.lr",
        "optim.weight_decay=.inf": "optim.weight_decay",
        # a text context of 1 token has no next-token target
        "data.sources.train.context_length=1": "context_length",
        "data.context_length=1": "data.context_length",
        # 2**63 does not fit an int64 seed (torch.tensor(2**63) overflows)
        f"train.seed={2**63}": "train.seed",
        "optim.eps=0.0": "optim.eps",
    }
    for override, key in cases.items():
        assert key in _refused(tmp_path, override), override


def test_grad_clip_zero_is_deepspeeds_off_and_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(tmp_path, "train: {grad_clip: 0.0}\n")
    check_ranges(recipe)
    check_values(recipe)
    parsed = _deepspeed_parse(deepspeed_config(recipe, 1), 1, monkeypatch)
    assert parsed.gradient_clipping == 0.0


def test_default_betas_are_adamws_own(tmp_path: Path) -> None:
    """A recipe that does not name betas trains with AdamW's defaults (torch's and
    DeepSpeed's FusedAdam's: (0.9, 0.999)), the "same maths" the impl switch promises."""
    import inspect

    import torch

    want = list(inspect.signature(torch.optim.AdamW).parameters["betas"].default)
    recipe = _recipe(tmp_path, "name: x\n")
    assert recipe.optim.betas == want
    assert deepspeed_config(recipe, 1)["optimizer"]["params"]["betas"] == want


def test_zero_steps_is_refused(tmp_path: Path) -> None:
    # "train.steps must be positive"; a 0-step cosine schedule has no length
    assert "train.steps" in _refused(tmp_path, "train.steps=0", "schedule.warmup_steps=0")


def test_ds_json_keys_the_recipe_does_not_set_are_not_dropped_silently(tmp_path: Path) -> None:
    """A JSON that repeats a recipe-owned section with an extra key (amsgrad in the optimizer
    params, a bf16 option) would lose that key when the recipe's section replaces it: refused."""
    for extra in (
        {"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}},
        {"bf16": {"enabled": False, "immediate_grad_update": True}},
    ):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **extra}))
        recipe = _recipe(tmp_path, f"train: {{deepspeed: {path}}}\n")
        try:
            ds = deepspeed_config(recipe, 1)
        except ConfigError:
            continue  # refused: fine
        key = next(iter(extra))
        flat = json.dumps(ds[key])
        for leaf in ("amsgrad", "immediate_grad_update"):
            if leaf in json.dumps(extra):
                assert leaf in flat, f"{extra} silently dropped: {ds[key]}"


def test_optim_impl_maps_to_the_named_torch_kernel(tmp_path: Path) -> None:
    # recipe.py: "fused" (one fused kernel), "foreach" (multi-tensor ops), "torch" (loop)
    for impl, on, off in [("fused", "fused", "foreach"), ("foreach", "foreach", "fused")]:
        recipe = _recipe(tmp_path, f"optim: {{impl: {impl}}}\n")
        params = deepspeed_config(recipe, 1)["optimizer"]["params"]
        assert params.get("torch_adam") is True and params.get(on) is True
        assert not params.get(off)
    params = deepspeed_config(_recipe(tmp_path, "optim: {impl: deepspeed}\n"), 1)["optimizer"]
    assert not params["params"].get("torch_adam")
