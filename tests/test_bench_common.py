"""bench/common.py: the helpers behind the benches' printed figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_bf16_master_decays_what_mmssl_training_decays() -> None:
    """The "bf16 weights + fp32 master" rows group weight decay as mmssl's trainer does: the
    (1, 1, D) class token and the (1, N, D) position table are not decayed."""
    import common

    from mmssl.models import create_model
    from mmssl.train.engine import param_groups

    model = create_model("test_tiny_vit")
    expected = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.05)}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model_ids = [id(p) for p in model.parameters() if p.requires_grad]
    master = common.Bf16Master(model, wd=0.05)
    name_of = {id(m): n for n, m in zip(names, master.master)}
    groups = {
        g["weight_decay"]: {name_of[id(m)] for m in g["params"]}
        for g in master.optimizer.param_groups
    }
    assert {"visual.cls_token", "visual.pos_embed"} <= groups[0.0]
    assert not {"visual.cls_token", "visual.pos_embed"} & groups[0.05]
    id_of = dict(zip(names, model_ids))
    for wd, group in groups.items():
        assert {id_of[n] for n in group} == expected[wd]


def test_gemm_floor_replays_the_steps_matmul_work_and_steps_the_optimizer() -> None:
    """bench/floor.py: the replay does exactly the FLOPs torch's flop counter counts for the
    bf16 training step (forward and backward, patch convolution included), with the
    operands' layouts (transposed weights, biases) as the step dispatched them,
    and it steps the optimizer."""
    import common
    import floor
    import torch

    from mmssl.models import create_model

    torch.manual_seed(0)
    model = create_model("test_tiny_vit")
    size = model.visual.cfg.image_size
    images = torch.rand(4, 3, size, size)

    def loss() -> torch.Tensor:
        return model.forward_features(images)["pooled"].float().pow(2).mean()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = common.train_step(loss, opt, bf16=True)
    expected = common.count_flops(lambda: loss().backward())
    model.zero_grad(set_to_none=True)
    calls = floor.record_gemms(step)
    layouts = [a for _, args, _ in calls for a in args if isinstance(a, floor.Layout)]
    assert any(len(a.shape) == 1 for a in layouts)  # addmm's bias
    assert any(len(a.stride) == 2 and a.stride[0] == 1 < a.stride[1] for a in layouts)
    assert {a.dtype for a in layouts} >= {torch.bfloat16}
    strides: dict[int, set] = {}
    for a in layouts:
        strides.setdefault(a.storage, set()).add(a.stride)
    assert any(len(s) > 1 for s in strides.values())  # a weight and its transpose: one storage
    replay = floor.gemm_floor(step, opt)
    assert common.count_flops(replay) == expected > 0
    before = [p.detach().clone() for p in model.parameters()]
    replay()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_gemm_floor_records_sdpa_s_fused_kernel_and_keeps_operands_apart() -> None:
    """Above 256 x 256 query-key pairs mmssl's bf16 attention runs SDPA's fused CPU kernel,
    whose GEMMs are not mm/bmm: the floor must replay it too.  Two blocks' weights are two
    operands in the replay, as in the step, not one tensor per layout."""
    import floor
    import torch

    from mmssl.nn.attention import Attention

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Attention(32, 2) for _ in range(2)])
    x = torch.randn(2, 300, 32, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = blocks[1](blocks[0](x))
        y.float().sum().backward()

    calls = floor.record_gemms(step)
    ops = {str(func) for func, _, _ in calls}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in ops
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward.default" in ops
    weights = {
        a
        for func, args, _ in calls
        if str(func) == "aten.addmm.default"
        for a in args
        if isinstance(a, floor.Layout) and a.shape == (32, 96)
    }
    assert len(weights) == 2  # each block's qkv weight (transposed), kept apart


def _row(name: str, side: str, wall: float, cpu: float, group: str | None = None) -> dict:
    return {"name": name, "side": side, "group": group, "median_s": wall, "cpu_median_s": cpu}


def test_the_floor_row_bounds_the_best_path_by_the_peers_fastest_path() -> None:
    """With a floor row, the ratios say how far mmssl could beat the peer's fastest path on
    these GEMMs (that path's time over the floor's, per clock), and the Targets table shows
    it beside the best-path ratio; without one, neither appears."""
    import common
    import run_all

    rows = [
        _row("peer fp32", "peer", 2.0, 4.0, "fp32"),
        _row("peer bf16", "peer", 1.0, 2.1),
        _row("peer bf16, other kernel", "peer", 0.8, 1.5),
        _row("mmssl bf16", "mmssl", 0.7, 1.4),
        _row("floor", "floor", 0.5, 1.2),
    ]
    ratios = common.ratios_from_rows(rows)
    ceiling = {k: v for k, v in ratios.items() if k.startswith(common.GEMM_CEILING)}
    assert ceiling == {
        f"{common.GEMM_CEILING} (wall): floor vs peer bf16, other kernel": 0.8 / 0.5,
        f"{common.GEMM_CEILING} (cpu): floor vs peer bf16, other kernel": 1.5 / 1.2,
    }
    assert ratios["best path (wall): mmssl bf16 vs peer bf16, other kernel"] == 0.8 / 0.7
    machine = {"isa": ["avx512_bf16"]}
    (line,) = [
        t
        for t in run_all._targets({"vit": {"paths": rows}}, machine)
        if t.startswith("| best path")
    ]
    assert "1.14x wall (" in line and "GEMMs + AdamW alone: 1.60x) | no |" in line
    without = [r for r in rows if r["side"] != "floor"]
    assert not any(k.startswith(common.GEMM_CEILING) for k in common.ratios_from_rows(without))
    (line,) = [
        t
        for t in run_all._targets({"vit": {"paths": without}}, machine)
        if t.startswith("| best path")
    ]
    assert "alone" not in line


def test_round_spreads_pair_the_two_paths_round_by_round() -> None:
    """Each wall ratio's spread is over the rounds' own ratios (round i of the peer over
    round i of mmssl), not over every pairing of the two lists, and the Targets table and
    RESULTS.md's ratio lines print it; CPU ratios (medians only) get none."""
    import common
    import run_all

    peer = {**_row("peer fp32", "peer", 1.0, 2.0, "fp32"), "times_s": [1.2, 1.0, 0.9]}
    ours = {**_row("mmssl fp32", "mmssl", 1.0, 2.0, "fp32"), "times_s": [1.0, 1.0, 1.0]}
    spreads = common.round_spreads([peer, ours])
    assert spreads == {  # the fastest fp32 paths are also each side's fastest
        "fp32 same config (wall): mmssl fp32 vs peer fp32": (0.9, 1.2),
        "best path (wall): mmssl fp32 vs peer fp32": (0.9, 1.2),
    }
    ours["times_s"] = [1.2, 1.0, 0.9]  # the same drift on both sides: paired, no spread
    assert set(common.round_spreads([peer, ours]).values()) == {(1.0, 1.0)}  # not 0.75-1.33
    (line,) = [
        t
        for t in run_all._targets({"vit": {"paths": [peer, ours]}}, {"isa": []})
        if t.startswith("| fp32 same config")
    ]
    assert "| 1.00x wall (rounds 1.00-1.00x), 1.00x CPU | yes |" in line
    for r in (peer, ours):
        r["peak_fraction"] = 0.5
    record = {"title": "t", "config": {}, "flops": 1.0, "rounds": 3, "paths": [peer, ours]}
    record.update(peaks={}, command="python bench/bench_vit.py", machine={"loadavg": [0.0]})
    md = "\n".join(run_all._table(record))
    assert "- fp32 same config (wall): mmssl fp32 vs peer fp32: **1.00x** (rounds 1.00-1.00x)" in md
    assert "- fp32 same config (cpu): mmssl fp32 vs peer fp32: **1.00x**\n" in md + "\n"


