"""Recipes, validation and bad input, the engine's pieces, and `mmssl plan` (no training)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from train_helpers import RECIPES, tiny_clip_batch, tiny_overrides

from mmssl.schema import ConfigError
from mmssl.train.cli import main
from mmssl.train.ds_config import deepspeed_config
from mmssl.train.engine import WarmupCosine, param_groups
from mmssl.train.recipe import load_recipe, validate

QUICK = str(RECIPES / "quickstart.yaml")
# each shipped recipe with the world size it is written for
SHIPPED = {
    "quickstart": 1,
    "joint": 1,
    "simclr_vit_s16": 16,
    "clip_vit_b16": 64,
    "gpt_124m": 8,
    "coca_vit_b16": 64,
    "hssl_digits": 1,
}


def test_every_recipe_is_shipped_and_validates() -> None:
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(SHIPPED)
    for name, world in SHIPPED.items():
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        resolved = validate(recipe, world, check_files=False)
        ds = resolved.ds_config
        assert ds["train_batch_size"] == recipe.train.global_batch_size
        assert (
            ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
            == recipe.train.global_batch_size
        )
    for path in (RECIPES / "deepspeed").glob("*.json"):
        assert set(json.loads(path.read_text())) == {"zero_optimization"}, path


def _bad(args: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    """Run the CLI on bad input: exit code 2, one stderr line, nothing written."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmssl train: error: "), err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
    return err


@pytest.fixture()
def base(demo_data: str, tmp_path: Path) -> list[str]:
    return [QUICK, *tiny_overrides(demo_data, str(tmp_path / "runs"), "bad")]


