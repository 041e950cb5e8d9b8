"""A run that an unplanned error ends (not a train.max_bad_steps stop) still writes its
summary.md, without any collective, naming the error, the step reached, the newest intact
checkpoint and how to resume; the error itself propagates unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from train_helpers import synthetic_recipe

from mmssl.train.checkpoint import tag_of

pytestmark = pytest.mark.usefixtures("one_process_group")
COLLECTIVES = ("all_gather_object", "all_reduce_sum", "all_reduce_mean", "barrier")


class InjectedError(Exception):
    """The fault of these tests: a type no library code raises."""


def _fail_on_batch(monkeypatch: pytest.MonkeyPatch, call: int) -> InjectedError:
    """The `call`-th batch drawn raises (a data read failing mid-run); from then on every
    collective fails the test, as one would hang if another rank were blocked elsewhere."""
    import mmssl.distributed
    from mmssl.train.streams import SyntheticStream

    error = InjectedError("shard server went away\nsecond line of the message")
    draw = SyntheticStream.next
    calls = [0]

    def next_or_fail(self: SyntheticStream) -> dict:
        calls[0] += 1
        if calls[0] == call:
            for name in COLLECTIVES:

                def collective(*args: object, _name: str = name, **kwargs: object) -> None:
                    raise AssertionError(f"distributed.{_name} after the error")

                monkeypatch.setattr(mmssl.distributed, name, collective)
            raise error
        return draw(self)

    monkeypatch.setattr(SyntheticStream, "next", next_or_fail)
    return error


def _train(path: Path) -> None:
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    recipe = load_recipe(str(path))
    train(recipe, validate(recipe))


def test_an_error_mid_run_writes_the_summary_and_propagates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The draw of step 6 fails: the error propagates as raised (same object, same type),
    and summary.md names it, the steps done (5) and step 4's checkpoint, the last good one,
    with the command that resumes from it; loss.png is drawn from the logged steps."""
    error = _fail_on_batch(monkeypatch, 6)
    with pytest.raises(InjectedError) as raised:
        _train(synthetic_recipe(tmp_path, "e", 8, every=2))
    assert raised.value is error
    run = tmp_path / "e"
    summary = (run / "summary.md").read_text()
    assert "- error: InjectedError: shard server went away\n" in summary, summary
    assert "InjectedError: shard server went away\nsecond line of the message" in summary
    assert "- steps: 0 -> 5 of 8" in summary, summary
    assert f"- checkpoint: {run / 'checkpoints' / tag_of(4)}\n" in summary, summary
    assert f"resume from {run / 'checkpoints' / tag_of(4)}" in summary, summary
    assert f"mmssl train {run / 'recipe.yaml'} checkpoint.resume=auto" in summary, summary
    assert (run / "loss.png").is_file()
    assert not list(run.glob("summary.rank*.md"))


def test_the_error_summary_names_only_an_intact_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint named is the one resume=auto would take: a newer one damaged after its
    manifest was written is passed over."""
    from mmssl.train import checkpoint

    save = checkpoint.save

    def save_then_truncate(engine, ckpt_dir, step, *args, **kwargs):  # noqa: ANN001, ANN202
        folder = save(engine, ckpt_dir, step, *args, **kwargs)
        if step == 4:
            victim = max((p for p in folder.rglob("*.pt")), key=lambda p: p.stat().st_size)
            victim.write_bytes(victim.read_bytes()[:100])
        return folder

    monkeypatch.setattr(checkpoint, "save", save_then_truncate)
    _fail_on_batch(monkeypatch, 6)
    with pytest.raises(InjectedError):
        _train(synthetic_recipe(tmp_path, "d", 8, every=2))
    run = tmp_path / "d"
    summary = (run / "summary.md").read_text()
    assert f"- checkpoint: {run / 'checkpoints' / tag_of(2)}\n" in summary, summary
    assert tag_of(4) not in summary, summary


def test_an_error_before_any_checkpoint_says_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_on_batch(monkeypatch, 2)
    with pytest.raises(InjectedError):
        _train(synthetic_recipe(tmp_path, "n", 8, every=2))
    summary = (tmp_path / "n" / "summary.md").read_text()
    assert "- steps: 0 -> 1 of 8" in summary and "- checkpoint: none\n" in summary, summary
    assert "no good checkpoint" in summary, summary


def test_ctrl_c_writes_no_error_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyboardInterrupt stops at once: no error summary, whose checkpoint hashing would
    hold the stop up."""
    from mmssl.train import run_summary
    from mmssl.train.streams import SyntheticStream

    draw, calls = SyntheticStream.next, [0]

    def next_or_interrupt(self: SyntheticStream) -> dict:
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return draw(self)

    def no_summary(*args: object, **kwargs: object) -> None:
        raise AssertionError("an error summary (and its hashing) after Ctrl-C")

    monkeypatch.setattr(SyntheticStream, "next", next_or_interrupt)
    monkeypatch.setattr(run_summary, "error_summary", no_summary)
    with pytest.raises(KeyboardInterrupt):
        _train(synthetic_recipe(tmp_path, "c", 8, every=2))
    assert not (tmp_path / "c" / "summary.md").exists()


