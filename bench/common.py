"""Shared helpers of the bench scripts: threads, machine description, matmul peaks, FLOP
counting, alternating timing and the result record that `run_all.py` collects.

Method (every training/inference bench):
- the peer and mmssl run the same configuration on the same weights (mmssl.interop);
- paths alternate inside one process, round by round, so a change of machine load hits
  every path alike and the ratios stay meaningful on a shared machine;
- each figure is the median over rounds of the wall time of one step; the process CPU
  time of the step is recorded next to it;
- FLOPs are counted once by `torch.utils.flop_counter` during a warm-up step (matmuls,
  convolutions, attention; forward and backward), and the achieved FLOP/s is given as a
  fraction of the matmul peak measured in the same process for the same dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mmssl.cliargs import summary

ROOT = Path(__file__).resolve().parents[1]
PEAK_SIZE = 2048


# ----------------------------------------------------------------------------- machine


def set_threads(n: int | None) -> int:
    """Fix torch's intra-op threads (None: every core) and one inter-op thread.  A bench
    refuses --threads below 1 (`args_problem`): 0 does not mean every core."""
    if n is None:
        n = os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return n


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    """What the figures were measured on (CPU, ISA extensions, versions, threads, load)."""
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("timm", "open_clip", "transformers", "deepspeed", "webdataset"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "isa": isa,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------------- matmul peak


@dataclass
class Peak:
    dtype: str
    size: int  # the n of the n x n matmul actually timed
    flops_per_s: float
    note: str = ""


def _time_matmul(n: int, dtype: torch.dtype, reps: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(
    dtype: torch.dtype, n: int = PEAK_SIZE, reps: int = 5, budget_s: float = 20.0
) -> Peak:
    """Median FLOP/s of an n x n matmul in `dtype` (after one warm-up).

    A CPU without bf16 matmul hardware (no AVX512-BF16/AMX) runs bf16 through a scalar
    fallback some 50-200x slower than fp32, where one 2048 matmul takes minutes: a 512
    probe estimates the cost first, and only then is the size lowered to fit `budget_s`
    (said in `note`).
    """
    name = str(dtype).replace("torch.", "")
    probe = 512
    _time_matmul(probe, dtype, 1)
    rate = 2 * probe**3 / _time_matmul(probe, dtype, 2)
    size, note = n, ""
    per_call = 2 * n**3 / rate
    if per_call * (reps + 1) > budget_s:
        size = probe
        while 2 * (size * 2) ** 3 / rate * (reps + 1) <= budget_s and size * 2 < n:
            size *= 2
        note = f"timed at {size}: one {n} matmul would take ~{per_call:.0f} s in {name} here"
    _time_matmul(size, dtype, 1)
    seconds = _time_matmul(size, dtype, reps)
    return Peak(name, size, 2 * size**3 / seconds, note)


def has_fast_bf16(peaks: dict[str, Peak]) -> bool:
    """bf16 steps are worth running only where bf16 matmuls are not slower than fp32 ones."""
    return peaks["bfloat16"].flops_per_s >= 0.5 * peaks["float32"].flops_per_s


# ----------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul/conv/attention FLOPs (2 per multiply-add) of one call of `fn`, fwd and bwd.

    Under SDPA's math kernel: the counter has no formula for the fused CPU attention kernels
    (it counts them as 0), while the math kernel's matmuls are counted like any other."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- paths


@dataclass
class Run:
    """One way of running the step: who, in which dtype, with what, and the step itself."""

    name: str
    side: str  # "peer" or "mmssl"
    dtype: str  # the matmul dtype: "float32" or "bfloat16"
    step: Callable[[], object]
    # "fp32": the same-configuration comparison; "fp32-work": an mmssl fp32 path that does the
    # peer's work too (every token's row), for the same-work ratio; "best": fast paths
    group: str = "best"
    flops: float | None = None  # this path's own work, where it differs from the bench's
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    skipped: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def _run(path: Run) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    path.step()
    return time.perf_counter() - t0, time.process_time() - c0


def alternate(
    paths: list[Run],
    rounds: int | None,
    budget_s: float,
    min_rounds: int = 3,
    peaks: dict[str, Peak] | None = None,
) -> int:
    """Warm up every path once, run one untimed round, then time them round-robin (order
    rotated every round).

    The untimed round: the first step after the warm-ups ran slow in every training bench
    (timm's fp32 step 1.74 s against its median 0.93 s, HF GPT-2's 4.42 against 2.97 s), and
    without it that step was always the first path's, the peer's.
    rounds=None picks as many rounds as fit `budget_s` (at least `min_rounds`, at most 7).
    peaks: each dtype's matmul peak is measured again after every round and the highest
    kept, so a load spike at start-up does not understate it (nor overstate a fraction).  Returns the number of rounds run.
    """
    live = [p for p in paths if not p.skipped]
    warm = 0.0
    for p in live:
        wall, _ = _run(p)
        warm += wall
        print(f"  warm-up {p.name:<34} {wall:8.2f} s", flush=True)
    for p in live:
        _run(p)
    if rounds is None:
        rounds = int(max(min_rounds, min(7, (budget_s - 2 * warm) // max(warm, 1e-9))))
    for r in range(rounds):
        k = r % max(len(live), 1)
        for p in live[k:] + live[:k]:
            wall, cpu = _run(p)
            p.times.append(wall)
            p.cpu_times.append(cpu)
        for name in peaks or {}:
            again = matmul_peak(getattr(torch, name), reps=3)
            if again.flops_per_s > peaks[name].flops_per_s:
                peaks[name] = again
            peaks[name].note = f"highest of {r + 2} measurements, one per round"
    return rounds


# ----------------------------------------------------------------------------- reporting


def fraction(flops: float, seconds: float, peak: Peak) -> float:
    return flops / seconds / peak.flops_per_s


def summarize(
    title: str,
    config: dict,
    paths: list[Run],
    flops: float,
    peaks: dict[str, Peak],
    rounds: int,
    unit: tuple[str, float] | None = None,
) -> dict:
    """Print the table and ratios; return the record written by `--json`.

    unit: optional (name, items per step), e.g. ("images/s", 32), for a throughput column.
    """
    print(f"\n== {title}")
    print("  config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    # paths that do other work (the peer's full last block, its padded captions) count theirs
    other = sorted({p.flops for p in paths if p.flops and p.flops != flops})
    also = "".join(f" ({o / 1e9:.2f} GFLOP on the paths that do more)" for o in other)
    print(
        f"  FLOPs per timed step (matmul/conv/attention; fwd+bwd when it trains): {flops / 1e9:.2f} GFLOP{also}; rounds: {rounds}"
    )
    for p in peaks.values():
        print(f"  matmul peak {p.dtype:<9} {p.flops_per_s / 1e9:8.2f} GFLOP/s  {p.note}")
    rows = []
    for p in paths:
        if p.skipped:
            print(f"  {p.name:<36} skipped: {p.skipped}")
            rows.append({"name": p.name, "side": p.side, "group": p.group, "skipped": p.skipped})
            continue
        med = p.median
        frac = fraction(p.flops or flops, med, peaks[p.dtype])
        thr = f"  {unit[1] / med:9.2f} {unit[0]}" if unit else ""
        print(
            f"  {p.name:<36} median {med:8.3f} s  cpu {statistics.median(p.cpu_times):8.3f} s"
            f"  {frac * 100:5.1f}% of {p.dtype} peak{thr}"
        )
        rows.append(
            {
                "name": p.name,
                "side": p.side,
                "group": p.group,
                "dtype": p.dtype,
                "median_s": med,
                "times_s": [round(t, 4) for t in p.times],
                "cpu_median_s": statistics.median(p.cpu_times),
                "peak_fraction": frac,
                "gflop": (p.flops or flops) / 1e9,
            }
        )
    ratios, spreads = ratios_from_rows(rows), round_spreads(rows)
    for key, value in ratios.items():
        print(f"  {key}: {value:.2f}x{spread_text(spreads.get(key))}")
    return {
        "title": title,
        "config": config,
        "flops": flops,
        "rounds": rounds,
        "peaks": {k: asdict(v) for k, v in peaks.items()},
        "paths": rows,
        "ratios": ratios,
        "machine": machine(),
    }


GEMM_CEILING = "the most these GEMMs allow"  # the ratio of the floor row, see ratios_from_rows


def _pairs(rows: list[dict]) -> list[tuple[str, dict, dict, str]]:
    """(ratio name, peer row, mmssl or floor row, the time key) of each ratio reported."""
    timed = [r for r in rows if "median_s" in r]
    out = []
    # (label, the peer's group, mmssl's group): None = any path.  "fp32 same work" pairs the
    # peer's fp32 paths with an mmssl fp32 path doing the peer's work (where a bench has one)
    pairs = (
        ("fp32 same config", "fp32", "fp32"),
        ("fp32 same work", "fp32", "fp32-work"),
        ("best path", None, None),
    )
    for label, peer_group, our_group in pairs:
        for clock, key in (("wall", "median_s"), ("cpu", "cpu_median_s")):
            sides = {}
            for side, group in (("peer", peer_group), ("mmssl", our_group)):
                cands = [r for r in timed if r["side"] == side and group in (None, r["group"])]
                if cands:
                    sides[side] = min(cands, key=lambda r: r[key])
            if len(sides) == 2:
                name = f"{label} ({clock}): {sides['mmssl']['name']} vs {sides['peer']['name']}"
                out.append((name, sides["peer"], sides["mmssl"], key))
    # the ceiling of any mmssl path on these GEMM kernels: the floor against the peer's best
    floor = [r for r in timed if r["side"] == "floor"]
    peer = [r for r in timed if r["side"] == "peer"]
    if floor and peer:
        for clock, key in (("wall", "median_s"), ("cpu", "cpu_median_s")):
            best = min(peer, key=lambda r: r[key])
            name = f"{GEMM_CEILING} ({clock}): {floor[0]['name']} vs {best['name']}"
            out.append((name, best, floor[0], key))
    return out


def ratios_from_rows(rows: list[dict]) -> dict[str, float]:
    """Speed-ups, peer time / mmssl time (> 1: mmssl is faster), by wall and by CPU time.

    fp32 same config: the best fp32-group path of each side; fp32 same work: the peer's
    against mmssl's fp32 path that does the peer's work (its pooled-only last block off, where
    a bench has such a path: the same-config margin then shows as work skipped, not as
    faster kernels); best path: the fastest timed
    path of each side; with a floor row (bench/floor.py: mmssl's bf16 step's GEMMs and
    AdamW alone), the floor against the peer's fastest path: no mmssl path that runs these
    GEMM kernels can beat the peer by more.  CPU time (process_time) is less disturbed by
    other jobs on a shared machine than wall time, so both are given.
    """
    return {name: peer[key] / ours[key] for name, peer, ours, key in _pairs(rows)}


def round_spreads(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """The lowest and highest per-round ratio of each wall-clock ratio of `ratios_from_rows`.

    `alternate` times every path once a round, so round i of the two paths ran seconds
    apart: their ratio pairs out the machine's slow drifts, and the spread over rounds shows
    how far one median ratio may be from the next run's (a 0.96x and a 1.03x of the same
    code on a shared VM fall in one spread)."""
    out = {}
    for name, peer, ours, key in _pairs(rows):
        if key == "median_s" and "times_s" in peer and "times_s" in ours:
            per_round = [p / o for p, o in zip(peer["times_s"], ours["times_s"]) if o > 0]
            if per_round:
                out[name] = (min(per_round), max(per_round))
    return out


def spread_text(spread: tuple[float, float] | None) -> str:
    """' (rounds 0.93-1.05x)': a ratio's per-round spread as printed beside it."""
    return f" (rounds {spread[0]:.2f}-{spread[1]:.2f}x)" if spread else ""


