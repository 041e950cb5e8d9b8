"""config.json of an export: unknown sections and unknown `preprocess` keys are refused (a
misspelt "preprocess" meant no normalisation in eval), and preprocess.mean/std are checked
when the file is read, by load_encoder as by eval."""

from __future__ import annotations

import json
import shutil

import pytest

import mmssl
from mmssl.eval.loading import EvalError, load_model
from mmssl.models.io import read_config, save_pretrained
from mmssl.schema import ConfigError

RGB = [0.5, 0.4, 0.3]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = mmssl.create_model("test_tiny_clip")
    pre = {"image_size": 32, "mean": RGB, "std": RGB}
    return save_pretrained(model, tmp_path_factory.mktemp("export"), {"preprocess": pre})


def _edited(export, tmp_path, edit) -> str:
    dest = tmp_path / "model"
    shutil.copytree(export, dest)
    data = json.loads((dest / "config.json").read_text())
    edit(data)
    (dest / "config.json").write_text(json.dumps(data))
    return str(dest)


def _refused(path: str) -> str:
    """The message both loaders give; they must agree."""
    with pytest.raises(ConfigError) as err:
        mmssl.load_encoder(path)
    with pytest.raises(EvalError) as eval_err:
        load_model(path)
    assert str(eval_err.value) == str(err.value)
    return str(err.value)


def test_a_misspelt_section_is_refused_naming_it_and_the_file(export, tmp_path):
    path = _edited(export, tmp_path, lambda d: d.update(pre_process=d.pop("preprocess")))
    msg = _refused(path)
    assert msg.startswith(f"{path}/config.json: unknown key 'pre_process'")
    assert "did you mean 'preprocess'?" in msg


def test_an_unknown_preprocess_key_is_refused(export, tmp_path):
    path = _edited(export, tmp_path, lambda d: d["preprocess"].update(means=RGB))
    msg = _refused(path)
    assert "unknown key 'preprocess.means'" in msg and "did you mean 'mean'?" in msg


@pytest.mark.parametrize(
    "bad, want",
    [
        ({"mean": [0.5, 0.4]}, "preprocess.mean must be 3 finite numbers"),
        ({"std": [0.5, 0.0, 0.3]}, "preprocess.std must be > 0"),
        ({"std": [0.5, float("nan"), 0.3]}, "preprocess.std must be 3 finite numbers"),
        # the 0-255 scale normalised every image to about -2; strings failed at the first image
        ({"mean": [123.675, 116.28, 103.53]}, "preprocess.mean must be in [0, 1] in every"),
        ({"std": [58.395, 57.12, 57.375]}, "preprocess.std must be at most 1 in every"),
        ({"mean": ["0.5", "0.5", "0.5"]}, "preprocess.mean must be 3 finite numbers"),
        ({"mean": "0.5"}, "preprocess.mean must be 3 finite numbers"),
        ({"std": None}, "preprocess.mean needs preprocess.std too"),
        ({"max_pixels": 0}, "preprocess.max_pixels must be a positive integer, got 0"),
        ({"max_pixels": "61MP"}, "preprocess.max_pixels must be a positive integer"),
    ],
)
def test_load_encoder_checks_mean_and_std_as_eval_does(export, tmp_path, bad, want):
    path = _edited(export, tmp_path, lambda d: d["preprocess"].update(bad))
    assert want in _refused(path)


def test_what_mmssl_writes_still_reads(export):
    assert read_config(export)["preprocess"]["mean"] == RGB
    loaded = load_model(export)
    assert loaded.preprocess.mean == tuple(RGB)