def test_the_same_work_ratio_pairs_the_peer_with_mmssl_doing_its_work() -> None:
    """A path doing the peer's work (group fp32-work: every token's row) gives the same-work
    ratio, printed in the fp32 target's row; it never stands for the same-config ratio,
    and a bench without one prints none."""
    import common
    import run_all

    rows = [
        _row("peer fp32", "peer", 1.3, 2.6, "fp32"),
        _row("mmssl fp32", "mmssl", 1.2, 2.4, "fp32"),
        _row("mmssl fp32 all tokens", "mmssl", 1.25, 2.5, "fp32-work"),
    ]
    ratios = common.ratios_from_rows(rows)
    assert ratios["fp32 same config (wall): mmssl fp32 vs peer fp32"] == 1.3 / 1.2
    assert ratios["fp32 same work (wall): mmssl fp32 all tokens vs peer fp32"] == 1.3 / 1.25
    (line,) = [
        t
        for t in run_all._targets({"vit": {"paths": rows}}, {"isa": []})
        if t.startswith("| fp32 same config")
    ]
    assert "1.08x wall, 1.08x CPU; doing timm's work (no row or column skipped" in line
    assert "): 1.04x wall | yes |" in line
    assert not any("same work" in k for k in common.ratios_from_rows(rows[:2]))


