"""The command a failed run's summary suggests is shell-quoted: pasted, it runs."""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("good", [None, "/tmp/r5/my runs/run/checkpoints/step_00000002"])
def test_the_resume_command_quotes_a_run_directory_with_a_space(
    monkeypatch: pytest.MonkeyPatch, world: int, good: str | None
) -> None:
    """out_dir '/tmp/r5/my runs' suggested `mmssl train /tmp/r5/my runs/run/recipe.yaml
    checkpoint.resume=auto`, two arguments where one was meant."""
    import mmssl.distributed
    from mmssl.train.run_summary import resume_hint

    monkeypatch.setattr(mmssl.distributed, "world_size", lambda: world)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    recipe = SimpleNamespace(run_dir=Path("/tmp/r5/my runs/run"))
    hint = resume_hint(recipe, good)  # type: ignore[arg-type]
    command = hint.split("`")[1]
    args = shlex.split(command)
    assert "/tmp/r5/my runs/run/recipe.yaml" in args, command
    assert args[-1] == "checkpoint.resume=auto", command
