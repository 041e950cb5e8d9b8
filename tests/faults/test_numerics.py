"""Numerical faults: an injected NaN/inf loss or gradient skips the step (no optimizer
update, LR schedule held) and is counted; K consecutive bad steps stop the run with one clear
line, keeping the last good checkpoint.  Both the loop's own check (DeepSpeed's fp32
stage-0 path applies every step) and DeepSpeed's overflow check (ZeRO) are exercised."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from train_helpers import synthetic_recipe

from mmssl.train.checkpoint import tag_of, verify
from mmssl.train.export import checkpoint_state

pytestmark = [pytest.mark.slow]

# torch's own log lines (e.g. "W1204 22:55:18.773 ... No CUDA runtime is found", printed by
# the first process-wide import of torch.utils.cpp_extension): not mmssl's output
TORCH_LOG = re.compile(r"[IWE]\d{4} \d\d:\d\d:\d\d")


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint_state(run / "checkpoints", tag_of(step))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [0, 1])
def test_bad_step_is_skipped_and_counted(
    stage: int, tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmssl.train import nonfinite
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@2,inf_grad@4")
    # a checkpoint at every step, the skipped ones too (the loop saves none in a streak), to
    # see the weights of each
    monkeypatch.setattr(nonfinite, "save_due", lambda *args: True)
    recipe = load_recipe(synthetic_recipe(tmp_path, "r", 5, 20, 2, deepspeed=f"zero{stage}"))
    out = train(recipe, validate(recipe))
    assert out["bad_steps"] == 2 and out["final_step"] == 5
    run = tmp_path / "r"
    w = {s: _weights(run, s) for s in range(1, 6)}
    assert _same(w[2], w[1]) and _same(w[4], w[3]), "a bad step changed the weights"
    assert not _same(w[3], w[2]) and not _same(w[5], w[4]), "good steps must update"
    assert all(torch.isfinite(v).all() for v in w[5].values())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in rows] == [0, 1, 1, 2, 2]
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[2]["loss"])
    # each row logs the LR its step applied: the step after a skipped one applies the same
    lr = [r["lr"] for r in rows]
    assert lr[2] == lr[1] and lr[4] == lr[3], f"the LR schedule advanced on a skipped step: {lr}"
    assert "- bad_steps: 2" in (run / "summary.md").read_text()


def test_consecutive_bad_steps_stop_with_last_good_checkpoint(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mmssl.train.cli import main

    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@3-8")
    recipe = synthetic_recipe(tmp_path, "k", 8, 20, 2, max_bad_steps=3)
    assert main([str(recipe), "checkpoint.every=2"]) == 1
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not TORCH_LOG.match(x)]
    assert len(err) == 1 and "Traceback" not in err[0], err
    run = tmp_path / "k"
    good = run / "checkpoints" / tag_of(2)
    assert "train.max_bad_steps: 3 consecutive steps (3..5)" in err[0] and str(good) in err[0]
    # step 4's checkpoint fell due in the streak: not saved (it held step 2's weights)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [tag_of(2)]
    assert verify(good) is None
    assert all(torch.isfinite(v).all() for v in _weights(run, 2).values())


def test_a_streak_rotates_out_no_checkpoint_from_before_it(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The checkpoints saved in a streak held no new weights, yet their rotation deleted the
    ones before it: with keep_last 2 only streak checkpoints were left, and the stop named one
    of them "the last good checkpoint"."""
    from mmssl.train.cli import main

    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@3-8")
    recipe = synthetic_recipe(tmp_path, "r", 8, 2, 0, max_bad_steps=4)
    assert main([str(recipe), "checkpoint.every=1"]) == 1
    run = tmp_path / "r"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [tag_of(1), tag_of(2)]
    err = capsys.readouterr().err
    good = run / "checkpoints" / tag_of(2)
    assert f"The last good checkpoint is {good} (its weights are step 2's" in err, err
    assert (
        f"remove the checkpoints from step 2 on to resume from an earlier one: {tag_of(1)})" in err
    ), err