def test_the_zero3_memory_target_shows_the_measured_rss_beside_the_counted_bytes() -> None:
    """The target is met on the counted parameter + optimizer bytes; the measured peak RSS
    (higher under ZeRO-3 on the CPU) stands in the same row, not only further up."""
    import run_all

    memory = "\n".join(
        [
            "- bf16 ZeRO-3 / ZeRO-0, params+optimizer (max over ranks): **0.50x** (target <= 0.60)",
            "- bf16 ZeRO-3 / ZeRO-0, peak RSS above imports (max over ranks): **1.18x**",
            "- bf16 ZeRO-3 / ZeRO-0, peak RSS absolute (max over ranks): **1.07x**",
        ]
    )
    (line,) = [t for t in run_all._targets({"memory": memory}, {"isa": []}) if "ZeRO-3" in t]
    assert line == (
        "| bf16 ZeRO-3 / ZeRO-0: params+optimizer <= 0.6x ZeRO-0 | 0.50x (the tensors a rank "
        "holds, counted; peak RSS, measured: 1.18x above imports, 1.07x absolute) | yes |"
    )


def test_a_miss_is_never_printed_as_its_target() -> None:
    """0.996x misses 1.0x: the Targets table prints 0.996x beside "no", not 1.00x."""
    import run_all

    assert run_all._times(0.996, 1.0) == "0.996x"
    assert run_all._times(1.296, 1.3) == "1.296x"
    assert run_all._times(0.994, 1.0) == "0.99x"
    assert run_all._times(1.004, 1.0) == "1.00x"  # met: two decimals do not mislead
    peer = _row("peer fp32", "peer", 0.996, 2.0, "fp32")
    ours = _row("mmssl fp32", "mmssl", 1.0, 2.0, "fp32")
    (line,) = [
        t
        for t in run_all._targets({"vit": {"paths": [peer, ours]}}, {"isa": []})
        if t.startswith("| fp32 same config")
    ]
    assert "| 0.996x wall, 1.00x CPU | no |" in line


def test_the_first_step_after_the_warm_ups_is_not_timed(monkeypatch) -> None:
    """The first step after the warm-ups ran slow in every training bench, and it was always
    the first path's (the peer's).  A fake clock: each step takes 1 s, a path's second call
    (its first after the warm-ups) 1.8 s; every path's timed steps must be 1 s, and the rounds
    a budget buys leave out the warm-ups and the untimed round."""
    import common

    clock = {"now": 0.0}
    calls: dict[int, int] = {}

    def stepper(i: int):
        def step() -> None:
            calls[i] = calls.get(i, 0) + 1
            clock["now"] += 1.8 if calls[i] == 2 else 1.0

        return step

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(common.time, "process_time", lambda: clock["now"])
    paths = [common.Run(f"p{i}", "peer" if i else "mmssl", "float32", stepper(i)) for i in range(3)]
    assert common.alternate(paths, rounds=2, budget_s=0.0) == 2
    assert all(p.times == pytest.approx([1.0, 1.0]) for p in paths)
    assert calls == {0: 4, 1: 4, 2: 4}  # a warm-up, the untimed round, two timed rounds
    # the warm-ups take 3 s, the untimed round as long again: (15 - 2 x 3) // 3 = 3 rounds
    calls.clear()
    paths = [common.Run(f"p{i}", "peer", "float32", stepper(i + 10)) for i in range(3)]
    assert common.alternate(paths, rounds=None, budget_s=15.0, min_rounds=1) == 3
