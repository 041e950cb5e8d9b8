"""save_pretrained takes a whole MultimodalModel: given one tower (what load_encoder returns)
it wrote an export that no longer loaded, over a good one."""

from __future__ import annotations

import pytest
import torch

import mmssl
from mmssl.models.io import load_pretrained, save_pretrained


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_save_pretrained_refuses_a_tower_and_writes_nothing(tmp_path, tower):
    torch.manual_seed(0)
    out = save_pretrained(mmssl.create_model("test_tiny_clip").eval(), tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    encoder = mmssl.load_encoder(str(out), tower)
    with pytest.raises(TypeError, match=r"needs the whole MultimodalModel, got \w+.*tower='model'"):
        save_pretrained(encoder, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(TypeError, match="MultimodalModel"):
        save_pretrained(encoder, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    load_pretrained(out)  # the good export still loads
    # the whole model, as load_encoder(path, "model") gives it, is still saved
    save_pretrained(mmssl.load_encoder(str(out), "model"), tmp_path / "again")
    load_pretrained(tmp_path / "again")


def test_a_home_relative_path_saves_and_loads(tmp_path, monkeypatch):
    """ "~/..." was taken literally by save_pretrained and load_encoder (a directory named
    "~"), while the CLI's --model expands it."""
    from mmssl.models.io import load_encoder

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    model = mmssl.create_model("test_tiny_clip")
    assert save_pretrained(model, "~/exported") == tmp_path / "exported"
    encoder = load_encoder("~/exported")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.eval().encode_image(x))
    assert isinstance(load_pretrained("~/exported"), type(model))