def test_unknown_key_suggests(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _bad([*base, "train.stpes=3"], capsys, tmp_path / "runs")
    assert "'train.stpes'" in err and "'steps'" in err
    err = _bad([*base, "objectives.clip.temprature=0.5"], capsys, tmp_path / "runs")
    assert "'objectives.clip.temprature'" in err and "'temperature'" in err
    err = _bad([*base, "model.overrides.vision.dpth=3"], capsys, tmp_path / "runs")
    assert "dpth" in err and "'depth'" in err


def test_a_resume_path_that_is_not_there_fails_validate(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--validate said ok; the run then refused it at start."""
    err = _bad([*base, "checkpoint.resume=nul", "--validate"], capsys, tmp_path / "runs")
    assert "checkpoint.resume: no checkpoint at 'nul'" in err
    err = _bad([*base, "checkpoint.resume=null", "--validate"], capsys, tmp_path / "runs")
    assert "(to start afresh write none)" in err
    err = _bad([*base, f"checkpoint.resume={tmp_path}", "--validate"], capsys, tmp_path / "runs")
    assert "no checkpoint at" in err  # a directory with no checkpoint folder in it
    (tmp_path / "prev" / "checkpoints" / "step_00000010").mkdir(parents=True)
    for there in ("prev", "prev/checkpoints", "prev/checkpoints/step_00000010"):
        assert main([*base, f"checkpoint.resume={tmp_path / there}", "--validate"]) == 0


def test_a_shipped_deepspeed_name_with_json_says_so(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`zero1.json` was never looked for in recipes/deepspeed, while the message said it was."""
    err = _bad([*base, "train.deepspeed=zero1.json", "--validate"], capsys, tmp_path / "runs")
    assert "no DeepSpeed JSON 'zero1.json' (shipped ones are named without .json)" in err
    assert "(looked for zero1.json, " in err
    assert main([*base, "train.deepspeed=zero1", "--validate"]) == 0


def test_wrong_type(base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _bad([*base, "train.steps=many"], capsys, tmp_path / "runs")
    assert "train.steps" in err and "integer" in err
    err = _bad([*base, "precision=fp16"], capsys, tmp_path / "runs")
    assert "precision" in err


def test_a_setting_the_schedule_does_not_read_is_refused(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # the constant schedule held lr after its warmup and dropped the ratio without a word
    err = _bad([*base, "schedule.kind=constant", "schedule.min_lr_ratio=0.5"], capsys, tmp_path)
    assert "schedule.min_lr_ratio=0.5 has no effect with schedule.kind=constant" in err


def test_a_mistyped_held_out_source_is_named_before_the_source_it_leaves_unread(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # it said "data.sources.digits_test: no objective or eval.sources reads it (did you mean
    # 'digits_tst'?)", inviting the user to rename the right source to the typo
    err = _bad([*base, "eval.sources.digits=digits_tst"], capsys, tmp_path)
    assert "eval.sources.digits: no data source 'digits_tst' (did you mean 'digits_test'?)" in err


def test_batch_not_divisible(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _bad([*base, "train.global_batch_size=20"], capsys, tmp_path / "runs")
    assert "global_batch_size 20" in err and "micro_batch_size 8" in err
    recipe = load_recipe(QUICK, tiny_overrides("/x", "/y", "n"))
    with pytest.raises(ConfigError, match="world size 3"):
        validate(recipe, 3, check_files=False)


def test_missing_shards(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "nowhere" / "train-{000000..000003}.tar")
    err = _bad([*base, f"data.sources.digits.urls={missing}"], capsys, tmp_path / "runs")
    assert "data.sources.digits.urls" in err and "nowhere" in err


def test_an_epoch_source_listing_a_shard_twice(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: str
) -> None:
    """Refused at --validate, before a run reads the shard twice each epoch; resampled mode
    draws from the list, where a repeat weights the shard."""
    twice = f"data.sources.digits.urls={demo_data}/digits/train-{{000000,000001,000000}}.tar"
    err = _bad([*base, twice, "data.sources.digits.mode=epoch"], capsys, tmp_path / "runs")
    assert "data.sources.digits.urls" in err and "lists a shard twice" in err
    recipe = load_recipe(QUICK, [*base[1:], twice])
    validate(recipe, 1, check_files=True)


def test_deepspeed_json_conflict(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    conflicts = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.5,
        "optimizer": {"type": "Adam", "params": {"lr": 0.1}},
        "scheduler": {"type": "WarmupLR"},
        "bf16": {"enabled": True},
        "bfloat16": {"enabled": True},  # DeepSpeed's older name: trained in fp32 unrefused
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
    }
    for key, value in conflicts.items():
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 1}, key: value}))
        err = _bad([*base, f"train.deepspeed={path}"], capsys, tmp_path / "runs")
        assert repr(key) in err
    # the same value as the recipe is not a conflict
    recipe = load_recipe(QUICK, tiny_overrides("/x", "/y", "n"))
    path = tmp_path / "same.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": 8,
                "bf16": {"enabled": False},
            }
        )
    )
    recipe.train.deepspeed = str(path)
    assert deepspeed_config(recipe, 2)["zero_optimization"] == {"stage": 2}
    # DeepSpeed would ignore a misspelt section (and train at ZeRO-0) or fail at start-up
    for body, says in [
        ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation' (did you mean"),
        ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com"),
        ({"zero_optimization": []}, "zero_optimization must be an object"),
        # sections DeepSpeed has removed: --validate passed them, initialize raised
        ({"elasticity": {"enabled": False}}, "Elastic training has been removed"),
        ({"sparse_attention": {"mode": "fixed"}}, "Sparse Attention has been removed"),
    ]:
        path.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=re.escape(says)):
            deepspeed_config(recipe, 2)
    # an offload below the stage that implements it: DeepSpeed trains without it
    for zero, says in [
        ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer needs stage 1"),
        ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs stage 3"),
        ({"stage": "2"}, "must be 0..3, got '2'"),
        ({"stage": True}, "must be 0..3, got True"),
        ({"stage": 0, "cpu_offload": True}, "offload_optimizer needs stage 1"),  # older names
        ({"stage": 2, "cpu_offload_param": True}, "offload_param needs stage 3"),
    ]:
        path.write_text(json.dumps({"zero_optimization": zero}))
        with pytest.raises(ConfigError, match=re.escape(says)):
            deepspeed_config(recipe, 2)
    for zero in (
        {"stage": 0, "offload_optimizer": {"device": "none"}},
        {"stage": 1, "offload_optimizer": {"device": "cpu"}},
    ):
        path.write_text(json.dumps({"zero_optimization": zero}))
        assert deepspeed_config(recipe, 2)["zero_optimization"] == zero
    path.write_bytes(b'{"zero_optimization": {"stage": 2}} \xff')
    with pytest.raises(ConfigError, match="not UTF-8"):
        deepspeed_config(recipe, 2)
    real = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "flops_profiler": {}}
    path.write_text(json.dumps(real))
    assert deepspeed_config(recipe, 2)["zero_optimization"]["overlap_comm"] is True
    # DeepSpeed's monitors write where they are told (a tester's profiler report replaced an
    # existing file outside the run): a DeepSpeed JSON holds engine knobs only
    outside = tmp_path / "elsewhere"
    for body, says in [
        ({"tensorboard": {"enabled": True, "output_path": str(outside)}}, "'tensorboard' is"),
        ({"csv_monitor": {"enabled": True, "output_path": str(outside)}}, "'csv_monitor' is"),
        ({"wandb": {"enabled": True}}, "'wandb' is enabled"),
        ({"flops_profiler": {"enabled": True, "output_file": str(outside)}}, "output_file"),
    ]:
        path.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=re.escape(says)):
            deepspeed_config(recipe, 2)
    assert not outside.exists()
    off = {"tensorboard": {"enabled": False}, "flops_profiler": {"enabled": True}}
    path.write_text(json.dumps(off))
    assert deepspeed_config(recipe, 2)["tensorboard"] == {"enabled": False}


