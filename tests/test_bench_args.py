"""Bad bench arguments exit 2 with one line, before any model is built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("value", ["9,5", "0,20", "5", "a,b"])
def test_clip_caption_tokens_must_be_an_increasing_pair(value: str, capsys) -> None:
    import bench_clip

    assert bench_clip.main(["--caption-tokens", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --caption-tokens must be LO,HI with 1 <= LO < HI"]


def _takes_threads(script: str, capsys) -> bool:
    """Whether the bench's own parser has a --threads option (from its --help text)."""
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return "--threads" in capsys.readouterr().out


def _record_commands(monkeypatch, succeed: bool = False) -> list[list[str]]:
    """run_all's bench commands, recorded instead of run (each reports failure; succeed:
    each writes its --markdown section as the bench does, with the arguments it was given)."""
    import subprocess

    import run_all

    commands: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        if succeed and "--markdown" in cmd:
            command = " ".join(["python", f"bench/{Path(cmd[1]).name}", *cmd[2:]])
            section = f"### {Path(cmd[1]).stem}\n\nCommand: `{command}`  \n- a figure\n"
            Path(cmd[cmd.index("--markdown") + 1]).write_text(section)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 1, "", "not run in this test")

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    return commands


def test_run_all_passes_threads_to_every_bench_that_takes_it(tmp_path: Path, monkeypatch, capsys):
    import run_all
    import torch

    commands = _record_commands(monkeypatch)
    before = torch.get_num_threads()
    try:
        assert run_all.main(["--quick", "--threads", "1", "--out", str(tmp_path / "R.md")]) == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert len(commands) == len(
        [*run_all.STEP_BENCHES, *run_all.MARKDOWN_BENCHES, *run_all.OTHER_BENCHES]
    )
    threaded = 0
    for cmd in commands:
        script = Path(cmd[1]).name
        if _takes_threads(script, capsys):
            threaded += 1
            # the bench would otherwise set torch to every core (common.set_threads(None))
            assert "--threads" in cmd and cmd[cmd.index("--threads") + 1] == "1", cmd
        else:
            assert "--threads" not in cmd, cmd
    assert threaded >= 8


def test_run_all_builds_the_same_commands_when_run_twice(tmp_path: Path, monkeypatch, capsys):
    import tempfile

    import run_all

    commands = _record_commands(monkeypatch)
    argv = ["--quick", "--only", "memory,actckpt,data", "--out", str(tmp_path / "R.md")]
    for _ in range(2):
        assert run_all.main(argv) == 1
    tmp = tempfile.gettempdir()  # the --markdown paths differ from run to run
    strip = [[a for a in c if not a.startswith(tmp)] for c in commands]
    assert strip[:3] == strip[3:]
    assert all(c.count("--markdown") <= 1 for c in commands), commands


def _run_all_cli(tmp_path: Path, monkeypatch, capsys, *args: str) -> str:
    """RESULTS.md of `python bench/run_all.py ARGS` (main() reads sys.argv), benches faked."""
    import run_all

    _record_commands(monkeypatch, succeed=True)
    out = tmp_path / "R.md"
    monkeypatch.setattr(sys, "argv", ["run_all.py", *args, "--out", str(out)])
    assert run_all.main() == 0
    capsys.readouterr()
    return out.read_text()


def test_run_all_header_shows_its_command_line_arguments(tmp_path: Path, monkeypatch, capsys):
    text = _run_all_cli(tmp_path, monkeypatch, capsys, "--quick", "--only", "actckpt")
    assert "Written by `python bench/run_all.py --quick --only actckpt --out " in text


def test_run_all_shows_the_commands_a_user_types(tmp_path: Path, monkeypatch, capsys) -> None:
    """RESULTS.md's Command lines hold no temporary --markdown path (run_all's own argument
    to the benches that write their own section)."""
    only = ("--only", "actckpt,host_memory")
    text = _run_all_cli(tmp_path, monkeypatch, capsys, "--quick", *only)
    commands = [line for line in text.splitlines() if line.startswith("Command:")]
    assert commands == [
        "Command: `python bench/bench_actckpt.py --quick`  ",
        "Command: `python bench/bench_host_memory.py --quick --steps 2`  ",
    ]
    assert "--markdown" not in text
    assert "- a figure\n\nWall time of the bench" in text  # the section's end is kept