def base_parser(
    doc: str, *, bf16: bool = True, compile: bool = True, budget: bool = True, json: bool = True
) -> argparse.ArgumentParser:
    """The options every bench shares; a bench leaves out those it does not act on (False),
    so that they are refused rather than silently ignored."""
    p = argparse.ArgumentParser(description=summary(doc))
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, >= 1 (default: all cores)"
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: fit budget)")
    if budget:
        p.add_argument("--budget", type=float, default=150.0, help="seconds of timed rounds")
    p.add_argument("--quick", action="store_true", help="smaller batch, 2 rounds, no compile")
    if bf16:
        p.add_argument(
            "--bf16",
            choices=["auto", "on", "off"],
            default="auto",
            help="bf16 paths: auto runs them only where bf16 matmuls are at least half as fast "
            "as fp32",
        )
    if compile:
        p.add_argument("--compile", action="store_true", help="add the torch.compile'd mmssl path")
    if json:
        p.add_argument("--json", default=None, help="write the record here")
    return p


# the least value of the options base_parser gives every bench (a bench adds its own)
LEAST = {"threads": 1, "rounds": 1, "budget": 0}


def args_problem(
    args: argparse.Namespace,
    least: dict[str, float] | None = None,
    models: str | None = None,
    patch: int | None = None,
) -> str | None:
    """The one-line error for a bench's arguments, else None; called by every bench's main
    right after parsing, before any work.

    least: the least value of each numeric option (by its `args` name), on top of `LEAST`;
    an option left at None (its default) is not checked.  models: what --model names,
    "mmssl" (a registry name with a vision tower), "timm" (a timm ViT) or "open_clip":
    an unknown name is an error, and --image-size must be a multiple of its patch size
    (mmssl, timm); patch: the patch size --image-size must be a multiple of, for a bench
    whose model is fixed.
    """
    from mmssl.cliargs import check_numbers  # NaN, infinities and 64-bit overflow too

    lows = {**LEAST, **(least or {})}
    problem = check_numbers(
        args, {k: (lambda v, lo=lo: v >= lo, f">= {lo}") for k, lo in lows.items()}
    )
    if problem:
        return f"error: {problem}"
    if models is not None:
        patch, problem = _model_patch(models, args.model)
        if problem:
            return f"error: --model {args.model}: {problem}"
    if patch and args.image_size % patch:
        return (
            f"error: --image-size must be a multiple of the patch size {patch}"
            + (f" of {args.model}" if models else "")
            + f", got {args.image_size}"
        )
    return None


