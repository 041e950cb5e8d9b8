"""The engine's pieces (no training): a task's objectives (AugSelf's group weights, unknown
types), the parameter groups of weight decay, the temperatures the metrics report, the
warmup-cosine schedule; and `mmssl plan` against the ZeRO memory and FLOP formulas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recipe_helpers import _bad
from recipe_helpers import base as base  # a fixture
from torch import nn
from train_helpers import RECIPES, tiny_clip_batch

from mmssl.train.engine import WarmupCosine, param_groups
from mmssl.train.recipe import load_recipe, validate


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


def test_a_task_of_an_unknown_objective_type_is_refused_when_built() -> None:
    """A recipe's objective types are checked; one built in Python was accepted and its
    forward ended in a bare KeyError."""
    from mmssl import create_model
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    with pytest.raises(ValueError, match="objective 'mine': unknown type 'mine'; one of"):
        Task(create_model("test_tiny_simclr"), {"mine": ObjectiveConfig(type="mine")})