@pytest.mark.parametrize("value", ["77,90", "80,200"])
def test_clip_caption_tokens_must_start_inside_the_context(value: str, capsys) -> None:
    import bench_clip

    # ViT-B-32's text context is 77 tokens: no end-of-text position can be drawn at 77 or later
    assert bench_clip.main(["--caption-tokens", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --caption-tokens LO must be below ViT-B-32's context length 77"]


# options of common.base_parser that these benches never read: they must be refused, not
# accepted and silently ignored (bench_host_memory always runs bf16 autocast, for one)
UNUSED_OPTIONS = {
    "bench_actckpt": ["--bf16", "--compile"],
    "bench_head_padding": ["--bf16", "--compile", "--budget", "--json"],
    "bench_host_memory": ["--bf16", "--compile", "--budget", "--json"],
    "bench_switches": ["--bf16"],
}


@pytest.mark.parametrize("script", sorted(UNUSED_OPTIONS))
def test_bench_options_it_does_not_act_on_are_refused(script: str, capsys) -> None:
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = capsys.readouterr().out
    for option in UNUSED_OPTIONS[script]:
        assert option not in help_text, (script, option)
    with pytest.raises(SystemExit) as exit_info:
        module.main([UNUSED_OPTIONS[script][0], "off"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_actckpt_reports_a_ratio_over_zero_memory_as_not_available(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import bench_actckpt
    import torch

    # a small model's forward can grow the RSS by nothing (its activations fit in memory
    # the allocator already holds): the "held after forward" ratio then has no denominator
    def fake_memory(args, checkpointing: bool) -> dict:
        return {"step_peak": 3 * 2**20, "rss_before": 2**30, "saved": 2**20 if checkpointing else 0}

    monkeypatch.setattr(bench_actckpt, "measure_memory", fake_memory)
    before = torch.get_num_threads()
    out = tmp_path / "actckpt.md"
    argv = ["--model", "test_tiny_vit", "--image-size", "32", "--batch", "2", "--rounds", "1"]
    try:
        assert bench_actckpt.main([*argv, "--markdown", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    text = out.read_text()
    assert "- held after forward, on / off: n/a" in text
    assert "- peak step memory, on / off: **1.00x**" in text


def test_clip_same_adamw_decays_the_parameters_open_clip_decays(monkeypatch, capsys) -> None:
    """The fp32 same-configuration AdamW of each side, against open_clip's training script's
    rule (`p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in name`: no decay)."""
    import bench_clip
    import common
    import torch

    class Stop(Exception):
        pass

    decayed: dict[str, tuple[int, int]] = {}  # side -> (tensors, elements) with weight decay
    modules: dict[str, torch.nn.Module] = {}
    real_adamw = common.adamw

    def spy(module, impl, lr=1e-4, wd=0.05, no_decay=()):
        opt = real_adamw(module, impl, lr, wd, no_decay)
        if impl == "default":  # the fp32 same-configuration paths
            side = "peer" if type(module).__module__.startswith("open_clip") else "mmssl"
            ps = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
            decayed[side], modules[side] = (len(ps), sum(p.numel() for p in ps)), module
            if side == "mmssl":
                raise Stop  # nothing is timed
        return opt

    peak = common.Peak("float32", 8, 1e9)
    monkeypatch.setattr(common, "adamw", spy)
    monkeypatch.setattr(common, "measure_peaks", lambda quick: {"float32": peak, "bfloat16": peak})
    monkeypatch.setattr(common, "count_flops", lambda fn: 1)
    before = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            bench_clip.main(["--quick", "--batch", "8"])
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()

    def excluded(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))

    reference = [p for n, p in modules["peer"].named_parameters() if not excluded(n, p)]
    assert decayed["peer"] == (len(reference), sum(p.numel() for p in reference))
    assert decayed["mmssl"] == decayed["peer"]  # ViT-B-32: (102, 151,072,768)


def test_run_all_targets_read_each_data_set_and_hue_mode_of_bench_data() -> None:
    """The Targets table judges the data pipeline per data set and hue mode from
    bench_data's printout, its lines made by bench_data's own `row` (the torch reference
    renderer's rows are not mmssl's pipeline; a run without numba still is)."""
    import bench_data
    import run_all

    printout = "\n".join(
        [
            "demo digits 32 px PNG: 16384 samples (webdataset 1024) x median of 5 rounds, batch 64",
            bench_data.row("hsv", [16436], [20000], [19800], [760.5], "numba"),
            bench_data.row("hsv torch", [9000], [20000], [19800], [760.5], "torch"),
            "",
            "synthetic 224 px JPEG: 1024 samples (webdataset 256) x median of 5 rounds, batch 64",
            bench_data.row("yiq", [1135], [2768], [2640], [1261], "torch: numba not installed"),
            bench_data.row("yiq torch", [1100], [2768], [2640], [1261], "torch"),
        ]
    )
    rows = run_all._data_targets(printout)
    assert len(rows) == 2
    assert rows[0].startswith("| data, demo digits 32 px PNG, hsv:")
    assert rows[0].endswith("| 0.82x decode, 21.61x webdataset | 0.8x yes, 0.9x no, 1.0x yes |")
    assert rows[1].startswith("| data, synthetic 224 px JPEG, yiq:")
    assert rows[1].endswith("| 0.41x decode, 0.90x webdataset | 0.8x no, 0.9x no, 1.0x no |")
    assert run_all._data_targets("") == [
        "| data pipeline targets | no data figures in this run | |"
    ]


# (bench, arguments, the start of its one-line error): each would otherwise end in a
# traceback after warm-ups (StatisticsError, ZeroDivisionError, a divisibility or
# ConfigError), print nan, or silently run on every core (--threads 0)
BAD_ARGS = [
    ("bench_vit", ["--model", "vit_small_patch32_224", "--image-size", "48"], "error: --image-size must be a multiple of the patch size 32 of vit_small_patch32_224"),
    ("bench_vit", ["--model", "bogus"], "error: --model bogus: unknown timm model"),
    ("bench_vit", ["--rounds", "0"], "error: --rounds must be >= 1"),
    ("bench_vit", ["--threads", "0"], "error: --threads must be >= 1"),
    ("bench_vit", ["--threads", "-1"], "error: --threads must be >= 1"),
    ("bench_vit", ["--budget", "nan"], "error: --budget must be a finite number"),
    ("bench_vit", ["--batch", "0", "--quick"], "error: --batch must be >= 1"),
    ("bench_features", ["--image-size", "40"], "error: --image-size must be a multiple of the patch size 16"),
    ("bench_features", ["--threads", "0"], "error: --threads must be >= 1"),
    ("bench_actckpt", ["--model", "vit_s32", "--image-size", "48"], "error: --image-size must be a multiple of the patch size 32 of vit_s32"),
    ("bench_actckpt", ["--model", "bogus"], "error: --model bogus: unknown model 'bogus'"),
    ("bench_actckpt", ["--rounds", "0"], "error: --rounds must be >= 1"),
    ("bench_actckpt", ["--threads", "-1"], "error: --threads must be >= 1"),
    ("bench_switches", ["--model", "bogus"], "error: --model bogus: unknown model"),
    ("bench_switches", ["--model", "vit_s32", "--image-size", "48"], "error: --image-size must be a multiple of the patch size 32"),
    ("bench_switches", ["--threads", "0"], "error: --threads must be >= 1"),
    ("bench_host_memory", ["--steps", "0"], "error: --steps must be >= 1"),
    ("bench_host_memory", ["--image-size", "40"], "error: --image-size must be a multiple of the patch size 16"),
    ("bench_host_memory", ["--threads", "0"], "error: --threads must be >= 1"),
    ("bench_memory", ["--model", "bogus"], "error: --model bogus: unknown model"),
    ("bench_memory", ["--model", "vit_s32", "--image-size", "48"], "error: --image-size must be a multiple of the patch size 32"),
    ("bench_memory", ["--steps", "0"], "error: --steps must be >= 1"),
    ("bench_memory", ["--ranks", "1"], "error: --ranks must be >= 2"),
    ("bench_memory", ["--impl", "bogus"], "error: --impl takes one of deepspeed, torch, foreach, fused, got 'bogus'"),
    ("bench_clip", ["--batch", "1"], "error: --batch must be >= 2"),
    ("bench_clip", ["--model", "bogus"], "error: --model bogus: unknown open_clip model"),
    ("bench_clip", ["--threads", "0"], "error: --threads must be >= 1"),
    ("bench_gpt", ["--num-heads", "0"], "error: --num-heads must be >= 1"),
    ("bench_gpt", ["--depth", "0"], "error: --depth must be >= 1"),
    ("bench_gpt", ["--threads", "0"], "error: --threads must be >= 1"),
    ("bench_attention", ["--reps", "0"], "error: --reps must be >= 1"),
    ("bench_attention", ["--threads", "0"], "error: --threads must be >= 1"),
    ("bench_tokenizer", ["--repeats", "0", "--num-texts", "8"], "error: --repeats must be >= 1"),
    ("bench_tokenizer", ["--num-texts", "0", "--repeats", "1"], "error: --num-texts must be >= 1"),
    ("bench_tokenizer", ["--context-length", "0", "--num-texts", "8"], "error: --context-length must be >= 1"),
    ("bench_data", ["--samples", "0"], "error: --samples must be >= 1"),
    ("bench_data", ["--rounds", "0"], "error: --rounds must be >= 1"),
    ("bench_data", ["--size", "1", "--only", "jpeg"], "error: --size must be >= 2"),
    ("bench_losses", ["--world-size", "0"], "error: --world-size must be >= 1"),
    ("bench_losses", ["--global-batch", "0", "--dim", "8", "--iters", "1"], "error: --global-batch must be >= 1"),
    ("bench_losses", ["--iters", "0", "--global-batch", "8", "--dim", "8"], "error: --iters must be >= 1"),
    ("profile_step", ["vit", "--steps", "0"], "error: --steps must be >= 1"),
    ("run_all", ["--threads", "0", "--only", "data"], "error: --threads must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("script", "argv", "error"), BAD_ARGS)
def test_bad_bench_arguments_exit_2_with_one_line_before_any_work(
    script: str, argv: list[str], error: str, monkeypatch, capsys
) -> None:
    import importlib

    import torch

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(torch, "set_num_threads", started)
    module = importlib.import_module(script)
    if script == "run_all":
        _record_commands(monkeypatch)  # the old run_all ran the benches with --threads 0
    assert module.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(error), err
    assert out == ""


def test_benches_say_threads_0_is_refused(capsys) -> None:
    """--threads 0 is refused (not taken as every core); the help says what the default is."""
    import bench_attention

    with pytest.raises(SystemExit):
        bench_attention.main(["--help"])
    assert ">= 1 (default: all cores)" in " ".join(capsys.readouterr().out.split())


def test_quick_keeps_the_checked_batch_a_contrastive_bench_needs() -> None:
    """--quick shrinks a checked batch to a quarter, not below the bench's least batch."""
    import argparse

    import common

    args = argparse.Namespace(quick=True, batch=4, rounds=None)
    common.apply_quick(args, min_batch=2)
    assert (args.batch, args.rounds) == (2, 2)


def test_bench_data_reports_medians_of_rotated_rounds_not_the_best_round() -> None:
    """The data bench reports the median round of each method, as the Performance issue
    asks of every bench: the best round of each, reported before, let one fast round of
    the ceiling set the ratio.  The order of the methods rotates every round."""
    import bench_data

    calls: list[str] = []
    values = {"a": iter([10.0, 12.0, 11.0]), "b": iter([9.0, 30.0, 10.0])}

    def method(name: str):
        def run() -> float:
            calls.append(name)
            return next(values[name])

        return run

    rates = bench_data.measure({k: method(k) for k in values}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert rates == {"a": [10.0, 12.0, 11.0], "b": [9.0, 30.0, 10.0]}
    line = bench_data.row("hsv", [9.0, 10.0, 30.0], [30.0, 10.0, 11.0], [11.0], [1.0], "numba")
    # medians 10 / 11 (the best rounds, 30 / 30, said 1.00x); per round 0.30, 1.00, 2.73
    assert "0.91x decode" in line and "(rounds 0.30-2.73x decode)" in line
