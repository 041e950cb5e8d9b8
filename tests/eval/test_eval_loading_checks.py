"""What evaluation loads from a run (mmssl.eval.loading): an export is reused only while it
holds that very checkpoint, the same tag and the manifest sha256 it recorded (a run trained
anew in the same directory saves other checkpoints under the same tags); a tokenizer with
more ids than the model's text tower is refused (its high ids would index past the table)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmssl.eval.loading import EvalError, _exported_checkpoint, load_tokenizer
from mmssl.tokenizer import get_tokenizer
from mmssl.train.checkpoint import MANIFEST
from mmssl.train.export import EXPORT_FILES, SOURCE


def _setup(tmp_path: Path, recorded_sha: str | None) -> tuple[Path, Path, str]:
    ckpt = tmp_path / "run" / "checkpoints"
    tag = "step_00000004"
    (ckpt / tag).mkdir(parents=True)
    manifest = json.dumps({"format": 1, "step": 4, "files": {"x": {"size": 1, "sha256": "0"}}})
    (ckpt / tag / MANIFEST).write_text(manifest)
    sha = hashlib.sha256(manifest.encode()).hexdigest()
    dest = tmp_path / "run" / "export"
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps({"checkpoint": tag}))
    (dest / "model.safetensors").write_bytes(b"")
    files = {n: hashlib.sha256((dest / n).read_bytes()).hexdigest() for n in EXPORT_FILES}
    source = {"checkpoint": tag, "manifest_sha256": recorded_sha or sha, "sha256": files}
    (dest / SOURCE).write_text(json.dumps(source))
    return dest, ckpt, tag


def test_the_export_of_that_very_checkpoint_is_reused(tmp_path: Path) -> None:
    dest, ckpt, tag = _setup(tmp_path, None)
    assert _exported_checkpoint(dest, ckpt, [tag]) == tag
    source = json.loads((dest / SOURCE).read_text())
    del source["sha256"]  # written before exports recorded their files' hashes: redone once
    (dest / SOURCE).write_text(json.dumps(source))
    assert _exported_checkpoint(dest, ckpt, [tag]) is None


def test_an_export_of_an_earlier_checkpoint_under_the_same_tag_is_not_reused(
    tmp_path: Path,
) -> None:
    dest, ckpt, tag = _setup(tmp_path, "f" * 64)
    assert _exported_checkpoint(dest, ckpt, [tag]) is None


def _model(vocab: int):
    return SimpleNamespace(cfg=SimpleNamespace(text=SimpleNamespace(vocab_size=vocab)))


def test_a_tokenizer_larger_than_the_text_tower_is_refused(tmp_path: Path) -> None:
    n = get_tokenizer("default").vocab_size
    assert load_tokenizer({}, tmp_path, _model(n), override="default").vocab_size == n
    assert load_tokenizer({}, tmp_path, _model(n + 64), override="default").vocab_size == n
    with pytest.raises(EvalError, match="does not match the checkpoint"):
        load_tokenizer({}, tmp_path, _model(n - 1), override="default")
