"""Report outputs: results.json fields, summary.md, PNG plots that open."""

from __future__ import annotations

import json
import math

import torch
from PIL import Image

from mmssl.eval.report import md_table, plot_confusion, plot_fewshot, write_report


def test_write_report(tmp_path):
    plot = plot_confusion(torch.tensor([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "cm.png", "t")
    doc = write_report(
        tmp_path,
        "zeroshot",
        {"top1": 0.875, "per_class": {"a": 0.75, "b": math.nan}, "cm": torch.eye(2)},
        model="m",
        data={"shards": "x.tar"},
        command=["mmssl", "eval", "zeroshot"],
        summary=md_table(["k", "v"], [["top1", 0.875]]),
        plots=[plot],
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == doc
    assert saved["results"]["per_class"]["b"] is None and saved["results"]["cm"] == [
        [1.0, 0.0],
        [0.0, 1.0],
    ]
    assert {"python", "torch", "deepspeed", "mmssl"} <= set(saved["versions"])
    assert saved["command"] == ["mmssl", "eval", "zeroshot"] and saved["data"] == {
        "shards": "x.tar"
    }
    md = (tmp_path / "summary.md").read_text()
    assert "| top1 | 0.8750 |" in md and "![cm](cm.png)" in md
    assert Image.open(plot).size[0] > 100


def test_plot_fewshot(tmp_path):
    path = plot_fewshot({"knn": {1: (0.5, 0.1), 4: (0.8, 0.05)}}, tmp_path / "fs.png", "t")
    assert Image.open(path).format == "PNG"


def test_write_report_replaces_only_a_report_of_its_own_task(tmp_path):
    import pytest

    from mmssl.eval.loading import EvalError

    def write(task: str) -> dict:
        return write_report(tmp_path, task, {"top1": 0.5}, model="m", data="d", command=["x"])

    (tmp_path / "summary.md").write_text("the training summary\n")  # a run directory's
    with pytest.raises(EvalError, match="not overwriting"):
        write("zeroshot")
    assert (tmp_path / "summary.md").read_text() == "the training summary\n"
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "summary.md").unlink()
    write("zeroshot")
    first = (tmp_path / "results.json").read_text()
    with pytest.raises(EvalError, match="results of eval zeroshot"):
        write("retrieval")
    assert (tmp_path / "results.json").read_text() == first
    assert write("zeroshot")["task"] == "zeroshot"  # its own earlier report is replaced


def test_the_summary_command_pastes_back_into_a_shell(tmp_path):
    """Recorded bare, `--data d/test-{0..1}.tar` expanded into extra arguments when pasted."""
    import shlex

    argv = ["mmssl", "eval", "zeroshot", "--data", "d/test-{0..1}.tar", "--classes", "a b"]
    write_report(tmp_path, "zeroshot", {"top1": 0.5}, model="m", data="d", command=argv)
    md = (tmp_path / "summary.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- command: "))
    assert shlex.split(line.removeprefix("- command: ").strip("`")) == argv