def test_eval_decodes_up_to_the_pixel_limit_training_had(export, tmp_path):
    """A run trained with data.max_pixels above the default read 61 MP photos that its eval
    refused (image_too_large): the export records the limit, eval's Preprocess keeps it."""
    from mmssl.data.decode import DEFAULT_MAX_PIXELS
    from mmssl.data.errors import DataError
    from mmssl.eval.data import iter_image_batches

    assert load_model(export).preprocess.max_pixels == DEFAULT_MAX_PIXELS  # none recorded
    path = _edited(export, tmp_path, lambda d: d["preprocess"].update(max_pixels=1000))
    pre = load_model(path).preprocess
    assert pre.max_pixels == 1000
    import io

    from PIL import Image

    from mmssl.data.shards import ShardWriter

    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PNG")
    w = ShardWriter(str(tmp_path), "s", max_count=4)
    for i in range(2):
        w.write({"__key__": f"k{i}", "png": buf.getvalue(), "txt": "x"})
    w.close()
    shards = str(tmp_path / "s-000000.tar")
    with pytest.raises(DataError, match="image_too_large"):  # 1600 pixels > 1000
        list(iter_image_batches([shards], pre, 2))
    # finetune's training batches too (its pipeline skips them: here every sample, an error)
    from mmssl.eval.finetune import _stream_batches

    with pytest.raises(DataError, match="image_too_large"):
        next(_stream_batches([shards], pre, "label", 2, 0))
    assert len(list(iter_image_batches([shards], load_model(export).preprocess, 2))) == 1


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"note": "my run"}, "'note'"),
        (
            {"preprocess": {"image_size": 32, "interpolation": "bicubic"}},
            "'preprocess.interpolation'",
        ),
        ({"model": {}}, "'model'"),  # save_pretrained writes it from the model's own config
        # a misspelt tokenizer name: evaluation took the default tokenizer, without a check
        ({"tokenizer": {"nmae": "clip"}}, "'tokenizer.nmae'"),
        (
            {"logits": {"clip": {"type": "clip", "logit_scale": 2.0, "temperatur": 0.07}}},
            "'logits.clip.temperatur'",
        ),
    ],
)
def test_save_pretrained_refuses_what_read_config_refuses_writing_nothing(tmp_path, extra, key):
    out = tmp_path / "new" / "export"
    with pytest.raises(ConfigError, match=f"unknown key {key}"):
        save_pretrained(mmssl.create_model("test_tiny_clip"), out, extra)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"preprocess": {"mean": RGB}}, "mean"),  # mean without std
        ({"preprocess": "bicubic"}, "'preprocess' must be an object"),
        ({"descriptor": {"version": "v99"}}, "unknown augmentation descriptor layout 'v99'"),
        ({"preprocess": {1: 2}}, "unknown key 'preprocess.1'"),  # was a TypeError
        # the checks below ran only when loading: each save wrote an export that did not load
        ({"preprocess": {"image_size": 36}}, "image_size 36 is not a positive multiple"),
        ({"preprocess": {"image_size": 32.0}}, "image_size 32.0 is not a positive multiple"),
        ({"logits": 5}, "'logits' must be an object"),
        ({"logits": {"clip": {"type": "clip", "logit_scale": "x"}}}, "must be a finite number"),
        ({"tokenizer": 5}, "'tokenizer' must be an object"),  # and loading ignored it
        ({"tokenizer": {"name": 7}}, "'tokenizer' must be an object"),
    ],
)
def test_save_pretrained_refuses_values_read_config_refuses_writing_nothing(tmp_path, extra, says):
    """Not only the names: a value the loaders refuse is refused before anything is written."""
    out = tmp_path / "new" / "export"
    with pytest.raises(ConfigError, match=says):
        save_pretrained(mmssl.create_model("test_tiny_clip"), out, extra)
    assert not (tmp_path / "new").exists()


