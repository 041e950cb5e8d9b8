"""Recipes: every shipped one validates, and a bad recipe, override or command line is one
error line (unknown keys, wrong types, YAML mistakes, batch sizes, schedules, run names,
DeepSpeed JSON, objectives), with nothing written (no training).

(A recipe's data, model and tokenizer checks are in test_train_recipe_data_model.py; the
engine's pieces and `mmssl plan` in test_train_engine_pieces.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from recipe_helpers import QUICK, _bad
from recipe_helpers import base as base  # a fixture
from train_helpers import RECIPES, tiny_overrides

from mmssl.schema import ConfigError
from mmssl.train.cli import main
from mmssl.train.ds_config import deepspeed_config
from mmssl.train.recipe import load_recipe, validate

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


def test_batch_not_divisible(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _bad([*base, "train.global_batch_size=20"], capsys, tmp_path / "runs")
    assert "global_batch_size 20" in err and "micro_batch_size 8" in err
    recipe = load_recipe(QUICK, tiny_overrides("/x", "/y", "n"))
    with pytest.raises(ConfigError, match="world size 3"):
        validate(recipe, 3, check_files=False)


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
