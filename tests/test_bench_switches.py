"""bench_switches: --compile reaches the engine through the recipe's `train.compile`."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

COMPILED = "optim.impl=fused, train.compile=true"
TINY = ["--model", "test_tiny_vit", "--image-size", "32", "--batch", "2", "--rounds", "1"]


def _run_switches(monkeypatch, tmp_path: Path, backend: Any, *args: str) -> tuple[list, dict]:
    """bench_switches.main(TINY + args) with `backend` for mmssl's compile_blocks (aot_eager:
    compiled graphs without inductor's C++ build) -> ([(recipe, task) per engine], --json)."""
    import bench_switches
    import common

    import mmssl.nn.compile as nn_compile
    import mmssl.train.engine as train_engine

    original, real_initialize, engines = nn_compile.compile_blocks, train_engine.initialize, []

    def compile_blocks(module: torch.nn.Module, **kwargs: Any) -> int:
        return original(module, backend=backend)

    def initialize(task, recipe, ds_config):
        engines.append((recipe, task))
        return real_initialize(task, recipe, ds_config)

    monkeypatch.setattr(nn_compile, "compile_blocks", compile_blocks)
    monkeypatch.setattr(train_engine, "initialize", initialize)
    monkeypatch.setattr(bench_switches, "deepspeed_adam_built", lambda: False)
    peak = common.Peak("float32", 8, 1e9)
    monkeypatch.setattr(common, "matmul_peak", lambda dtype, **kwargs: peak)
    out = tmp_path / "switches.json"
    before = torch.get_num_threads()
    try:
        assert bench_switches.main([*TINY, *args, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return engines, json.loads(out.read_text())


@pytest.mark.slow
def test_compile_option_times_the_recipe_compile_path(tmp_path: Path, monkeypatch, capsys):
    """--compile (even with --quick) builds an engine from a recipe with train.compile=true,
    whose Blocks mmssl.nn.compile compiled, and times it."""
    from mmssl.nn.compile import Block, CompiledForward

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no eager fallback
        engines, record = _run_switches(monkeypatch, tmp_path, "aot_eager", "--quick", "--compile")
    capsys.readouterr()
    compiled = [task for recipe, task in engines if recipe.train.compile]
    assert len(compiled) == 1
    blocks = [m for m in compiled[0].modules() if isinstance(m, Block)]
    assert blocks and all(isinstance(b.forward, CompiledForward) for b in blocks)
    assert all(b.forward.failed is None for b in blocks)
    rows = {r["name"]: r for r in record["paths"]}
    assert len(rows[COMPILED]["times_s"]) == 1


@pytest.mark.slow
def test_a_failed_compilation_is_named_in_the_row(tmp_path: Path, monkeypatch, capsys):
    def broken(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        raise RuntimeError("no compiler here")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, record = _run_switches(monkeypatch, tmp_path, broken, "--quick", "--compile")
    assert "the Blocks ran eagerly (" in capsys.readouterr().out
    names = [r["name"] for r in record["paths"]]
    assert f"{COMPILED} (compile failed: ran eagerly)" in names


def test_quick_leaves_compile_out_and_the_two_options_exclude_each_other(
    tmp_path: Path, monkeypatch, capsys
):
    import bench_switches

    engines, _ = _run_switches(monkeypatch, tmp_path, "aot_eager", "--quick")
    capsys.readouterr()
    assert engines and not any(recipe.train.compile for recipe, _ in engines)
    with pytest.raises(SystemExit) as exit_info:
        bench_switches.main([*TINY, "--quick", "--compile", "--no-compile"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
