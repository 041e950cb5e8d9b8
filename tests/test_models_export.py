"""Exported models: save_pretrained is all or nothing (an interrupted or failed export leaves
no mixed files), `mmssl export` errors are one line, and loading checks config.json's values
and that the weights fit it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from model_helpers import small

import mmssl
from mmssl.models.io import load_pretrained, save_pretrained
from mmssl.schema import ConfigError


def _tiny_export(tmp_path):
    torch.manual_seed(0)
    model = small("test_tiny_clip").eval()
    return model, save_pretrained(model, tmp_path / "export")


def test_export_is_all_or_nothing_and_readable_by_others(tmp_path):
    import json
    import os
    import stat

    model, out = _tiny_export(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json"):  # safetensors alone makes its file 0600
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~mask, name
    # config.json cannot be replaced (a directory is in the way): the old weights must stay
    weights = (out / "model.safetensors").read_bytes()
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(FileExistsError, match=r"config\.json exists and is not a file"):
        save_pretrained(model, out)
    assert (out / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # a failure between the two writes leaves both old files and no temporaries
    (out / "config.json").rmdir()
    (out / "config.json").write_text(json.dumps({"old": 1}))
    with pytest.raises(TypeError):
        save_pretrained(model, out, extra={"recipe": object()})  # not JSON: fails after weights
    assert (out / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "config.json").read_text()) == {"old": 1}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pretrained(model, out / "config.json")


def test_export_interrupted_between_its_renames_is_no_export(tmp_path, monkeypatch):
    """An interruption after the new weights took their place and before the new config did
    left them beside the old config.json, which then loaded as one export."""
    import os

    from mmssl.models import io

    model, out = _tiny_export(tmp_path)
    save_pretrained(model, out, {"recipe": "old"})
    renames, real = [], os.replace

    def interrupted(src, dst):
        if renames:  # the second rename, config.json's
            raise KeyboardInterrupt
        renames.append(dst)
        real(src, dst)

    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(io.os, "replace", interrupted)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, out, {"recipe": "new"})
    monkeypatch.undo()
    assert [p.name for p in renames] == ["model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # no temporaries
    assert (out / "model.safetensors").read_bytes() != before  # the new weights, alone
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(out)
    save_pretrained(model, out, {"recipe": "new"})  # the next export completes it
    assert io.read_config(out)["recipe"] == "new"


def test_export_cli_out_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    from mmssl.train import export

    model, _ = _tiny_export(tmp_path)
    monkeypatch.setattr(export, "export_run", lambda run, out, tag: save_pretrained(model, out))
    (tmp_path / "file").write_text("keep\n")
    assert export.main([str(tmp_path), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmssl export: error: ") and "not a directory" in err
    assert len(err.strip().splitlines()) == 1 and (tmp_path / "file").read_text() == "keep\n"


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("norm_eps", float("nan"), r"model\.vision\.block\.norm_eps must be a finite number"),
        ("norm_eps", -1.0, r"model\.vision\.block\.norm_eps must be > 0"),
        ("mlp_ratio", 0.0, r"model\.vision\.block\.mlp_ratio must be > 0"),
    ],
)
def test_loaded_config_values_are_checked(tmp_path, key, value, match):
    import json

    _, out = _tiny_export(tmp_path)
    data = json.loads((out / "config.json").read_text())
    data["model"]["vision"]["block"][key] = value
    (out / "config.json").write_text(json.dumps(data))  # json writes NaN as in the report
    with pytest.raises(ConfigError, match=r"config\.json: " + match):
        mmssl.load_encoder(str(out))


def test_a_config_json_naming_a_key_twice_is_refused(tmp_path):
    # a hand-edited config.json kept the last of two equal keys
    _, out = _tiny_export(tmp_path)
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text.replace('"model": {', '"model": {"vision": {}, ', 1))
    with pytest.raises(ConfigError, match=r"config\.json: key 'vision' is given twice"):
        mmssl.load_encoder(str(out))


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    """A config.json of another width next to the weights (copied from another export), or
    integer tensors where the model has floats, is one ValueError naming both files, not
    torch's RuntimeError from load_state_dict, and no int silently cast into a float."""
    import json

    from safetensors.torch import load_file, save_file

    model, out = _tiny_export(tmp_path)
    good = (out / "config.json").read_text()
    data = json.loads(good)
    data["model"]["vision"]["dim"] *= 2  # same keys, every vision tensor another shape
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*config\.json") as e:
        mmssl.load_encoder(str(out))
    dim = model.cfg.vision.dim
    assert f"visual.cls_token: (1, 1, {dim}) vs (1, 1, {2 * dim})" in str(e.value)
    (out / "config.json").write_text(good)
    state = load_file(str(out / "model.safetensors"))
    state["logit_scale"] = torch.tensor(3)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"dtypes .*logit_scale: torch\.int64 vs torch\.float32"):
        mmssl.load_encoder(str(out))


def test_load_encoder_on_a_run_directory_says_export_it(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model: {name: test_tiny_clip}\n")
    with pytest.raises(FileNotFoundError, match=r"training run directory.*mmssl export"):
        mmssl.load_encoder(str(tmp_path))


def test_export_module_runs_as_a_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmssl.train.export", str(tmp_path / "no_run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "mmssl export: error: " in proc.stderr


def test_a_model_saved_after_a_task_was_built_on_it_loads(tmp_path):
    """The Task holds 0-d parameters as (1,) for DeepSpeed, replacing the model's own in
    place; save_pretrained then wrote a (1,) logit_scale that load_pretrained refused.  The
    loaded model has it 0-d, as a fresh model does, with the value saved."""
    from mmssl.tokenizer import get_tokenizer
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    torch.manual_seed(0)
    vocab = {"vocab_size": get_tokenizer().vocab_size}
    model = mmssl.create_model("test_tiny_clip", text=vocab)
    Task(model, {"clip": ObjectiveConfig(type="clip", source="s")})
    assert model.logit_scale.shape == (1,)  # as the Task holds it
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    loaded = load_pretrained(save_pretrained(model, tmp_path / "m"))
    assert loaded.logit_scale.shape == mmssl.create_model("test_tiny_clip").logit_scale.shape
    assert loaded.logit_scale.shape == () and loaded.logit_scale.item() == 2.5
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.visual.encode(images), model.visual.encode(images))


def test_unique_state_dict_allocates_no_second_model() -> None:
    """Finding the 0-d parameters builds the config's model on the meta device: a real one
    allocated (and randomly initialised) a second copy of the weights on every save.
    Reference: the bytes the model's own parameters hold."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import mmssl
    from mmssl.models.io import unique_state_dict

    model = mmssl.create_model("test_tiny_clip")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    class Allocations(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided):
                if isinstance(out, torch.Tensor) and out.device.type != "meta":
                    self.bytes += out.numel() * out.element_size()
            return out

    with Allocations() as seen:
        state = unique_state_dict(model)
    assert set(state) and seen.bytes < 0.01 * weights, (seen.bytes, weights)