def test_a_run_that_ends_normally_removes_stale_rank_summaries(tmp_path: Path) -> None:
    """summary.rank<R>.md of an earlier failed attempt would contradict the run's summary."""
    path = synthetic_recipe(tmp_path, "s", 8, every=2)
    stale = tmp_path / "s" / "summary.rank1.md"
    stale.parent.mkdir(parents=True)
    stale.write_text("# Run summary: s (failed)\n")
    _train(path)
    assert "(failed)" not in (tmp_path / "s" / "summary.md").read_text()
    assert not stale.exists()


def test_the_resume_hint_counts_the_ranks_of_one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed's --num_gpus is per node: 8 nodes x 8 ranks resume with --num_gpus 8."""
    from types import SimpleNamespace

    import mmssl.distributed
    from mmssl.train.run_summary import resume_hint

    monkeypatch.setattr(mmssl.distributed, "world_size", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    recipe = SimpleNamespace(run_dir=Path("/runs/x"))
    hint = resume_hint(recipe, "/runs/x/checkpoints/step_00000004")  # type: ignore[arg-type]
    # several nodes: the command says how many (it said --num_gpus 8 alone: 8 ranks of 64)
    want = "deepspeed --num_nodes 8 --num_gpus 8 --hostfile HOSTFILE --module mmssl.train "
    assert want + "/runs/x/recipe.yaml" in hint and "all 64 ranks" in hint, hint
    none = resume_hint(recipe, None)  # type: ignore[arg-type]
    assert "starts at step 0" in none and "--num_gpus 8" in none, none
    monkeypatch.setattr(mmssl.distributed, "world_size", lambda: 8)  # one node of 8
    hint = resume_hint(recipe, "/runs/x/checkpoints/step_00000004")  # type: ignore[arg-type]
    assert "deepspeed --num_gpus 8 --module mmssl.train /runs/x/recipe.yaml" in hint, hint


def test_a_failing_summary_never_masks_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the summary cannot be written the run's own error still propagates, and a
    warning says the summary is missing."""
    import mmssl.train.run_summary

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mmssl.train.run_summary, "write_error_summary", no_space)
    error = _fail_on_batch(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        with pytest.raises(InjectedError) as raised:
            _train(synthetic_recipe(tmp_path, "m", 8, every=2))
    assert raised.value is error
    assert "could not write the summary of the failed run" in caplog.text, caplog.text
    assert "No space left on device" in caplog.text


def test_a_failing_tensorboard_close_never_masks_the_error_or_its_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing TensorBoard after the error raised too (a data worker killed by the OOM
    killer: torch's SIGCHLD handler fires in the writer's join): that error replaced the
    run's and no summary.md was written."""
    from mmssl.train.logging import RunLogger

    def dead_worker(self: RunLogger) -> None:
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")

    monkeypatch.setattr(RunLogger, "abort", dead_worker)
    error = _fail_on_batch(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        with pytest.raises(InjectedError) as raised:
            _train(synthetic_recipe(tmp_path, "t", 8, every=2))
    assert raised.value is error
    assert (
        "- error: InjectedError: shard server went away"
        in (tmp_path / "t" / "summary.md").read_text()
    )
    assert "closing the progress bar and TensorBoard failed" in caplog.text
    assert "is killed by signal" in caplog.text


def test_a_full_disk_at_a_save_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports a checkpoint write cut short by a full disk as "[enforce fail at
    inline_container.cc:672] . unexpected pos 1815424 vs 1815316", naming neither the disk
    nor the checkpoint."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    def full(self: DeepSpeedEngine, *args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1815424")

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", full)
    with pytest.raises(OSError, match="unexpected pos") as raised:
        _train(synthetic_recipe(tmp_path, "f", 4, every=2))
    folder = tmp_path / "f" / "checkpoints" / tag_of(2)
    assert str(raised.value).startswith(f"saving checkpoint {folder} failed (")
    assert str(raised.value).endswith(" bytes free there")
    assert f"saving checkpoint {folder} failed" in (tmp_path / "f" / "summary.md").read_text()
    # a file size limit (`ulimit -f`) fails a save as a full disk does: named beside the space
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10**12, hard))
    try:
        with pytest.raises(OSError) as raised:
            _train(synthetic_recipe(tmp_path, "g", 4, every=2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(raised.value).endswith(" bytes free there, files limited to 1000000000000 bytes")


def test_another_save_failure_is_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    def gloo(self: DeepSpeedEngine, *args: object, **kwargs: object) -> None:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", gloo)
    with pytest.raises(RuntimeError, match="^Connection closed by peer"):
        _train(synthetic_recipe(tmp_path, "g", 4, every=2))


def test_a_rank_other_than_0_writes_its_own_summary_file(tmp_path: Path) -> None:
    """Rank R > 0 writes summary.rank<R>.md (rank 0's summary.md is not overwritten) and
    draws no plot: the metrics are rank 0's."""
    from mmssl.train.logging import write_error_summary

    (tmp_path / "summary.md").write_text("rank 0's")
    info = {"steps": "0 -> 3 of 8", "checkpoint": "none"}
    path = write_error_summary(tmp_path, 1, info, {"decode": 2}, KeyError("k"), "start again")
    assert path == tmp_path / "summary.rank1.md"
    text = path.read_text()
    assert "- error: KeyError: 'k'" in text and "- rank: 1" in text, text
    assert "- skipped bad samples on this rank: 2 (decode: 2)" in text, text
    assert "Start again." in text
    assert (tmp_path / "summary.md").read_text() == "rank 0's"
    assert not (tmp_path / "loss.png").exists()


DRIVER = """
import sys
from mmssl.train.streams import SyntheticStream
from mmssl.train.cli import main

class InjectedError(Exception):
    pass

draw, calls = SyntheticStream.next, [0]

def next_or_fail(self):
    calls[0] += 1
    if calls[0] == 4:
        raise InjectedError("rank 1 lost its shard server")
    return draw(self)

if sys.argv[2] == "1":  # the error strikes rank 1 alone: rank 0 waits in a collective
    SyntheticStream.next = next_or_fail
sys.exit(main([sys.argv[1]]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_an_error_on_rank_1_alone_leaves_its_own_summary(tmp_path: Path) -> None:
    """2 ranks; the draw of step 4 fails on rank 1 only, while rank 0 goes on into the
    step's collectives.  Rank 1 writes summary.rank1.md (naming the error and step 2's
    checkpoint) without waiting for rank 0, and exits with the error's traceback.  Rank 0
    is left blocked or failing on the lost peer; it is stopped here if still running."""
    import os
    import signal
    import subprocess

    from train_helpers import PYTHON, clean_env, free_port

    recipe = synthetic_recipe(tmp_path, "r", 8, every=2, world_size=2)
    port = str(free_port())
    procs = []
    try:
        for rank in (0, 1):
            env = clean_env(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            procs.append(
                subprocess.Popen(
                    [PYTHON, "-c", DRIVER, str(recipe), str(rank)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,  # its own group: stopped below with its children
                )
            )
        _, err1 = procs[1].communicate(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert procs[1].returncode != 0
    assert "InjectedError: rank 1 lost its shard server" in err1, err1[-3000:]
    run = tmp_path / "r"
    summary = (run / "summary.rank1.md").read_text()
    assert "- error: InjectedError: rank 1 lost its shard server\n" in summary, summary
    assert "- rank: 1 (written by this rank alone" in summary, summary
    assert "- steps: 0 -> 3 of 8" in summary and "- world_size: 2" in summary, summary
    assert f"- checkpoint: {run / 'checkpoints' / tag_of(2)}\n" in summary, summary
    assert "deepspeed --num_gpus 2 --module mmssl.train" in summary, summary
