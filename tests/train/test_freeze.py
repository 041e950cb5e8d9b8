"""train.freeze: the parameters a run does not train keep their start (random or
train.init_from's) exactly, the rest trains, DeepSpeed holds no optimizer state for them,
`mmssl plan` counts them as weights only, and bad prefixes are refused at validation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import synthetic_recipe

import mmssl
from mmssl.models.io import save_pretrained
from mmssl.schema import ConfigError
from mmssl.train.export import export_run
from mmssl.train.recipe import load_recipe, validate

pytestmark = pytest.mark.usefixtures("one_process_group")
LR = ["optim.lr=1e-2", "schedule.warmup_steps=0"]  # steps big enough to see


def _run_export(tmp_path: Path, name: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    from mmssl.train.loop import train

    recipe = load_recipe(str(synthetic_recipe(tmp_path, name, 2)), [*LR, *overrides])
    train(recipe, validate(recipe))
    return load_file(str(export_run(tmp_path / name, tmp_path / f"{name}_x") / "model.safetensors"))


def test_lit_keeps_the_locked_image_tower_and_trains_the_rest(tmp_path, caplog):
    """Locked-image tuning (LiT, open_clip's --lock-image): a CLIP run from an image tower's
    export with `visual` frozen ends with that tower exactly; the text tower, projections
    and temperature train; without the freeze the tower moves (the control)."""
    torch.manual_seed(3)
    vit = save_pretrained(mmssl.create_model("test_tiny_vit"), tmp_path / "vit")
    theirs = load_file(str(vit / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="mmssl.train"):
        locked = _run_export(tmp_path, "lit", [f"train.init_from={vit}", "train.freeze=[visual]"])
    free = _run_export(tmp_path, "free", [f"train.init_from={vit}"])
    for name, tensor in theirs.items():
        assert torch.equal(locked[name], tensor), name
    moved = max((free[n] - t).abs().max().item() for n, t in theirs.items())
    assert moved > 1e-3  # the control: trained, the tower changes
    # the rest trains: against the same run at an lr too small to move anything
    still = _run_export(tmp_path, "still", [f"train.init_from={vit}", "train.freeze=[visual]",
                                            "optim.lr=1e-12"])  # fmt: skip
    rest = [n for n in locked if not n.startswith("visual.")] + ["logit_scale"]
    assert all((locked[n] - still[n]).abs().max() > 1e-4 for n in rest)
    # the whole tower, as open_clip's lock: its CLIP projection too (at its initialisation)
    tower = {n: t for n, t in locked.items() if n.startswith("visual.")}
    assert set(tower) == set(theirs) | {"visual.proj.weight"}
    assert torch.equal(locked["visual.proj.weight"], still["visual.proj.weight"])
    count = sum(t.numel() for t in tower.values())
    assert f"train.freeze ['visual']: {len(tower)} tensors, {count} parameters" in caplog.text


def test_the_engine_holds_no_optimizer_state_for_frozen_parameters():
    """DeepSpeed's optimizer gets the trained parameters only (no moments for the frozen),
    and `mmssl plan` counts the same trained parameters; frozen weights as weights only."""
    from mmssl.train.engine import init_distributed, initialize
    from mmssl.train.loop import build_task
    from mmssl.train.plan import count_params, memory
    from mmssl.train.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {"train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4, "freeze": ["visual"]},
         "optim": {"impl": "torch"}}
    )  # fmt: skip
    resolved = validate(recipe, world_size=1)
    init_distributed()
    task = build_task(recipe, resolved.model)
    engine = initialize(task, recipe, resolved.ds_config)
    held = [p for g in engine.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in engine.module.named_parameters()}
    assert held and not any(names[id(p)].startswith("model.visual.") for p in held)
    visual = sum(p.numel() for p in task.model.visual.parameters())
    trained, exported, frozen = count_params(recipe, resolved.model)
    assert trained == sum(p.numel() for p in held) and frozen == visual
    assert trained + frozen == sum(p.numel() for p in task.parameters())
    mem = memory(trained, 0, 1, False, offload=False, frozen=frozen)
    assert mem["parameters"] == 4 * (trained + frozen) and mem["optimizer states"] == 8 * trained


def _refused(tmp_path: Path, *overrides: str) -> str:
    recipe = synthetic_recipe(tmp_path, "bad", 1)
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(str(recipe), list(overrides)), 1)
    return str(err.value)


def test_bad_freezes_are_refused_at_validation(tmp_path):
    said = _refused(tmp_path, "train.freeze=[vision]")  # the config's name, not the weights'
    assert "train.freeze: ['vision'] name no parameter" in said and "'visual'" in said
    assert "name no parameter" in _refused(tmp_path, "train.freeze=[visual.patch]")  # not a part
    everything = _refused(tmp_path, "train.freeze=[visual, text, logit_scale]")
    assert "freeze every parameter of the model: nothing of it would train" in everything
    # a resume keeps what it trains: the optimizer state holds the trained parameters only
    from mmssl.train.loop import train

    recipe = synthetic_recipe(tmp_path, "r", 2)
    first = load_recipe(str(recipe), ["train.stop_at=1"])
    train(first, validate(first))
    second = load_recipe(str(recipe), ["train.freeze=[text]"])
    with pytest.raises(ConfigError, match="keeps .*train.freeze"):
        train(second, validate(second))


def test_a_shared_trunk_is_frozen_by_either_towers_name():
    """A shared trunk is one set of tensors named under both towers (its export saves it
    once, under visual.): freezing `text` freezes it for the image tokens too."""
    from mmssl.train.freeze import apply_freeze

    model = mmssl.create_model("test_tiny_clip_shared")
    apply_freeze(model, ["text"])
    assert not any(p.requires_grad for p in model.visual.trunk.parameters())
    assert all(p.requires_grad for p in model.visual.patch_embed.parameters())


SIMCLR = ["data.sources.train.kind=image", "data.views=2", "objectives={simclr: {}}"]


def test_conditioning_added_to_a_frozen_tower_trains(tmp_path):
    """A plain encoder's export, adaLN-Zero conditioning added and the tower frozen (train
    only the conditioning): the zero-initialised modulation and gates under `visual` train
    (frozen at zero they never act), the pretrained weights stay exactly; a prefix naming
    a modulation itself freezes it."""
    from mmssl.train.freeze import frozen_names

    torch.manual_seed(4)
    vit = save_pretrained(mmssl.create_model("test_tiny_vit"), tmp_path / "vit")
    theirs = load_file(str(vit / "model.safetensors"))
    cond = ["model.name=test_tiny_vit_cond", f"train.init_from={vit}", *SIMCLR]
    out = _run_export(tmp_path, "cond", [*cond, "train.freeze=[visual]"])
    for name, tensor in theirs.items():
        assert torch.equal(out[name], tensor), name
    modulation = [n for n in out if n.endswith(("modulation.weight", "gate.weight"))]
    assert modulation and all(out[n].abs().max() > 0 for n in modulation)
    # the prefix tokens' projection (a random draw, not zero) trains too
    start = mmssl.create_model("test_tiny_vit_cond")  # the run's seed-independent shapes only
    prefix = [n for n in out if n.startswith("visual.cond_prefix.")]
    assert prefix and set(prefix) <= set(start.state_dict())
    still = _run_export(tmp_path, "still", [*cond, "train.freeze=[visual]", "optim.lr=1e-12"])
    assert all((out[n] - still[n]).abs().max() > 1e-4 for n in prefix)
    model = mmssl.create_model("test_tiny_vit_cond")
    names = frozen_names(model, ["visual"])
    assert not set(modulation + prefix) & set(names) and set(theirs) <= set(names)
    one = "visual.trunk.blocks.0.norm1.modulation"
    assert {f"{one}.weight", f"{one}.bias"} <= set(frozen_names(model, ["visual", one]))


def test_a_freeze_leaving_nothing_the_objectives_reach_stops_with_its_reason(tmp_path):
    """A CLIP model trained with SimCLR only and its image tower frozen: the text tower
    trains in name only, the loss has no gradient (DeepSpeed said "loss must be a scalar
    tensor")."""
    from mmssl.train.loop import train

    recipe = load_recipe(
        str(synthetic_recipe(tmp_path, "nothing", 1)), [*SIMCLR, "train.freeze=[visual]"]
    )
    with pytest.raises(ConfigError, match="no trained parameter reaches the loss of"):
        train(recipe, validate(recipe))
