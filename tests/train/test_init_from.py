"""train.init_from: a run starts from an export's weights (those its model shares), keeps its
own initialisation elsewhere, refuses exports it cannot start from, and a resume does not
read the export again."""

from __future__ import annotations

import json
import logging
import shutil
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
# an update too small to see: the weights after a step are the ones the run started from
STILL = ["optim.lr=1e-12", "optim.weight_decay=0"]


def _train(path: Path, overrides: list[str]) -> dict:
    from mmssl.train.loop import train

    recipe = load_recipe(str(path), overrides)
    return train(recipe, validate(recipe))


def _vit_export(tmp_path: Path, name: str = "vit", **overrides) -> tuple[Path, dict]:
    torch.manual_seed(123)
    model = mmssl.create_model("test_tiny_vit", **overrides)
    out = save_pretrained(model, tmp_path / name)
    return out, load_file(str(out / "model.safetensors"))


def _weights(tmp_path: Path, run: str) -> dict:
    return load_file(
        str(export_run(tmp_path / run, tmp_path / f"{run}_export") / "model.safetensors")
    )


def test_a_run_starts_from_the_weights_its_model_shares_with_the_export(tmp_path, caplog):
    """A CLIP run from an image encoder's export (LiT's start): the vision tower is the
    export's, the text tower and projections are the run's own initialisation."""
    vit, theirs = _vit_export(tmp_path)
    with caplog.at_level(logging.INFO, logger="mmssl.train"):
        _train(synthetic_recipe(tmp_path, "warm", 1), [f"train.init_from={vit}", *STILL])
    _train(synthetic_recipe(tmp_path, "cold", 1), STILL)
    warm, cold = _weights(tmp_path, "warm"), _weights(tmp_path, "cold")
    assert set(theirs) < set(warm) and theirs  # every vision tensor of the export is the run's
    for name, tensor in theirs.items():
        torch.testing.assert_close(warm[name], tensor, rtol=0, atol=1e-8)
    # the control: without init_from the vision tower is another, so the comparison can fail
    assert max((cold[n] - t).abs().max().item() for n, t in theirs.items()) > 0.01
    for name in set(warm) - set(theirs):  # the rest as a run without init_from starts
        torch.testing.assert_close(warm[name], cold[name], rtol=0, atol=1e-8)
    said = [r for r in caplog.records if "train.init_from" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]  # shown: the text tower was not loaded
    assert f"train.init_from {vit}: loaded {len(theirs)} tensors" in caplog.text
    assert "text.trunk (24)" in caplog.text and "not used: none" in caplog.text
    # a whole CLIP, its 0-d logit_scale too (the Task holds 0-d parameters as (1,))
    torch.manual_seed(7)
    clip = save_pretrained(mmssl.create_model("test_tiny_clip"), tmp_path / "clip")
    _train(synthetic_recipe(tmp_path, "whole", 1), [f"train.init_from={clip}", *STILL])
    theirs, whole = load_file(str(clip / "model.safetensors")), _weights(tmp_path, "whole")
    assert whole.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(whole[name], tensor, rtol=0, atol=1e-8)


