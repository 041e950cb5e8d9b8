"""A registered name always means the shipped architecture; local configs are reached by path,
and an export's config builds a fresh model with a warning that its weights are not loaded."""

from __future__ import annotations

import json
import warnings

import pytest

import mmssl
from mmssl.models import registry, resolve_model_config
from mmssl.models.io import save_pretrained


def _local_config(tmp_path, depth: int) -> None:
    data = {"model": {"vision": {"depth": depth}}}
    (tmp_path / "test_tiny_clip").mkdir()
    (tmp_path / "test_tiny_clip" / "config.json").write_text(json.dumps(data))


def test_a_local_folder_of_a_registered_name_does_not_replace_it(tmp_path, monkeypatch):
    shipped = resolve_model_config("test_tiny_clip").vision.depth
    _local_config(tmp_path, shipped + 1)
    (tmp_path / "vit_ti16").mkdir()  # empty: made create_model('vit_ti16') fail
    monkeypatch.chdir(tmp_path)
    assert mmssl.create_model("test_tiny_clip").cfg.vision.depth == shipped
    assert resolve_model_config("vit_ti16").vision is not None
    # the local one by a path that is not the bare name
    assert resolve_model_config("./test_tiny_clip").vision.depth == shipped + 1
    assert resolve_model_config(str(tmp_path / "test_tiny_clip")).vision.depth == shipped + 1
    assert resolve_model_config("test_tiny_clip/config.json").vision.depth == shipped + 1


def test_an_unknown_name_still_suggests_a_registered_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mmssl.schema.ConfigError, match="did you mean 'test_tiny_clip'"):
        mmssl.create_model("test_tiny_clp")


def test_create_model_of_an_export_warns_that_weights_are_not_loaded(tmp_path):
    out = save_pretrained(mmssl.create_model("test_tiny_clip"), tmp_path / "export")
    for given in (str(out), str(out / "config.json")):
        with pytest.warns(UserWarning, match="load_encoder") as record:
            mmssl.create_model(given)
        assert "does not load" in str(record[0].message) and str(out) in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmssl.create_model("test_tiny_clip")  # a registered name has no weights beside it


@pytest.mark.parametrize("create", [mmssl.create_model, registry.create_model])
def test_the_weights_warning_points_at_the_callers_line(tmp_path, create):
    """Python's default filter shows a warning once per location: at a line of mmssl it was
    shown for the first export of the process only."""
    out = save_pretrained(mmssl.create_model("test_tiny_clip"), tmp_path / "export")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        create(str(out))
    assert len(w) == 1 and "does not load" in str(w[0].message)
    assert w[0].filename == __file__