def test_bad_step_stop_writes_the_summary(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A stop on train.max_bad_steps is an end of the run like any other: summary.md (and
    loss.png) are written, with the reason of the stop, the last good checkpoint and how to
    resume from it."""
    from mmssl.train.cli import main

    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@3-8")
    recipe = synthetic_recipe(tmp_path, "m", 8, 20, 2, max_bad_steps=3)
    assert main([str(recipe), "checkpoint.every=2"]) == 1
    run = tmp_path / "m"
    summary = (run / "summary.md").read_text()
    assert "- stopped: train.max_bad_steps: 3 consecutive steps (3..5)" in summary, summary
    assert f"- checkpoint: {run / 'checkpoints' / tag_of(2)}\n" in summary, summary
    assert "- steps: 0 -> 5 of 8" in summary and "- bad_steps: 3" in summary, summary
    good = run / "checkpoints" / tag_of(2)
    assert f"- what next: fix the cause, then resume from {good}: rerun" in summary, summary
    assert "checkpoint.resume=auto`" in summary, summary
    assert (run / "loss.png").is_file()


def test_bad_step_stop_names_only_an_intact_checkpoint(
    tmp_path: Path,
    in_process: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 'last good checkpoint' of the stop is one the resume would take: a newer one that
    has its manifest but a truncated file is passed over (and named as skipped)."""
    from mmssl.train import checkpoint
    from mmssl.train.cli import main

    save = checkpoint.save

    def save_then_truncate(engine, ckpt_dir, step, *args, **kwargs):  # noqa: ANN001, ANN202
        folder = save(engine, ckpt_dir, step, *args, **kwargs)
        if step == 4:  # damaged after its manifest was written (a disk fault, a bad copy)
            victim = max((p for p in folder.rglob("*.pt")), key=lambda p: p.stat().st_size)
            victim.write_bytes(victim.read_bytes()[:100])
        return folder

    monkeypatch.setattr(checkpoint, "save", save_then_truncate)
    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@5-10")
    recipe = synthetic_recipe(tmp_path, "t", 10, 20, 2, max_bad_steps=3)
    assert main([str(recipe), "checkpoint.every=2"]) == 1
    err = capsys.readouterr().err
    run = tmp_path / "t"
    stop = [x for x in err.splitlines() if "train.max_bad_steps: 3 consecutive" in x]
    assert len(stop) == 1, err
    assert f"The last good checkpoint is {run / 'checkpoints' / tag_of(2)}" in stop[0], stop
    assert tag_of(4) not in stop[0], stop
    assert f"skipping checkpoint {run / 'checkpoints' / tag_of(4)}" in caplog.text


def test_a_bad_streak_continues_across_a_resume(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mmssl.train.cli import main

    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@3-8")
    recipe = str(synthetic_recipe(tmp_path, "s", 8, 20, 2, max_bad_steps=3))
    assert main([recipe, "checkpoint.every=2", "train.stop_at=4"]) == 0  # stopped mid-streak
    capsys.readouterr()
    assert main([recipe, "checkpoint.every=2"]) == 1
    err = capsys.readouterr().err
    assert "train.max_bad_steps: 3 consecutive steps (3..5)" in err, err


def test_a_run_ending_in_a_streak_rotates_out_no_checkpoint_from_before_it(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The run's end (here train.stop_at) saves in a streak, as a resume needs, but its
    rotation deleted the checkpoints from before the streak (the reviewer's keep_last 2: step
    2 went, and the later stop named only streak checkpoints)."""
    from mmssl.train.cli import main

    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@5-20")
    recipe = str(synthetic_recipe(tmp_path, "e", 12, 2, 0, 2, max_bad_steps=4))
    assert main([recipe, "train.stop_at=6"]) == 0  # ends 2 steps into the streak
    run = tmp_path / "e"
    tags = [tag_of(2), tag_of(4), tag_of(6)]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == tags
    capsys.readouterr()
    assert main([recipe]) == 1  # resumed: steps 7 and 8 make the streak 4 long
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == tags
    err = capsys.readouterr().err
    assert "train.max_bad_steps: 4 consecutive steps (5..8)" in err, err
    assert (
        f"The last good checkpoint is {run / 'checkpoints' / tag_of(6)} (its weights are step 4's"
        in err
    )
    assert (
        f"remove the checkpoints from step 4 on to resume from an earlier one: {tag_of(2)})" in err
    )


def test_bad_steps_apart_do_not_stop_the_run(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_bad_steps counts bad steps in a row: a good step between two resets the streak."""
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    monkeypatch.setenv("MMSSL_FAULTS", "nan_loss@2,nan_loss@4")
    recipe = load_recipe(synthetic_recipe(tmp_path, "r", 5, max_bad_steps=2))
    out = train(recipe, validate(recipe))
    assert out["bad_steps"] == 2 and out["final_step"] == 5