def _model_patch(models: str, name: str) -> tuple[int | None, str]:
    """(patch size or None, '' or why `name` is no model of `models`), without building it."""
    if models == "mmssl":
        from mmssl.models.registry import resolve_model_config
        from mmssl.schema import ConfigError

        try:
            vision = resolve_model_config(name).vision
        except (ConfigError, FileNotFoundError, ValueError) as err:
            return None, str(err).splitlines()[0]
        if vision is None:
            return None, "has no vision tower"
        return vision.patch_size, ""
    if models == "timm":
        import timm

        if not timm.is_model(name):
            return None, "unknown timm model"
        with torch.device("meta"):  # the architecture only: no memory, no initialisation
            model = timm.create_model(name, pretrained=False)
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None:
            return None, "not a ViT (no patch_embed)"
        size = patch_embed.patch_size
        return size[0] if isinstance(size, tuple) else size, ""
    if models == "open_clip":
        import open_clip

        if open_clip.get_model_config(name) is None:
            return None, "unknown open_clip model"
        return None, ""
    raise ValueError(f"models must be mmssl, timm or open_clip, got {models!r}")


def apply_quick(args: argparse.Namespace, min_batch: int = 1) -> None:
    """--quick: a quarter of the batch (at least `min_batch`) and 2 rounds unless given."""
    if args.quick:
        args.batch, args.rounds = max(min_batch, args.batch // 4), args.rounds or 2


def measure_peaks(quick: bool) -> dict[str, Peak]:
    reps = 3 if quick else 5
    return {
        "float32": matmul_peak(torch.float32, reps=reps),
        "bfloat16": matmul_peak(torch.bfloat16, reps=reps),
    }


def bf16_skip_reason(args: argparse.Namespace, peaks: dict[str, Peak], flops: float) -> str:
    """'' when bf16 paths should run, else why not (with the time a step would take)."""
    if args.bf16 == "on" or (args.bf16 == "auto" and has_fast_bf16(peaks)):
        return ""
    if args.bf16 == "off":
        return "--bf16 off"
    bf = peaks["bfloat16"].flops_per_s
    return (
        f"no bf16 matmul hardware: bf16 mm at {bf / 1e9:.2f} GFLOP/s vs fp32 "
        f"{peaks['float32'].flops_per_s / 1e9:.1f}, a step would take ~{flops / bf:.0f} s "
        "(--bf16 on forces it)"
    )


def run_worker(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run a bench's worker process (mmssl importable) and parse the JSON of its last line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(record: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------- training steps


def param_groups(
    module: torch.nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()
) -> list[dict]:
    """AdamW groups as timm, open_clip and HF build them: no decay for 1-D tensors, nor for
    the parameters whose last name is in `no_decay` (timm's `no_weight_decay()`)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim >= 2 and name.rsplit(".", 1)[-1] not in no_decay

    return [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]


def adamw(
    module: torch.nn.Module,
    impl: str,
    lr: float = 1e-4,
    wd: float = 0.05,
    no_decay: tuple[str, ...] = (),
):
    """torch AdamW with `impl` 'default' (a for-loop on CPU), 'foreach' or 'fused'."""
    kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return torch.optim.AdamW(param_groups(module, wd, no_decay), lr=lr, **kwargs)


def train_step(
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    bf16: bool = False,
    switch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], None]:
    """zero_grad -> loss (under bf16 autocast if asked) -> backward -> step, no host sync.

    switch: a context held around forward and backward, e.g. a peer's other attention kernel.
    """

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with switch():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn()
            loss.backward()
        optimizer.step()

    return step


class Bf16Master:
    """bf16 weights with fp32 master weights (what DeepSpeed's bf16 mode does): the model runs
    and back-propagates in bf16, a fused AdamW updates fp32 copies, which are cast back.
    As in DeepSpeed, the fp32 gradients live in buffers kept across steps (a fresh 4-byte
    copy of every gradient per step would page-fault its memory in each time).  Weight decay
    is grouped as mmssl's trainer groups it (`mmssl.train.engine.param_groups`: no decay for
    1-D tensors, token and position embeddings, class token)."""

    def __init__(self, module: torch.nn.Module, lr: float = 1e-4, wd: float = 0.05):
        from mmssl.train.engine import param_groups as mmssl_param_groups

        self.model_params = [p for p in module.parameters() if p.requires_grad]
        master_of = {id(p): torch.nn.Parameter(p.detach().float()) for p in self.model_params}
        self.master = [master_of[id(p)] for p in self.model_params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        groups = [
            {**g, "params": [master_of[id(p)] for p in g["params"]]}
            for g in mmssl_param_groups(module, wd)
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
        module.to(torch.bfloat16)

    def step_fn(self, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for p in self.model_params:
                p.grad = None
            loss_fn().backward()
            for m, p in zip(self.master, self.model_params):
                m.grad.copy_(p.grad)
            self.optimizer.step()
            with torch.no_grad():
                torch._foreach_copy_(self.model_params, self.master)

        return step
