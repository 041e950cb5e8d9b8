"""What an export records beside the weights and what loading makes of it: the learned logit
scale and bias of the contrastive objectives, and the descriptor layout version."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmssl.train.export as export
from mmssl.eval.loading import EvalError, load_model
from mmssl.models.io import load_pretrained, save_pretrained
from mmssl.models.multimodal import MultimodalModel
from mmssl.schema import ConfigError
from mmssl.train.recipe import model_config, recipe_from_dict
from mmssl.train.tasks import Task


def _export_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objectives: dict) -> Task:
    """export_run of a Task's state (no training, no DeepSpeed checkpoint: the checkpoint
    reader and the recorded recipe are replaced by the Task and its recipe)."""
    recipe = recipe_from_dict(
        {"name": "lg", "model": {"name": "test_tiny_clip"}, "objectives": objectives}
    )
    torch.manual_seed(0)
    task = Task(MultimodalModel(model_config(recipe)), recipe.objectives)
    with torch.no_grad():
        if "siglip" in objectives:
            task.losses["siglip"].logit_scale.fill_(math.log(7.5))  # defaults: log 10, -10
            task.losses["siglip"].logit_bias.fill_(-3.25)
        task.model.logit_scale.fill_(math.log(20.0))  # default log(1 / 0.07)
    state = {k: v.detach().clone() for k, v in task.state_dict().items()}
    monkeypatch.setattr(export, "checkpoint_state", lambda ckpt_dir, tag: state)
    monkeypatch.setattr(export, "_read_recipe", lambda run, folder: recipe)
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "run" / "recipe.yaml").write_text("name: lg\n")
    export.export_run(tmp_path / "run", tmp_path / "export", "step_00000001")
    return task.eval()


def test_an_export_carries_the_learned_logit_scale_and_bias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SigLIP's scale and bias belong to its loss, not the model: the export lost them, and
    with them the zero-shot probabilities sigmoid(t cos + b) the trained model gives."""
    from mmssl.models.io import read_logit_params

    task = _export_task(tmp_path, monkeypatch, {"siglip": {}, "clip": {}})
    record = json.loads((tmp_path / "export" / "config.json").read_text())["logits"]
    assert record["siglip"] == {
        "type": "siglip",
        "logit_scale": pytest.approx(math.log(7.5), rel=1e-6),
        "logit_bias": -3.25,
    }
    assert record["clip"]["logit_scale"] == pytest.approx(math.log(20.0), rel=1e-6)
    loaded = load_model(tmp_path / "export")
    params = loaded.logit_params
    assert params == read_logit_params(tmp_path / "export")
    assert set(params) == {"siglip", "clip"}
    siglip, clip = params["siglip"], params["clip"]
    assert (siglip.type, clip.type) == ("siglip", "clip")
    assert siglip.logit_scale == pytest.approx(math.log(7.5), rel=1e-6)
    assert siglip.logit_bias == -3.25 and clip.logit_bias is None
    assert clip.logit_scale == pytest.approx(math.log(20.0), rel=1e-6)

    images = torch.randn(4, 3, 32, 32)
    text = torch.randint(1, 50, (5, 8))
    with torch.no_grad():
        img = loaded.model.encode_image(images)
        txt = loaded.model.encode_text(text)
        ref_img = F.normalize(task.model.encode_image(images), dim=-1)
        ref_txt = F.normalize(task.model.encode_text(text), dim=-1)
    cos = ref_img @ ref_txt.T  # (4, 5) of the model before export
    torch.testing.assert_close(siglip.probabilities(img, txt), torch.sigmoid(7.5 * cos - 3.25))
    torch.testing.assert_close(clip.probabilities(img, txt), (20.0 * cos).softmax(-1))
    # the SigLIP loss of the trained objective, from the exported probabilities alone
    p = siglip.probabilities(img[:4], txt[:4])
    eye = torch.eye(4, dtype=torch.bool)
    loss = -(torch.where(eye, p, 1 - p).log().sum() / 4)
    with torch.no_grad():
        trained = task.losses["siglip"](ref_img[:4], ref_txt[:4])
    torch.testing.assert_close(loss, trained, rtol=1e-5, atol=1e-5)


def test_a_clip_export_records_its_clamped_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the loss uses exp(logit_scale) clamped at max_logit_scale: so does the record
    _export_task(tmp_path, monkeypatch, {"clip": {"max_logit_scale": 12.0}})
    record = json.loads((tmp_path / "export" / "config.json").read_text())["logits"]
    assert record == {
        "clip": {"type": "clip", "logit_scale": pytest.approx(math.log(12.0)), "logit_bias": None}
    }


def test_a_damaged_logits_record_fails_the_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MultimodalModel(model_config(recipe_from_dict({"name": "x"})))
    for logits, says in [
        ({"s": {"type": "siglip", "logit_scale": 2.0}}, r"logits\.s\.logit_bias is missing"),
        ({"s": {"type": "sig", "logit_scale": 2.0}}, r"logits\.s must be an object with type"),
        (
            {"s": {"type": "clip", "logit_scale": float("nan"), "logit_bias": None}},
            r"logits\.s\.logit_scale must be a finite number",
        ),
    ]:
        with pytest.raises(ConfigError, match=says):  # nor is it written
            save_pretrained(model, tmp_path / "refused", {"logits": logits})
        save_pretrained(model, tmp_path)
        path = tmp_path / "config.json"  # as another tool or a hand edit leaves it
        path.write_text(json.dumps({**json.loads(path.read_text()), "logits": logits}))
        with pytest.raises(ConfigError, match=says):
            load_pretrained(tmp_path)
    assert not (tmp_path / "refused").exists()


def _with_descriptor(folder: Path, record: object) -> None:
    """Rewrite the "descriptor" of the export in `folder`, as another mmssl might write it."""
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "descriptor": record}))


def test_an_unknown_descriptor_layout_is_refused_naming_it(tmp_path: Path) -> None:
    """Only layout v1 exists; an export naming another (a newer mmssl's) loaded, and a
    descriptor-conditioned model would read its descriptors with v1's meaning."""
    from mmssl.descriptor import get_layout

    torch.manual_seed(0)
    model = MultimodalModel(model_config(recipe_from_dict({"name": "x"})))
    v1 = get_layout("v1").to_dict()
    for fine in (v1, "v1"):  # the layout, or just its version
        save_pretrained(model, tmp_path, {"descriptor": fine})
        load_pretrained(tmp_path)
    v2 = {**v1, "version": "v2"}
    for record, says in [
        (v2, r"unknown augmentation descriptor layout 'v2' \(this mmssl knows v1\)"),
        ({**v1, "dim": 14}, r"'descriptor' v1 does not match layout v1: v1\[13\]: blur 0:1"),
        ("v9", r"unknown augmentation descriptor layout 'v9'"),
        ({"dim": 13}, r"'descriptor' has no layout version: \{'dim': 13\}"),
    ]:
        _with_descriptor(tmp_path, record)  # save_pretrained refuses to write these
        with pytest.raises(ConfigError, match=says):
            load_pretrained(tmp_path)
        with pytest.raises(EvalError, match=says):
            load_model(tmp_path)
