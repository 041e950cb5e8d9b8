"""Hostile and damaged checkpoints: a pickle that would run code is refused by resume and
export (and the code provably did not run); a truncated or bit-flipped checkpoint is caught
by the sha256 manifest written at save time, named, and `resume=auto` falls back to the
previous good checkpoint and still ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import synthetic_recipe

from mmssl.train.checkpoint import CheckpointError, tag_of, write_manifest

pytestmark = [pytest.mark.slow]


class _Payload:
    """Unpickling this calls exec(): it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_hostile_pickle_is_refused(tmp_path: Path, in_process: None, capsys) -> None:
    from mmssl.train.cli import main as train_main
    from mmssl.train.export import export_run
    from mmssl.train.export import main as export_main

    recipe = synthetic_recipe(tmp_path, "h", 2)
    assert train_main([str(recipe)]) == 0
    folder = tmp_path / "h" / "checkpoints" / tag_of(2)
    target = folder / "mp_rank_00_model_states.pt"
    marker = tmp_path / "marker"
    real = torch.load(target, map_location="cpu", weights_only=True)
    real["module"] = {"weight": _Payload(marker)}
    torch.save(real, target)
    write_manifest(folder, 2)  # the attacker keeps the manifest consistent
    capsys.readouterr()

    with pytest.raises(CheckpointError, match=r"refusing to load .*mp_rank_00_model_states\.pt"):
        export_run(tmp_path / "h")
    before = _files(tmp_path)
    assert export_main([str(tmp_path / "h"), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mp_rank_00_model_states.pt" in err[0] and "exec" in err[0], err
    assert _files(tmp_path) == before and not (tmp_path / "exp").exists()
    assert train_main([str(recipe)]) == 2  # resume=auto meets it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load" in err[0] and "Traceback" not in err[0], err
    assert not marker.exists(), "the payload ran"
    # the payload is real: a plain unpickle runs it
    torch.load(target, map_location="cpu", weights_only=False)
    assert marker.read_text() == "code ran"


def test_damaged_checkpoint_falls_back(tmp_path: Path, in_process: None, caplog, capsys) -> None:
    from mmssl.train.cli import main as train_main
    from mmssl.train.export import checkpoint_state
    from mmssl.train.export import main as export_main

    assert train_main([str(synthetic_recipe(tmp_path, "ref", 3))]) == 0
    recipe = synthetic_recipe(tmp_path, "d", 3)
    assert train_main([str(recipe), "train.stop_at=2"]) == 0
    ckpt = tmp_path / "d" / "checkpoints"
    target = ckpt / tag_of(2) / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit
    target.write_bytes(bytes(data))
    capsys.readouterr()

    # export names the damaged checkpoint when asked for it ...
    assert export_main([str(tmp_path / "d"), "--tag", tag_of(2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and tag_of(2) in err[0] and "sha256" in err[0], err
    # ... and a truncated one too
    shorter = ckpt / tag_of(1) / "mp_rank_00_model_states.pt"
    saved = shorter.read_bytes()
    shorter.write_bytes(saved[:-100])
    assert export_main([str(tmp_path / "d"), "--tag", tag_of(1)]) == 2
    assert "bytes, the manifest says" in capsys.readouterr().err
    shorter.write_bytes(saved)

    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        assert train_main([str(recipe)]) == 0  # resume=auto
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(ckpt / tag_of(2)) in skipped[0] and "sha256" in skipped[0]
    summary = (tmp_path / "d" / "summary.md").read_text()
    assert "- steps: 1 -> 3 of 3" in summary
    a = checkpoint_state(tmp_path / "ref" / "checkpoints", tag_of(3))
    b = checkpoint_state(ckpt, tag_of(3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_or_rolled_back_start_under_later_checkpoints_is_refused(
    tmp_path: Path, in_process: None, capsys
) -> None:
    """resume=none, or an earlier checkpoint named, in a run directory that holds later good
    checkpoints: those would outlive the new run's (rotation keeps what lies after the step it
    saves) and the next resume=auto would continue them, silently dropping the new run's
    steps.  Refused with one line naming the checkpoint, before anything changes."""
    from mmssl.train.checkpoint import find_resume
    from mmssl.train.cli import main as train_main

    recipe = synthetic_recipe(tmp_path, "f", 3, keep_last=2)
    assert train_main([str(recipe)]) == 0
    ckpt = tmp_path / "f" / "checkpoints"
    before = {p: p.read_bytes() for p in _files(tmp_path / "f")}
    capsys.readouterr()
    for resume in ("none", str(ckpt / tag_of(2))):
        assert train_main([str(recipe), f"checkpoint.resume={resume}", "train.stop_at=1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(ckpt / tag_of(3)) in err[0], err
        assert {p: p.read_bytes() for p in _files(tmp_path / "f")} == before, resume
    assert find_resume("auto", tmp_path / "f") == (ckpt, tag_of(3))
    # without the later checkpoint the rollback runs
    shutil.rmtree(ckpt / tag_of(3))
    assert train_main([str(recipe), f"checkpoint.resume={ckpt / tag_of(2)}"]) == 0


def test_resume_after_a_metrics_line_cut_short(tmp_path: Path, in_process: None) -> None:
    """A kill (or a machine crash) in the middle of appending a metrics row leaves half a
    JSON line in metrics.jsonl; the resume drops it, as it drops the rows after its step,
    instead of failing on it every time."""
    from mmssl.train.cli import main as train_main
    from mmssl.train.logging import read_metrics

    recipe = synthetic_recipe(tmp_path, "m", 4)
    assert train_main([str(recipe), "train.stop_at=2"]) == 0
    metrics = tmp_path / "m" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "samples": 12, "lr": 0.00')
    assert train_main([str(recipe)]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "m")] == [1, 2, 3, 4]
    assert len(metrics.read_text().splitlines()) == 4
    assert "- steps: 2 -> 4 of 4" in (tmp_path / "m" / "summary.md").read_text()


def test_export_of_an_older_checkpoint_uses_its_own_recipe(
    tmp_path: Path, in_process: None
) -> None:
    """A resume may change the data section (image size, normalisation); RUN_DIR/recipe.yaml
    then holds the latest attempt's.  Export of an earlier checkpoint (--tag) read it and
    wrote the later attempt's preprocessing into config.json: it now takes the recipe recorded
    with the checkpoint, and falls back to recipe.yaml only for one without a record."""
    import json

    from mmssl.train.checkpoint import RUN_RECORD
    from mmssl.train.cli import main as train_main
    from mmssl.train.export import export_run

    recipe = synthetic_recipe(tmp_path, "x", 2)
    first = ["data.image_size=32", "data.mean=[0.1, 0.2, 0.3]", "data.std=[0.5, 0.5, 0.5]"]
    later = ["data.image_size=16", "data.mean=[0.4, 0.5, 0.6]", "data.std=[0.2, 0.2, 0.2]"]
    later.append("data.max_pixels=60000000")  # the decoder's limit, which eval keeps
    assert train_main([str(recipe), "train.stop_at=1", *first]) == 0
    assert train_main([str(recipe), *later]) == 0
    assert "- steps: 1 -> 2 of 2" in (tmp_path / "x" / "summary.md").read_text()  # a resume

    def preprocess(tag: str) -> dict:
        out = export_run(tmp_path / "x", tmp_path / f"export_{tag}", tag)
        return json.loads((out / "config.json").read_text())["preprocess"]

    old = {"image_size": 32, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}
    old["max_pixels"] = 50_000_000
    new = {"image_size": 16, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2]}
    new["max_pixels"] = 60_000_000
    assert preprocess(tag_of(1)) == old
    assert preprocess(tag_of(2)) == new
    # a checkpoint saved before run records existed: recipe.yaml is all there is
    folder = tmp_path / "x" / "checkpoints" / tag_of(1)
    (folder / RUN_RECORD).unlink()
    write_manifest(folder, 1)
    assert preprocess(tag_of(1)) == new


def test_eval_of_a_run_directory_passes_over_a_damaged_newest_checkpoint(
    tmp_path: Path, in_process: None, caplog
) -> None:
    """`mmssl eval RUN_DIR` exports the newest *good* checkpoint, as resume=auto resumes it;
    it took the newest with a manifest, and a truncated one failed the evaluation."""
    import json

    from mmssl.eval.loading import resolve_model_dir
    from mmssl.train.cli import main as train_main

    assert train_main([str(synthetic_recipe(tmp_path, "e", 2))]) == 0
    target = tmp_path / "e" / "checkpoints" / tag_of(2) / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        out = resolve_model_dir(tmp_path / "e")
    assert json.loads((out / "config.json").read_text())["checkpoint"] == tag_of(1)
    assert any(tag_of(2) in r.getMessage() for r in caplog.records)
    assert resolve_model_dir(tmp_path / "e") == out  # the export is reused


def test_a_run_started_from_another_runs_checkpoint_requeues_with_the_same_command(
    tmp_path: Path, in_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    """checkpoint.resume names another run's checkpoint: the fork starts there; pre-empted
    after saving its own, the same command continues from its own (the named one was
    refused then, as a start before a later good checkpoint), and runs the steps an
    uninterrupted fork runs, with the same losses."""
    from train_helpers import losses

    from mmssl.train.cli import main as train_main

    base = synthetic_recipe(tmp_path, "base", 4)
    assert train_main([str(base), "train.stop_at=2"]) == 0
    start = f"checkpoint.resume={tmp_path / 'base' / 'checkpoints' / tag_of(2)}"
    assert train_main([str(base), "name=whole", start]) == 0  # the reference: 3 and 4
    assert train_main([str(base), "name=fork", start, "train.stop_at=3"]) == 0  # pre-empted
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        assert train_main([str(base), "name=fork", start]) == 0  # requeued
    own = tmp_path / "fork" / "checkpoints"
    assert f"continuing from {own / tag_of(3)}" in caplog.text
    assert losses(tmp_path / "fork") == losses(tmp_path / "whole")
    assert train_main([str(base), "name=fork", start]) == 0  # finished: nothing changes


def test_a_run_of_its_own_named_to_start_from_another_runs_checkpoint_starts_there(
    tmp_path: Path, in_process: None
) -> None:
    """Checkpoints a run saved before (from step 0) are not where a checkpoint of another
    run, named, leads: the run starts at the named one, as asked, and is refused where its
    own later checkpoints would outlive the new line."""
    import json

    from mmssl.train.checkpoint import RUN_RECORD
    from mmssl.train.cli import main as train_main

    base = synthetic_recipe(tmp_path, "base", 4)
    assert train_main([str(base), "train.stop_at=3"]) == 0
    assert train_main([str(base), "name=own", "train.stop_at=1"]) == 0  # its own step 1
    named = tmp_path / "base" / "checkpoints" / tag_of(3)
    assert train_main([str(base), "name=own", f"checkpoint.resume={named}"]) == 0
    rows = json.loads((tmp_path / "own" / "checkpoints" / tag_of(4) / RUN_RECORD).read_text())
    assert rows["started_from"]["checkpoint"] == str(named.resolve())
    assert [s for s, _ in losses_by_step(tmp_path / "own")] == [1, 4]  # step 1, then 3 -> 4


def losses_by_step(run: Path) -> list[tuple[int, float]]:
    import json

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_a_zero3_offload_resume_is_bitwise(tmp_path: Path, in_process: None) -> None:
    """ZeRO offload's CPU Adam keeps beta^t as a float32 running product that a new optimizer
    starts with pow(): stopped at step 3 and resumed, step 4 differed in the last bits (loss
    4.563312530517578 vs 4.563310623168945, 59 of 61 exported tensors).  Its calls are now
    replayed on load, as FusedAdam's are."""
    from mmssl.train.cli import main as train_main
    from mmssl.train.export import checkpoint_state

    offload = ["train.deepspeed=zero3_offload", "optim.impl=deepspeed"]
    assert train_main([str(synthetic_recipe(tmp_path, "full", 5)), *offload]) == 0
    recipe = str(synthetic_recipe(tmp_path, "cut", 5))
    assert train_main([recipe, *offload, "train.stop_at=2"]) == 0
    assert train_main([recipe, *offload]) == 0
    full = checkpoint_state(tmp_path / "full" / "checkpoints", tag_of(5))
    cut = checkpoint_state(tmp_path / "cut" / "checkpoints", tag_of(5))
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_an_optimizer_step_count_beyond_the_checkpoint_is_refused(
    tmp_path: Path, in_process: None, capsys
) -> None:
    """The CPU Adam replay on resume ran as many kernel calls as the optimizer state's step
    count, built as a tuple first: a count of 10**9 in a (manifest-consistent) checkpoint
    took 23 GB before the OOM killer.  A count above the checkpoint's step is refused."""
    from mmssl.train.cli import main as train_main

    fused = ["optim.impl=deepspeed"]  # DeepSpeed's FusedAdam: the replayed kernel on CPU
    recipe = synthetic_recipe(tmp_path, "s", 4)
    assert train_main([str(recipe), *fused, "train.stop_at=2"]) == 0
    folder = tmp_path / "s" / "checkpoints" / tag_of(2)
    target = folder / "mp_rank_00_model_states.pt"
    saved = torch.load(target, map_location="cpu", weights_only=True)
    state = saved["optimizer"]["state"]
    assert max(int(s["step"]) for s in state.values()) == 2
    for s in state.values():
        s["step"] = torch.tensor(10**9) if torch.is_tensor(s["step"]) else 10**9
    torch.save(saved, target)
    write_manifest(folder, 2)
    capsys.readouterr()
    assert train_main([str(recipe), *fused]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has taken 1000000000 steps" in err[0] and "at step 2" in err[0], err


def test_rotation_keeps_exactly_keep_last(tmp_path: Path, in_process: None) -> None:
    from mmssl.train.checkpoint import list_tags
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    recipe = load_recipe(synthetic_recipe(tmp_path, "k", 4, keep_last=2))
    train(recipe, validate(recipe))
    assert list_tags(tmp_path / "k" / "checkpoints") == [tag_of(3), tag_of(4)]
