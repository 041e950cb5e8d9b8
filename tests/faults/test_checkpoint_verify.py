"""mmssl.train.checkpoint.verify and the optimizer-step check, in one process (no engine):
a file the manifest does not list fails verification, every listed file is hashed (the
first in sorted order too: rank 0's share starts there), and an optimizer step count past
the checkpoint's is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmssl.train.checkpoint import MANIFEST, CheckpointError, _adam_steps, verify, write_manifest


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