def test_a_resume_reads_its_checkpoint_not_the_export(tmp_path, caplog):
    vit, _ = _vit_export(tmp_path)
    recipe = synthetic_recipe(tmp_path, "r", 2)
    _train(recipe, [f"train.init_from={vit}", "train.stop_at=1"])
    shutil.rmtree(vit)  # gone: the resume (and its validation) must not need it
    caplog.clear()  # the first run's report of what it loaded
    with caplog.at_level(logging.INFO, logger="mmssl.train"):
        out = _train(recipe, [f"train.init_from={vit}"])
    assert out["final_step"] == 2 and "train.init_from" not in caplog.text
    # a fresh start needs it
    with pytest.raises(ConfigError, match="no exported model directory at"):
        validate(load_recipe(str(recipe), [f"train.init_from={vit}", "name=fresh"]), 1)
    # a save cut short (no manifest) is no resume: the run would start from the export
    (tmp_path / "cut" / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no exported model directory at"):
        validate(load_recipe(str(recipe), [f"train.init_from={vit}", "name=cut"]), 1)


def _refused(tmp_path: Path, init: Path | str, *more: str) -> str:
    recipe = synthetic_recipe(tmp_path, "bad", 1)
    with pytest.raises(ConfigError) as err:
        validate(load_recipe(str(recipe), [f"train.init_from={init}", *more]), 1)
    return str(err.value)


def test_exports_a_run_cannot_start_from_are_refused_at_validation(tmp_path):
    wide, _ = _vit_export(tmp_path, "wide", **{"vision.dim": 48})
    said = _refused(tmp_path, wide)
    assert (
        "tensors differ in shape or kind" in said
        and "(48, 3, 8, 8) float vs (32, 3, 8, 8) float" in said
    )
    assert "context_length" not in said  # the hint is for a longer context only
    assert "no config.json" in _refused(tmp_path, tmp_path)  # a directory, but no export
    nowhere = tmp_path / "nowhere"
    assert _refused(tmp_path, nowhere).endswith(f"no exported model directory at {nowhere}")
    vit, theirs = _vit_export(tmp_path)
    # an export of another kind of model: no tensor name in common
    renamed = tmp_path / "renamed"
    shutil.copytree(vit, renamed)
    mmssl.models.io.write_safetensors(
        {f"x.{k}": v for k, v in theirs.items()}, renamed / "model.safetensors"
    )
    assert "shares no tensor name" in _refused(tmp_path, renamed)
    data = (vit / "model.safetensors").read_bytes()
    (renamed / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    assert "unreadable or damaged safetensors" in _refused(tmp_path, renamed)
    # a training run directory: export it first
    _train(synthetic_recipe(tmp_path, "run", 1), [])
    assert "mmssl export" in _refused(tmp_path, tmp_path / "run")
    assert "keep one" in _refused(tmp_path, vit, f"checkpoint.resume={tmp_path / 'run'}")


def test_an_architecture_that_computes_otherwise_with_the_same_shapes_is_refused(tmp_path):
    """Another activation or head count keeps every shape: the weights loaded silently into a
    model computing another function (open_clip's OpenAI models use quick_gelu)."""
    quick, _ = _vit_export(tmp_path, "quick", **{"vision.block.act": "quick_gelu"})
    said = _refused(tmp_path, quick)
    assert "architecture differs" in said and "vision.block.act: 'quick_gelu' vs 'gelu'" in said
    heads, _ = _vit_export(tmp_path, "heads", **{"vision.num_heads": 4})
    assert "vision.num_heads: 4 vs 2" in _refused(tmp_path, heads)
    mean, _ = _vit_export(tmp_path, "mean", **{"vision.pool": "mean"})
    assert "vision.pool: 'mean' vs 'token'" in _refused(tmp_path, mean)
    # a shared trunk is saved once, under visual.: loaded into two trunks, text's stayed random
    shared = save_pretrained(mmssl.create_model("test_tiny_clip_shared"), tmp_path / "shared")
    norm = "model.overrides.vision.block.norm_eps=1e-5"  # the rest as the export's
    assert _refused(tmp_path, shared, norm).endswith(
        "(export vs this run): shared_trunk: True vs False; build it with "
        "model.name=<the export folder> or set those keys in model.overrides"
    )
    # the same overrides build the export's architecture; conditioning added to it is free
    recipe = synthetic_recipe(tmp_path, "ok", 1)
    fixed = ["model.overrides.vision.block.act=quick_gelu", f"train.init_from={quick}"]
    validate(load_recipe(str(recipe), fixed), 1)
    simclr = ["data.sources.train.kind=image", "data.views=2", "objectives={simclr: {}}"]
    vit, _ = _vit_export(tmp_path)
    cond = ["model.name=test_tiny_vit_cond", f"train.init_from={vit}", *simclr]
    validate(load_recipe(str(recipe), cond), 1)
    # without a learned position table another image size loads (rope, sincos)
    rope, _ = _vit_export(tmp_path, "rope", **{"vision.pos_embed": "rope"})
    bigger = ["model.overrides.vision={pos_embed: rope, image_size: 64}", f"train.init_from={rope}"]
    validate(load_recipe(str(recipe), bigger), 1)


def test_text_weights_of_another_tokenizer_are_refused(tmp_path):
    torch.manual_seed(0)
    clip = mmssl.create_model("test_tiny_clip")
    other = {"name": "/elsewhere/tok.json", "sha256": "0" * 64}
    export = save_pretrained(clip, tmp_path / "clip", {"tokenizer": other})
    assert "another tokenizer" in _refused(tmp_path, export)
    same = save_pretrained(clip, tmp_path / "same", {"tokenizer": {"name": "/x"}})  # no sha256
    validate(load_recipe(str(synthetic_recipe(tmp_path, "ok", 1)), [f"train.init_from={same}"]), 1)


def test_a_model_name_that_is_its_init_export_does_not_warn(tmp_path, caplog):
    vit, _ = _vit_export(tmp_path)
    recipe = synthetic_recipe(tmp_path, "r", 1)
    data = json.loads(recipe.read_text())
    data["model"] = {"name": str(vit)}
    data["data"]["sources"]["train"]["kind"] = "image"
    data["objectives"] = {"simclr": {}}
    data["data"]["views"] = 2
    recipe.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        validate(load_recipe(str(recipe)), 1, check_files=False)
        assert "is an export" in caplog.text
        caplog.clear()
        validate(load_recipe(str(recipe), [f"train.init_from={vit}"]), 1)
    assert "is an export" not in caplog.text


def test_position_tables_follow_the_runs_image_size_and_context_length(tmp_path, caplog):
    """A warm start at another resolution (timm's `pretrained` at another img_size) resamples
    the learned image table as timm does, and a shorter context keeps the text table's first
    rows (nanoGPT's crop_block_size); a longer context has nothing to start from."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(5)
    clip = save_pretrained(mmssl.create_model("test_tiny_clip"), tmp_path / "clip")
    theirs = load_file(str(clip / "model.safetensors"))
    sizes = ["model.overrides={vision: {image_size: 48}, text: {context_length: 16}}"]
    with caplog.at_level(logging.INFO, logger="mmssl.train"):
        _train(synthetic_recipe(tmp_path, "big", 1), [*sizes, f"train.init_from={clip}", *STILL])
    warm = _weights(tmp_path, "big")
    assert warm["visual.pos_embed"].shape == (1, 1 + 6 * 6, 32)  # 48 px, patches of 8
    timm = resample_abs_pos_embed(theirs["visual.pos_embed"], [6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(warm["visual.pos_embed"], timm, rtol=0, atol=1e-6)
    torch.testing.assert_close(warm["text.pos_embed"], theirs["text.pos_embed"][:16])
    for name in set(theirs) - {"visual.pos_embed", "text.pos_embed"}:
        torch.testing.assert_close(warm[name], theirs[name], rtol=0, atol=1e-8)
    assert "visual.pos_embed resampled from a 4x4 to a 6x6 grid" in caplog.text
    assert "text.pos_embed cut to its first 16 of 32 positions" in caplog.text
    # warnings: shown without any logging set up (the summary line is INFO when all loads)
    said = [r for r in caplog.records if ".pos_embed " in r.getMessage()]
    assert len(said) == 2 and all(r.levelno == logging.WARNING for r in said)
    longer = _refused(tmp_path, clip, "model.overrides.text.context_length=64")
    assert "(32, 32) float vs (64, 32) float" in longer and "may shrink, not grow" in longer


def test_image_weights_normalised_otherwise_are_refused(tmp_path):
    """Image weights trained on inputs normalised one way and fed another's (timm, open_clip
    and Hugging Face carry the normalisation with the weights; the export records it)."""
    torch.manual_seed(0)
    vit = mmssl.create_model("test_tiny_vit")
    half = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    export = save_pretrained(vit, tmp_path / "half", {"preprocess": half})
    said = _refused(tmp_path, export)
    assert "normalised with mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in said
    assert "this run normalises with mean None, std None. Set data.mean and data.std" in said
    same = ["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]"]
    recipe = synthetic_recipe(tmp_path, "ok", 1)
    validate(load_recipe(str(recipe), [f"train.init_from={export}", *same]), 1)
    unit = save_pretrained(vit, tmp_path / "unit", {"preprocess": {"mean": None, "std": None}})
    assert "(None: images in [0, 1])" in _refused(tmp_path, unit, *same)
    # an export that does not record it (an import saved without) is not checked
    validate(load_recipe(str(recipe), [f"train.init_from={_vit_export(tmp_path)[0]}", *same]), 1)


def test_a_context_hint_only_where_the_context_grows(tmp_path):
    wide = save_pretrained(mmssl.create_model("test_tiny_clip", **{"text.dim": 64}), tmp_path / "w")
    said = _refused(tmp_path, wide, "model.overrides.text.context_length=16")
    assert "text.pos_embed: (32, 64) float vs (16, 32) float" in said
    assert "may shrink" not in said


@pytest.mark.parametrize(
    "field,value",
    [
        ("vision.block.norm_eps", 1e-3),
        ("text.block.norm_eps", 1e-3),
        ("text.causal", False),
        ("text.pool", "mean"),
    ],
)
def test_a_warm_start_into_another_function_with_the_same_shapes_is_refused(
    tmp_path: Path, field: str, value: object
) -> None:
    """A warm start checks the fields that change the towers' function without changing a
    shape: the reference, the export's weights loaded into the run's default model, computes
    something else than the exported model."""
    torch.manual_seed(0)
    theirs = mmssl.create_model("test_tiny_clip", **{field: value}).eval()
    export = save_pretrained(theirs, tmp_path / "exp")
    # the reference: the export's weights in the run's (default) architecture compute
    # something else than the export's own model
    ours = mmssl.create_model("test_tiny_clip").eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 500, (2, 32))
    with torch.no_grad():
        a, b = theirs(images=images, text=ids), ours(images=images, text=ids)
    tower = 0 if field.startswith("vision") else 1  # forward: (image, text) embeddings
    assert not torch.allclose(a[tower], b[tower], atol=1e-6)
    recipe = synthetic_recipe(tmp_path, "bad", 1)
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        validate(load_recipe(str(recipe), [f"train.init_from={export}"]), 1)


def test_a_relative_init_from_found_nowhere_names_both_places_looked(tmp_path, monkeypatch):
    """Looked for from the working directory, then the recipe's: the error named only the
    second, pointing the user away from the path they typed."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    recipe = synthetic_recipe(tmp_path, "bad", 1)
    said = _refused(tmp_path, "runs/nope")
    assert said.endswith(
        f"no exported model directory at {tmp_path / 'cwd' / 'runs/nope'} or "
        f"{recipe.parent / 'runs/nope'}"
    ), said