def test_save_pretrained_refuses_a_model_config_the_loaders_refuse(tmp_path):
    """The model's own values are checked as load_pretrained checks them (a norm_eps of 0
    saved, and did not load)."""
    with pytest.raises(ConfigError, match=r"model\.vision\.block\.norm_eps must be > 0"):
        mmssl.create_model("test_tiny_clip", **{"vision.block.norm_eps": 0.0})
    model = mmssl.create_model("test_tiny_clip")
    model.cfg.vision.block.norm_eps = 0.0  # a config edited after the build
    with pytest.raises(ConfigError, match=r"model\.vision\.block\.norm_eps must be > 0"):
        save_pretrained(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_refused_save_over_a_good_export_leaves_it_loading(tmp_path):
    """A save with a preprocess size off the patch grid replaced a loadable config.json with
    one load_encoder refused."""
    model = mmssl.create_model("test_tiny_clip")
    out = save_pretrained(model, tmp_path / "export", {"preprocess": {"image_size": 32}})
    before = (out / "config.json").read_bytes()
    with pytest.raises(ConfigError, match="image_size 36"):
        save_pretrained(model, out, {"preprocess": {"image_size": 36}})
    assert (out / "config.json").read_bytes() == before
    mmssl.load_encoder(out)


def test_a_tokenizer_record_that_is_not_an_object_is_refused_on_load(export, tmp_path):
    """It was ignored: evaluation then used the default tokenizer, unchecked."""
    path = _edited(export, tmp_path, lambda d: d.update(tokenizer="clip"))
    assert "'tokenizer' must be an object" in _refused(path)


def test_a_misspelt_tokenizer_key_is_refused_on_load(export, tmp_path):
    """{"nmae": "clip"} named no tokenizer: an import with CLIP's 49408 ids was evaluated
    with the default's 8192, every prompt encoded into other tokens (top-1 near chance)."""
    path = _edited(export, tmp_path, lambda d: d.update(tokenizer={"nmae": "clip"}))
    msg = _refused(path)
    assert "unknown key 'tokenizer.nmae'" in msg and "did you mean 'name'?" in msg


def test_a_tokenizer_record_without_a_name_is_no_licence_for_the_default(tmp_path):
    """An import whose record names no tokenizer (an empty one) and whose vocabulary is not
    the default's is refused as one with no record is, not encoded with the default."""
    model = mmssl.create_model("test_tiny_clip", **{"text.vocab_size": 49408})
    out = save_pretrained(model, tmp_path / "imp", {"tokenizer": {}})
    with pytest.raises(EvalError, match="pass --tokenizer"):
        load_model(out).tokenizer()


@pytest.mark.parametrize("size", [33, "32", 0, True])
def test_a_preprocess_image_size_off_the_patch_grid_is_refused_by_both_loaders(
    export, tmp_path, size
):
    """load_encoder loaded these and `mmssl features` refused them: the same check now."""
    path = _edited(export, tmp_path, lambda d: d["preprocess"].update(image_size=size))
    msg = _refused(path)
    assert msg == (
        f"{path}/config.json: preprocess.image_size {size!r} is not a positive multiple of the "
        "patch size 8"
    )


def test_a_config_that_does_not_match_the_weights_is_refused_before_the_model_is_built(
    export, tmp_path, monkeypatch
):
    """The model of config.json was built (weights allocated and initialised) before its
    shapes were compared with the file's: a config edited to vision.dim 8192 beside 2 MB of
    weights took 12.8 GB and a minute.  The comparison now runs on a model without storage."""
    import torch

    import mmssl.models.io as io

    built = []
    real = io.MultimodalModel

    def spy(cfg):
        built.append(torch.empty(0).device.type)  # the device models are built on here
        return real(cfg)

    monkeypatch.setattr(io, "MultimodalModel", spy)
    path = _edited(export, tmp_path, lambda d: d["model"]["vision"].update(dim=64, num_heads=4))
    with pytest.raises(ValueError, match="differ in shapes"):
        mmssl.load_encoder(path)
    assert built == ["meta"]
    built.clear()
    assert mmssl.load_encoder(export, tower="model").visual is not None  # a good export loads
    assert built == ["meta", "cpu"]


def test_save_pretrained_of_values_json_cannot_hold_writes_nothing(tmp_path):
    """numpy floats in `extra` passed the checks, then json.dumps failed naming nothing and
    left an empty folder."""
    import numpy as np

    model = mmssl.create_model("test_tiny_vit")
    rgb = list(np.array(RGB, dtype=np.float32))
    out = tmp_path / "export"
    with pytest.raises(TypeError, match="float32 is not JSON serializable; pass plain Python"):
        save_pretrained(model, out, extra={"preprocess": {"mean": rgb, "std": rgb}})
    assert not out.exists()
