"""mmssl.train.checkpoint.verify and the optimizer-step check, in one process (no engine):
a file the manifest does not list fails verification, every listed file is hashed (the
first in sorted order too: rank 0's share starts there), and an optimizer step count past
the checkpoint's is refused; a checkpoint named for resume is verified, a manifest of no
files is no checkpoint, and `safe_torch_load` refuses pickles that run code (the quick
suite's guard; tests/faults/test_checkpoints.py has DeepSpeed load one)."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmssl.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    _adam_steps,
    find_resume,
    newest_valid,
    verify,
    write_manifest,
)
from mmssl.train.safe_load import safe_torch_load


def _ckpt(tmp_path: Path) -> Path:
    folder = tmp_path / "step_00000002"
    (folder / "global_step2").mkdir(parents=True)
    (folder / "a_first.pt").write_bytes(b"A" * 100)
    (folder / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"M" * 100)
    (folder / "zz_last.json").write_text("{}")
    write_manifest(folder, 2)
    assert (folder / MANIFEST).is_file()
    assert verify(folder, collective=False) is None
    assert verify(folder) is None
    return folder


def test_a_file_the_manifest_does_not_list_fails_verification(tmp_path: Path) -> None:
    folder = _ckpt(tmp_path)
    (folder / "global_step2" / "extra_optim_states.pt").write_bytes(b"x")
    problem = verify(folder, collective=False)
    assert problem is not None and "extra_optim_states.pt" in problem


def test_a_bit_flip_in_the_first_listed_file_fails_verification(tmp_path: Path) -> None:
    folder = _ckpt(tmp_path)
    data = bytearray((folder / "a_first.pt").read_bytes())
    data[50] ^= 1  # same size, other content
    (folder / "a_first.pt").write_bytes(bytes(data))
    for collective in (False, True):
        problem = verify(folder, collective=collective)
        assert problem is not None and "a_first.pt" in problem


@pytest.mark.parametrize(
    "damage",
    [
        lambda files: files["a_first.pt"].pop("size"),
        lambda files: files["zz_last.json"].update(sha256=None),
        lambda files: files["a_first.pt"].update(size="100"),
        lambda files: files.update({"a_first.pt": "100"}),
    ],
)
def test_a_damaged_manifest_entry_is_an_unreadable_manifest(tmp_path: Path, damage) -> None:
    """Valid JSON with one bad entry raised KeyError out of verify (on the rank hashing that
    entry only: the other waited in the gather), so resume=auto and export never fell back
    to an older checkpoint."""
    import json

    folder = _ckpt(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    damage(manifest["files"])
    (folder / MANIFEST).write_text(json.dumps(manifest))
    for collective in (False, True):
        assert verify(folder, collective=collective) == f"{MANIFEST} is unreadable"


@pytest.mark.parametrize("steps,ok", [(3, True), (4, False), (-1, False)])
def test_an_optimizer_one_step_past_the_checkpoint_is_refused(steps: int, ok: bool) -> None:
    """A count above the checkpoint's step (or below 0) is refused before CPU Adam replays it."""
    opt = SimpleNamespace(state={0: {"step": torch.tensor(float(steps))}})
    if ok:
        assert _adam_steps(opt, 3, Path("ck")) == steps
    else:
        with pytest.raises(CheckpointError):
            _adam_steps(opt, 3, Path("ck"))


def _fake_ckpt(ckpt_dir: Path, step: int, weight: torch.Tensor) -> Path:
    """A checkpoint folder whose model states are written by torch.save, with its manifest."""
    folder = ckpt_dir / f"step_{step:08d}"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": weight}}, folder / "mp_rank_00_model_states.pt")
    write_manifest(folder, step)
    return folder


def _flip_a_weight_byte(path: Path, weight: torch.Tensor) -> None:
    """Flip one bit inside the tensor's stored bytes (torch.save stores them uncompressed)."""
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weight.numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_named_checkpoint_with_a_flipped_weight_bit_is_refused(tmp_path: Path) -> None:
    """checkpoint.resume naming another run's checkpoint folder verifies it: a flipped bit
    in a tensor loads without a word in torch (the reference), so only the manifest sees it."""
    w = torch.arange(16, dtype=torch.float32)
    folder = _fake_ckpt(tmp_path / "other" / "checkpoints", 4, w)
    _flip_a_weight_byte(folder / "mp_rank_00_model_states.pt", w)
    # the reference: torch.load reads the damaged file without a word, other weights
    loaded = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"]["w"]
    assert not torch.equal(loaded, w)
    with pytest.raises(CheckpointError, match="not usable"):
        find_resume(str(folder), tmp_path / "run")


def test_a_manifest_listing_no_files_is_skipped_for_the_older_good_checkpoint(tmp_path) -> None:
    """A folder holding only a manifest of no files is no checkpoint: resume=auto falls back
    to the older good one."""
    ckpts = tmp_path / "run" / "checkpoints"
    _fake_ckpt(ckpts, 1, torch.ones(4))
    empty = ckpts / "step_00000002"
    empty.mkdir()
    (empty / MANIFEST).write_text(json.dumps({"format": 1, "step": 2, "files": {}}))
    assert verify(empty, collective=False) is not None
    assert newest_valid(ckpts, "test", collective=False) == "step_00000001"
    assert find_resume("auto", tmp_path / "run") == (ckpts, "step_00000001")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


class _Getattr:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (getattr, ("text", "upper"))


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("user_env", [None, "1"])
def test_deepspeeds_unsafe_load_is_refused_even_with_the_users_opt_out(
    tmp_path: Path, monkeypatch, user_env
) -> None:
    """DeepSpeed calls torch.load(weights_only=False); inside safe_torch_load a pickle that
    runs code is refused, and plain tensors load as torch.save wrote them, also when the user
    exported TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (a common workaround for other code)."""
    if user_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", user_env)
    marker = tmp_path / "marker"
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(_saved({"w": _Payload(marker)}))
    plain = {"w": torch.randn(3, 5), "step": 7}
    (tmp_path / "plain.pt").write_bytes(_saved(plain))
    with safe_torch_load():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(hostile, map_location="cpu", weights_only=False)
        got = torch.load(tmp_path / "plain.pt", map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert got["step"] == 7 and torch.equal(got["w"], plain["w"])
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == user_env  # restored


def test_the_allow_list_admits_no_callable_gadget(tmp_path: Path) -> None:
    """A pickle built on builtins.getattr (a gadget for calling anything) is refused."""
    (tmp_path / "g.pt").write_bytes(_saved({"x": _Getattr()}))
    with safe_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "g.pt", map_location="cpu", weights_only=False)