def test_other_bad_input(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    assert "does not exist" in _bad([str(tmp_path / "none.yaml")], capsys, runs)
    assert "is a directory, not a recipe file" in _bad([str(tmp_path)], capsys, runs)
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _bad([str(tmp_path / "latin1.yaml")], capsys, runs)
    assert "'simclr'" in _bad([*base, "objectives.clip.type=simclar"], capsys, runs)
    assert "source" in _bad([*base, "objectives.clip.source=nope"], capsys, runs)
    assert "train.deepspeed" in _bad([*base, "train.deepspeed=zero9"], capsys, runs)
    # a run has the launcher's world size: validated for another, it failed with a traceback
    assert "--world-size only applies with --validate" in _bad(
        [*base, "--world-size", "2"], capsys, runs
    )
    assert "vocab_size" in _bad([*base, "model.overrides.text.vocab_size=512"], capsys, runs)
    # a bidirectional text tower lets next_token read the very token it is scored on
    err = _bad([*base, "model.overrides.text.causal=false"], capsys, runs)
    assert "objectives.next_token: next_token needs a causal text tower" in err
    assert "model.overrides.text.causal=true" in err
    assert "data.view_augment has 2 entries" in _bad([*base, "data.views=0"], capsys, runs)
    assert "two views" in _bad([*base, "data.views=0", "data.view_augment=[]"], capsys, runs)
    err = _bad([*base, "data.sources.trian.mode=epoch"], capsys, runs)  # a typo'd source
    assert "data.sources.trian: no objective or eval.sources reads it" in err
    image_only = ["objectives.clip.source=digits_test", "data.sources.digits.kind=image"]
    err = _bad([*base, *image_only, "objectives.simclr.positives=caption"], capsys, runs)
    assert "objectives.simclr: simclr with positives=caption needs ['text']" in err
    err = _bad([*base, "objectives.next_token.positives=label"], capsys, runs)
    assert "objectives.next_token.positives: next_token does not use it (only simclr" in err
    err = _bad([*base, "objectives.clip.temperature=0.05"], capsys, runs)
    assert "objectives.clip.temperature: clip does not use it (only simclr, hssl do)" in err
    assert "not divisible by the model's patch_size" in _bad(
        [*base, "data.image_size=33"], capsys, runs
    )
    # a backbone conditioned on the descriptor would hand augself its target
    augself = ["objectives.augself.source=digits", "model.overrides.condition={dim: 16}"]
    for cond in ("model.overrides.vision.cond_dim=16", "model.overrides.vision.cond_tokens=1"):
        err = _bad([*base, *augself, cond], capsys, runs)
        assert "objectives.augself: augself predicts the views' descriptor difference" in err
    projector = "model.overrides.projector={cond: film, hidden_dim: 16, out_dim: 8}"
    validate(load_recipe(base[0], [*base[1:], *augself, projector]), check_files=False)
    # a head of the objective's own would replace that conditioned projector, untrained
    own_head = "objectives.simclr.projector_dim=16"
    cond = ["model.overrides.condition={dim: 16}", projector]
    err = _bad([*base, *cond, own_head], capsys, runs)
    assert "objectives.simclr.projector_dim: a head of its own replaces the model's" in err
    validate(load_recipe(base[0], [*base[1:], own_head]), check_files=False)  # plain: fine


def test_augself_group_weights(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A recipe weighs AugSelf's descriptor groups (the paper predicts crop and color only):
    the Task's loss is that weighted sum of the per-group losses; bad weights are refused."""
    from mmssl import create_model
    from mmssl.objectives.augself import augself_group_losses
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    runs = tmp_path / "runs"
    augself = ["objectives.augself.source=digits"]
    paper = "objectives.augself.group_weights={blur: 0, color_diff: 0, grayscale: 0}"
    recipe = load_recipe(base[0], [*base[1:], *augself, paper])
    validate(recipe, check_files=False)
    weights = {"blur": 0.0, "color_diff": 0.0, "grayscale": 0.0}
    assert recipe.objectives["augself"].group_weights == weights
    obj = ObjectiveConfig(type="augself", group_weights={"crop": 2.0, "grayscale": 0.0})
    task = Task(create_model("test_tiny_simclr"), {"augself": obj})
    head = task.heads["augself"]
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 4, head.mlp[0].in_features // 2)
    w1, w2 = torch.rand(2, 4, 13)
    pred = head.predict(torch.cat([f1, f2]), torch.cat([f2, f1]))
    parts = augself_group_losses(pred, torch.cat([w1, w2]), torch.cat([w2, w1]))
    want = sum({"crop": 2.0, "grayscale": 0.0}.get(k, 1.0) * v for k, v in parts.items())
    torch.testing.assert_close(head(f1, f2, w1, w2), want)
    err = _bad(
        [*base, *augself, "objectives.augself.group_weights={crop: 1, colour: 0}"], capsys, runs
    )
    assert "objectives.augself.group_weights: no descriptor group 'colour' (did you mean" in err
    err = _bad([*base, *augself, "objectives.augself.group_weights={crop: -1}"], capsys, runs)
    assert "objectives.augself.group_weights.crop must be >= 0, got -1.0" in err
    zero = "{blur: 0, color: 0, color_diff: 0, crop: 0, grayscale: 0}"
    err = _bad([*base, *augself, f"objectives.augself.group_weights={zero}"], capsys, runs)
    assert "every group weighs 0" in err
    err = _bad([*base, "objectives.simclr.group_weights={crop: 1}"], capsys, runs)
    assert "objectives.simclr.group_weights: simclr does not use it (only augself do)" in err


def test_param_groups_no_decay() -> None:
    """Decay exactly the Linear/Conv weights; norms, biases, embeddings, position tables,
    class token and logit scale go without (rule written by module type here)."""
    from mmssl import create_model
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    task = Task(create_model("test_tiny_clip"), {"clip": ObjectiveConfig(type="clip")})
    expect_decay = {id(m.weight) for m in task.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    decay, no_decay = param_groups(task, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == expect_decay
    names = {id(p): n for n, p in task.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    for must in (
        "model.logit_scale",
        "model.visual.cls_token",
        "model.visual.pos_embed",
        "model.text.token_embed.weight",
        "model.text.pos_embed",
        "model.visual.norm.weight",
        "model.visual.patch_embed.proj.bias",
    ):
        assert must in skipped
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))
    # optim.decay_embeddings (nanoGPT's and OpenCLIP's rule): the token and position tables
    # decay too; the class token, norms, biases and the logit scale still do not
    tables = {id(m.weight) for m in task.modules() if isinstance(m, nn.Embedding)}
    tables |= {id(p) for n, p in task.named_parameters() if n.endswith("pos_embed")}
    decay, no_decay = param_groups(task, 0.1, decay_embeddings=True)
    assert len(tables) == 3 and {id(p) for p in decay["params"]} == expect_decay | tables
    assert {names[id(p)] for p in no_decay["params"]} == skipped - {names[i] for i in tables}


def test_metrics_report_the_temperatures_that_train() -> None:
    """A siglip objective trains its own scale and bias: the metrics report those (as
    `logit_scale/<key>`, `logit_bias/<key>`), and the model's `logit_scale`, which only a
    clip objective trains, only when one does (it was reported for siglip-only runs)."""
    import math

    from mmssl import create_model
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    batch = {"train": tiny_clip_batch()}
    sig = Task(create_model("test_tiny_clip"), {"s": ObjectiveConfig(type="siglip")})
    with torch.no_grad():
        sig.losses["s"].logit_scale.fill_(math.log(7.0))
        sig.losses["s"].logit_bias.fill_(-3.0)
    _, metrics = sig(batch)
    assert "logit_scale" not in metrics
    assert metrics["logit_scale/s"].item() == pytest.approx(7.0)
    assert metrics["logit_bias/s"].item() == -3.0
    clip = Task(create_model("test_tiny_clip"), {"c": ObjectiveConfig(type="clip")})
    _, metrics = clip(batch)
    want = clip.model.logit_scale.detach().exp().item()
    assert metrics["logit_scale"].item() == pytest.approx(want)
    assert not [k for k in metrics if k.startswith("logit_bias")]
    # past the clamp the logged scale is the one the loss uses, as open_clip's (it logged 150)
    with torch.no_grad():
        clip.model.logit_scale.fill_(math.log(150.0))
    _, metrics = clip(batch)
    assert metrics["logit_scale"].item() == pytest.approx(100.0)


def test_warmup_cosine_values() -> None:
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(0, 10, 0.0, cosine=False)(7) == 1.0


def test_plan_matches_zero_formulas(capsys: pytest.CaptureFixture[str]) -> None:
    """`mmssl plan` for CLIP ViT-B/16 on 64 GPUs: the parameter count of the model built
    independently, ZeRO-2 memory 2/2/12 bytes per parameter with grads and optimizer / 64,
    and FLOPs from the vision tower's own counter plus the text tower, less the rows of
    the last blocks that pooled features skip."""
    from mmssl.models.registry import create_model
    from mmssl.train.plan import main as plan_main

    assert plan_main([str(RECIPES / "clip_vit_b16.yaml"), "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        model = create_model("clip_vit_b16")
    psi = sum(p.numel() for p in model.parameters())
    assert f"parameters: {psi / 1e6:.2f} M" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert float(lines["parameters"].split()[1]) == pytest.approx(2 * psi / 1e9, abs=0.006)
    assert float(lines["gradients"].split()[1]) == pytest.approx(2 * psi / 64 / 1e9, abs=0.006)
    assert float(lines["optimizer"].split()[2]) == pytest.approx(12 * psi / 64 / 1e9, abs=0.006)
    text_flops = 12 * (2 * 77 * 512 * 512 * 12 + 4 * 77 * 77 * 512)

    def pooled_only_skips(n: int, d: int) -> int:
        """The last block's work on the rows CLIP does not read: all but the class or
        end-of-text row's output projection, MLP and attention (qkv runs on every row)."""
        return (n - 1) * (2 * d * d * (1 + 2 * 4) + 4 * n * d)

    total = model.visual.flops_per_image() + text_flops
    total -= pooled_only_skips(197, 768) + pooled_only_skips(77, 512)
    gflops = float(out.split("FLOPs per sample: ")[1].split()[0])
    assert gflops == pytest.approx(total / 1e9, rel=0.01)
    assert plan_main([str(RECIPES / "gpt_124m.yaml"), "--gpus", "7"]) == 2
    assert "not divisible" in capsys.readouterr().err
    # what training refuses, plan refuses too (it printed "-5 steps take -0.0 h")
    steps = ["train.steps=-5", "schedule.warmup_steps=0"]
    assert plan_main([str(RECIPES / "quickstart.yaml"), "--gpus", "1", *steps]) == 2
    assert "train.steps must be positive" in capsys.readouterr().err
    for bad, why in [("--mfu=nan", "finite"), ("--mfu=2", "(0, 1]"), ("--gpus=x", "invalid int")]:
        with pytest.raises(SystemExit) as exit_:
            plan_main([str(RECIPES / "clip_vit_b16.yaml"), "--gpus", "64", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and why in err, err


def test_a_recipes_sources_replace_the_default_synthetic_source() -> None:
    # `data.sources` is the recipe's whole map: no default synthetic `train` source is
    # merged in for an objective that leaves `source` unset to read silently
    from mmssl.train.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {"data": {"sources": {"digits": {"urls": "synthetic"}}}, "objectives": {"clip": {}}}
    )
    assert list(recipe.data.sources) == ["digits"]
    with pytest.raises(ConfigError, match="objectives.clip.source: no data source 'train'"):
        validate(recipe, world_size=1, check_files=False)


def test_overrides_may_follow_options(base: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`mmssl plan RECIPE --gpus N key=value` and `mmssl train RECIPE --validate key=value`
    take the overrides after the options as before them; `--help` shows the whole summary."""
    from mmssl.cliargs import summary
    from mmssl.train.plan import main as plan_main

    recipe = str(RECIPES / "clip_vit_b16.yaml")
    plan_main([recipe, "--gpus", "64"])  # the first may print DeepSpeed's accelerator warning
    capsys.readouterr()
    assert plan_main([recipe, "--gpus", "64", "train.micro_batch_size=256"]) == 0
    after = capsys.readouterr().out
    assert plan_main([recipe, "train.micro_batch_size=256", "--gpus", "64"]) == 0
    assert capsys.readouterr().out == after
    assert main([base[0], "--validate", "train.steps=30", *base[1:], "--world-size", "1"]) == 0
    assert "steps: 30" in capsys.readouterr().out
    assert main([base[0], "--validate", "train.stepz=30"]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err
    doc = "`mmssl x A [B]`: what it\ndoes, in two lines.\n\nDetails.\n"
    assert summary(doc) == "`mmssl x A [B]`: what it does, in two lines."


def test_recipe_yaml_mistakes_are_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A section or key given twice is refused (YAML's last-one-wins dropped `train.steps: 3`
    silently), and a malformed file says what is wrong, not only on which line."""
    runs = tmp_path / "runs"
    path = tmp_path / "twice.yaml"
    path.write_text(f"out_dir: {runs}\ntrain:\n  steps: 3\nname: x\ntrain:\n  seed: 1\n")
    err = _bad([str(path), "--validate"], capsys, runs)
    assert "line 5: not valid YAML (duplicate key 'train', first on line 2)" in err
    path.write_text("train:\n\tsteps: 3\n")
    err = _bad([str(path), "--validate"], capsys, runs)
    assert "line 2: not valid YAML (found character '\\t' that cannot start any token)" in err
    # an empty file (or `{}`) was every default: a toy model trained on synthetic data
    for text in ("", "# only a comment\n", "{}\n"):
        path.write_text(text)
        err = _bad([str(path), "--validate"], capsys, runs)
        assert "expected a mapping of settings at the top level" in err, text


def test_a_missing_recipe_argument_names_only_the_recipe(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # overrides are optional: the error named them as required too
    from mmssl.train.plan import main as plan_main

    for command, argv in ((main, []), (main, ["--validate"]), (plan_main, ["--gpus", "8"])):
        with pytest.raises(SystemExit) as exit_:
            command(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert err.endswith("error: the following arguments are required: recipe\n"), err


def test_sizes_the_layers_refuse_are_named_at_validation(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A width its attention heads do not divide passed --validate, and the run then died in
    a traceback while building the model; validation now builds it on the meta device."""
    runs = tmp_path / "runs"
    for key, override, dim, heads in (("vision", "dim=33", 33, 2), ("text", "num_heads=3", 32, 3)):
        err = _bad([*base, f"model.overrides.{key}.{override}"], capsys, runs)
        assert f"model: dim {dim} is not divisible by num_heads {heads}" in err, err
    # a zero-width projector built (zero-size Linear layers) and trained on nothing
    for key in ("hidden_dim", "out_dim"):
        err = _bad([*base, f"model.overrides.projector={{{key}: 0}}"], capsys, runs)
        assert f"model.overrides.projector.{key} must be >= 1, got 0" in err, err


def test_validate_prints_the_resolved_recipe_alone(tmp_path: Path) -> None:
    """`mmssl train R --validate > resolved.yaml` gives a recipe that loads again: DeepSpeed's
    "Setting accelerator to CPU" log line (printed to stdout when DS_ACCELERATOR is unset
    on a machine without a GPU) opened it and made it invalid YAML."""
    import subprocess
    import sys

    from train_helpers import clean_env

    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nout_dir: {tmp_path / 'runs'}\ntrain: {{steps: 3}}\n")
    env = clean_env()
    env.pop("DS_ACCELERATOR")
    cmd = [sys.executable, "-m", "mmssl.train", str(path), "--validate", "train.seed=7"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(res.stdout)
    again = load_recipe(resolved)
    assert (again.train.steps, again.train.seed) == (3, 7)
    assert again.to_dict() == load_recipe(path, ["train.seed=7"]).to_dict()


def test_an_empty_run_name_is_refused(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # `name=$RUN` with RUN unset validated, and the run wrote into out_dir itself; `../x`
    # and an absolute path put the run outside out_dir
    for name in ("", ".", "..", "../x", "a/../../x", str(tmp_path / "elsewhere")):
        err = _bad([*base, f"name={name}", "--validate"], capsys, tmp_path / "runs")
        assert f"name must name the run directory under out_dir, got {name!r}" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "elsewhere").exists()


def test_validate_with_a_world_size_but_no_rank_prints_the_error(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    """`WORLD_SIZE=2 mmssl train RECIPE --validate` outside a launcher has no RANK: a bad
    override is still one error line, not a KeyError from the line's rank prefix."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    err = _bad([*base, "--validate", "train.stpes=3"], capsys, tmp_path / "runs")
    assert "'train.stpes'" in err and "[rank" not in err


def test_epoch_mode_over_pipes_takes_the_recipes_epoch_batches(
    demo_data: str, tmp_path: Path
) -> None:
    """pipe: shards have no manifest to count: the error advised `Source.epoch_batches`, which
    a recipe could not set ("unknown key"); data.sources.NAME.epoch_batches is that length."""
    from mmssl.data.errors import DataError
    from mmssl.train.streams import build_stream

    pipes = f"pipe:cat {demo_data}/digits/train-{{000000..000003}}.tar"
    args = [*tiny_overrides(demo_data, str(tmp_path), "p"), f"data.sources.digits.urls={pipes}"]
    recipe = load_recipe(QUICK, [*args, "data.sources.digits.mode=epoch"])
    model_cfg = validate(recipe, 1, check_files=False).model
    with pytest.raises(DataError, match=re.escape("data.sources.NAME.epoch_batches")):
        build_stream("digits", recipe.data.sources["digits"], recipe, model_cfg, 0, 1)
    recipe = load_recipe(
        QUICK, [*args, "data.sources.digits.mode=epoch", "data.sources.digits.epoch_batches=3"]
    )
    stream = build_stream("digits", recipe.data.sources["digits"], recipe, model_cfg, 0, 1)
    assert len(stream.loader) == 3
    for bad in (
        ["data.sources.digits.mode=epoch", "data.sources.digits.epoch_batches=0"],
        ["data.sources.digits.epoch_batches=3"],
    ):
        with pytest.raises(ConfigError, match="epoch_batches must be >= 1 and needs mode=epoch"):
            validate(load_recipe(QUICK, [*args, *bad]), 1, check_files=False)


def test_the_pixel_limit_of_decoded_images_is_a_recipe_key(demo_data: str, tmp_path: Path) -> None:
    """A 61 MP camera photo was an image_too_large skip that no recipe key could allow."""
    from mmssl.data.decode import DEFAULT_MAX_PIXELS
    from mmssl.train.recipe import DataConfig
    from mmssl.train.streams import build_stream

    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS
    args = tiny_overrides(demo_data, str(tmp_path), "px")
    recipe = load_recipe(QUICK, [*args, "data.max_pixels=70000000"])
    model_cfg = validate(recipe, 1, check_files=False).model
    stream = build_stream("digits", recipe.data.sources["digits"], recipe, model_cfg, 0, 1)
    assert stream.loader.plan.max_pixels == 70_000_000
    with pytest.raises(ConfigError, match="data.max_pixels must be >= 1"):
        validate(load_recipe(QUICK, [*args, "data.max_pixels=0"]), 1, check_files=False)


def test_a_held_out_source_that_trains_is_refused(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """eval.sources may not name a source an objective reads, nor one listing its shards:
    the 'held-out' loss was measured on training data without a word."""
    recipe = load_recipe(QUICK, tiny_overrides("/x", "/y", "n"))
    recipe.eval.every, recipe.eval.sources["digits"] = 2, "digits"
    del recipe.data.sources["digits_test"]
    with pytest.raises(ConfigError, match="eval.sources.digits: 'digits' is a training source"):
        validate(recipe, 1, check_files=False)
    recipe = load_recipe(QUICK, tiny_overrides("/x", "/y", "n"))
    recipe.eval.every = 2
    recipe.data.sources["digits_test"].urls = recipe.data.sources["digits"].urls
    with pytest.raises(ConfigError, match="'digits_test' shares shards with a training source"):
        validate(recipe, 1, check_files=False)


def test_every_objective_weighted_0_is_refused(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # the loss was 0 and the optimizer stepped on weight decay alone; one 0 is an ablation
    weights = [f"objectives.{k}.weight=0" for k in load_recipe(QUICK, []).objectives]
    err = _bad([*base, *weights], capsys, tmp_path)
    assert "every weight is 0" in err
    validate(
        load_recipe(QUICK, [*tiny_overrides("/x", "/y", "n"), weights[0]]), 1, check_files=False
    )


def test_a_model_name_that_is_an_export_says_its_weights_are_not_loaded(tmp_path, caplog):
    """A recipe naming an export as its model trained from random weights without a word (the
    run record kept the export's path, as if warm-started); create_model warned, training
    did not."""
    import logging

    from train_helpers import synthetic_recipe

    import mmssl
    from mmssl.models.io import save_pretrained
    from mmssl.train.recipe import load_recipe, validate

    export = save_pretrained(mmssl.create_model("test_tiny_clip"), tmp_path / "exp")
    recipe = synthetic_recipe(tmp_path, "warm", 1)
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        validate(load_recipe(recipe), world_size=1, check_files=False)
        assert "is an export" not in caplog.text
        validate(load_recipe(recipe, [f"model.name={export}"]), world_size=1, check_files=False)
    assert "is an export" in caplog.text and "model.safetensors is not loaded" in caplog.text


def test_numba_backend_without_numba(
    base: list[str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reloaded_compiled: None,
) -> None:
    """backend numba on a machine without numba is refused before the run starts (it died at
    the first batch, in a data worker); backend auto trains with torch then."""
    import sys

    for name in ("numba", "mmssl.data.fastviews", "mmssl.data.fastdraws"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    runs = tmp_path / "runs"
    err = _bad([*base, "data.augment.backend=numba"], capsys, runs)
    assert "data.augment.backend: backend numba, but numba cannot be imported" in err
    err = _bad([*base, "data.view_augment=[{}, {backend: numba}]"], capsys, runs)
    assert "data.view_augment[1].backend: backend numba, but numba cannot be" in err
    # every view overrides it back: nothing renders with numba
    both = "data.view_augment=[{backend: auto}, {backend: torch}]"
    assert main([*base, "data.augment.backend=numba", both, "--validate"]) == 0
    assert main([*base, "data.augment.backend=auto", "--validate"]) == 0
    capsys.readouterr()
    # a recipe for another machine (check_files=False, as `mmssl plan`) is not asked for numba
    validate(load_recipe(base[0], [*base[1:], "data.augment.backend=numba"]), check_files=False)


def test_numba_backend_with_numba_switched_off(
    base: list[str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reloaded_compiled: None,
) -> None:
    """An installed numba that cannot compile (NUMBA_DISABLE_JIT; a read-only install
    without a cache folder, as mmssl.data.decode.compiled_problem words it) passed
    validation, and the run died at its first batch saying 'needs numba'."""
    numba = pytest.importorskip("numba")
    from mmssl.data import fastdraws, fastviews  # noqa: F401  # compiled before the switch

    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    err = _bad([*base, "data.augment.backend=numba"], capsys, tmp_path / "runs")
    assert err == (
        "mmssl train: error: data.augment.backend: backend numba, but NUMBA_DISABLE_JIT is "
        "set, so numba compiles nothing; unset it; or use backend auto (torch renders then)\n"
    )


def test_fuzzed_values_are_one_line_errors(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """What a fuzzer of the overrides found ending in a traceback (or never ending): a zero
    patch size, sizes past what torch can allocate, a depth of 2**31 (validation builds the
    model on meta), paths too long for the file system, and `mmssl plan` skipping the
    objective checks `--validate` makes."""
    from mmssl.train.plan import main as plan_main

    runs = tmp_path / "runs"
    vision = "model.overrides.vision"
    assert "patch_size must be positive, got 0" in _bad(
        [*base, f"{vision}.patch_size=0"], capsys, runs
    )
    err = _bad([*base, f"{vision}.dim=2147483648"], capsys, runs)
    assert err.startswith("mmssl train: error: model: ") and "overflow" in err.lower()
    err = _bad([*base, f"{vision}.block.mlp_ratio=1e300"], capsys, runs)
    assert "model: " in err
    err = _bad([*base, f"{vision}.depth=2147483648"], capsys, runs)
    assert "model.overrides.vision.depth: 2147483648 layers; at most 4096" in err
    long = "a" * 300
    for key in ("train.deepspeed", "data.tokenizer", "base_dir"):
        assert "File name too long" in _bad([*base, f"{key}={long}"], capsys, runs)
    for bad in ("objectives.simclr.temperature=0", "objectives.clip.gather=no"):
        assert plan_main([base[0], "--gpus", "1", *base[1:], bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mmssl plan: error: "), err


def test_a_descriptor_layout_other_than_the_pipelines_is_refused(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    """A layout registered beside v1 (here v1's groups, crop first) passed validation, and
    the model read the pipeline's v1 descriptors, and its own neutral one, by it."""
    from mmssl import descriptor

    v1 = descriptor.DESCRIPTOR_V1
    order = ["crop", "blur", "color", "color_diff", "grayscale"]
    groups = [(g.name, g.dim, g.binary) for n in order for g in v1.groups if g.name == n]
    neutral = (0.5, 0.5, 1.0, 1.0) + (0.0,) * 9
    v2 = descriptor.DescriptorLayout("v2", descriptor._contiguous(groups), neutral)
    monkeypatch.setitem(descriptor.LAYOUTS, "v2", v2)
    cond = "model.overrides.condition={source: descriptor, layout: v2, dim: 8, hidden_dim: 8}"
    err = _bad([*base, cond, "model.overrides.vision.cond_dim=8"], capsys, tmp_path / "runs")
    assert err == (
        "mmssl train: error: model condition.layout 'v2': the data pipeline writes descriptor "
        "layout 'v1', which the model would read as 'v2'\n"
    )


def test_a_key_of_a_model_file_is_named_in_the_file(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A misspelt key inside the JSON that model.name names was reported as
    'model.overrides.vision.dept', a key the recipe does not have, and the file unnamed."""
    import json

    from mmssl.models.registry import ModelFileError, model_config_dict, resolve_model_config

    cfg = model_config_dict("test_tiny_simclr")
    cfg["vision"]["dept"] = cfg["vision"].pop("depth")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    runs = tmp_path / "runs"
    err = _bad([*base, f"model.name={path}"], capsys, runs)
    assert err.startswith(
        f"mmssl train: error: model.name: {path}: unknown key 'model.vision.dept'"
    ), err
    with pytest.raises(ModelFileError, match=f"^{path}: unknown key 'model.vision.dept'"):
        resolve_model_config(str(path), embed_dim=8)  # the overrides do not touch it
    path.write_text("{not json", encoding="utf-8")  # the file's too, not "model.overrides.json"
    err = _bad([*base, f"model.name={path}"], capsys, runs)
    assert err.startswith(f"mmssl train: error: model.name: {path}: not valid JSON"), err
    # an override's own mistake is still the override's, also on a good file
    path.write_text(json.dumps(model_config_dict("test_tiny_simclr")), encoding="utf-8")
    err = _bad([*base, f"model.name={path}", "model.overrides.vision.dpth=2"], capsys, runs)
    assert "unknown key 'model.overrides.vision.dpth'" in err and str(path) not in err
    # and an override that mends the file's error is the user's word
    bad = model_config_dict("test_tiny_simclr")
    bad["vision"].update(pool="token", class_token=False)
    path.write_text(json.dumps(bad), encoding="utf-8")
    assert resolve_model_config(str(path), **{"vision.class_token": True}).vision.class_token


def test_validation_and_the_run_agree_on_the_tokenizer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: str
) -> None:
    """An image-only run never reads data.tokenizer, yet the run loaded it (a misspelt one
    ended it after --validate said ok); a model with a text tower pins it for its export, and
    --validate now checks it loads."""
    recipe = {
        "name": "img",
        "out_dir": str(tmp_path / "runs"),
        "model": {"name": "test_tiny_simclr"},  # no text tower
        "data": {"sources": {"train": {"urls": "synthetic", "kind": "image"}}, "views": 2},
        "objectives": {"simclr": {"source": "train"}},
        "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
        "logging": {"every": 1, "tensorboard": False, "progress": False},
    }
    path = tmp_path / "img.yaml"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    typo = "data.tokenizer=defualt"
    assert main([str(path), typo, "--validate"]) == 0
    assert main([str(path), typo]) == 0
    assert (tmp_path / "runs" / "img" / "summary.md").is_file()
    capsys.readouterr()
    text_tower = [str(path), typo, "model.name=test_tiny_clip", "name=clip"]
    err = _bad([*text_tower, "--validate"], capsys, tmp_path / "none")
    # both places a relative path is looked for: the working directory, the recipe's folder
    assert err.startswith("mmssl train: error: data.tokenizer: 'defualt' is not 'default', ")
    assert f"{Path.cwd() / 'defualt'} or {tmp_path / 'defualt'}" in err
    # and one with more ids than the tower, which evaluation would refuse of its export, on
    # real images (synthetic data has its own ids)
    shards = f"data.sources.train.urls={demo_data}/digits/train-{{000000..000014}}.tar"
    err = _bad([*text_tower[:1], *text_tower[2:], shards, "--validate"], capsys, tmp_path / "none")
    assert "data.tokenizer 'default' has 8192 ids but the model's text vocab_size is" in err


def test_a_task_of_an_unknown_objective_type_is_refused_when_built() -> None:
    """A recipe's objective types are checked; one built in Python was accepted and its
    forward ended in a bare KeyError."""
    from mmssl import create_model
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    with pytest.raises(ValueError, match="objective 'mine': unknown type 'mine'; one of"):
        Task(create_model("test_tiny_simclr"), {"mine": ObjectiveConfig(type="mine")})


@pytest.mark.parametrize("broken", ["fastviews", "fastdraws"])
def test_backend_numba_is_refused_when_either_renderer_cannot_run(monkeypatch, broken):
    import mmssl.data.decode as decode
    from mmssl.train.recipe import DataConfig, _check_numba

    monkeypatch.setattr(
        decode, "compiled_problem", lambda name: f"{name} is broken" if name == broken else None
    )
    data = DataConfig(views=2, augment={"backend": "numba"})
    with pytest.raises(
        ConfigError, match=f"data.augment.backend: backend numba, but {broken} is broken"
    ):
        _check_numba(data)


@pytest.mark.parametrize("name", ["default", "clip"])
def test_a_named_tokenizer_that_cannot_load_says_its_own_reason(name, monkeypatch) -> None:
    """A relative path found nowhere names both places looked; "clip" without open_clip (or a
    missing shipped default) was said to be neither "default" nor "clip"."""
    import mmssl.tokenizer
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import tokenizer

    def missing(_name):
        raise FileNotFoundError(f"{_name}: its own reason")

    monkeypatch.setattr(mmssl.tokenizer, "get_tokenizer", missing)
    with pytest.raises(ConfigError, match=f"^data.tokenizer: {name}: its own reason$"):
        tokenizer(recipe_from_dict({"data": {"tokenizer": name}}))


def test_an_existing_tokenizer_folder_without_a_tokenizer_says_so(tmp_path, monkeypatch) -> None:
    """Found, it is not "found neither here nor there": get_tokenizer's own reason stands."""
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer file"):
        tokenizer(recipe_from_dict({"data": {"tokenizer": "tok"}}))
