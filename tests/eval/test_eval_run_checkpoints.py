"""`mmssl eval --model RUN` tells a run with no checkpoint from one whose checkpoints are all
incomplete or damaged (it said "no checkpoint yet" for both), in `mmssl export`'s words."""

from __future__ import annotations

import pytest

from mmssl.eval.loading import EvalError, resolve_model_dir


def _run(tmp_path, *tags: str):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: quickstart\n")
    for tag in tags:
        (run / "checkpoints" / tag).mkdir()  # no manifest: its save never finished
    return run


def test_a_run_without_checkpoints_has_none_yet(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(EvalError, match="the run has no checkpoint yet"):
        resolve_model_dir(run)


def test_a_run_whose_checkpoints_are_all_incomplete_says_so(tmp_path):
    run = _run(tmp_path, "step_00000002", "step_00000003")
    with pytest.raises(EvalError) as err:
        resolve_model_dir(run)
    assert str(err.value) == (
        f"{run / 'checkpoints'}: no complete, undamaged checkpoint (2 found, each incomplete "
        "or damaged)"
    )
