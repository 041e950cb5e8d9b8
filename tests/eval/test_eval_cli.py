"""`mmssl eval` as a command: a mistyped task, and which summary it prints."""

from __future__ import annotations

import pytest

from mmssl.eval.cli import TASKS, main


@pytest.mark.parametrize("task, hint", [("zerosht", "did you mean 'zeroshot'? "), ("xyz", "")])
def test_an_unknown_task_is_one_line_with_the_close_one(
    task: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([task, "--model", "M"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"mmssl eval: error: unknown task {task!r}; {hint}choose from {', '.join(TASKS)}\n"
    )
