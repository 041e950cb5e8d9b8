"""Activation checkpointing: step time and peak step memory with and without the recipe's
`train.activation_checkpointing`, on a ViT.

    python bench/bench_actckpt.py [--model vit_s16] [--image-size 112] [--batch 32]

The models come from the recipe path (`mmssl.train.recipe.model_config`, which switches
checkpointing on in every tower), on the same weights; one step = forward_features, a linear
classifier on the pooled features, cross-entropy, backward, fused AdamW.
- time: both settings alternate in this process (bench/common.py), median wall and CPU time;
- memory: each setting in a fresh process with glibc's mmap threshold at 128 KiB, so freed
  tensors go back to the OS and RSS follows the live tensors.  After one warm-up step
  (optimizer state allocated) and with the gradients freed, the peak RSS is reset
  (/proc/self/clear_refs) and the peak of the next step above the RSS before it is the
  step's memory beyond weights and optimizer state: activations saved for backward,
  gradients and temporaries.  "held after forward" is the RSS growth from the
  start of a forward to its end: what autograd keeps for the backward.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MB = 2**20


def build(model: str, image_size: int, checkpointing: bool) -> torch.nn.Module:
    """The vision tower of `model` as a recipe with `train.activation_checkpointing` builds it."""
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.recipe import model_config, recipe_from_dict

    recipe = recipe_from_dict(
        {
            "model": {"name": model, "overrides": {"vision": {"image_size": image_size}}},
            "train": {"activation_checkpointing": checkpointing},
        }
    )
    cfg = model_config(recipe)
    assert cfg.vision.grad_checkpointing is checkpointing
    torch.manual_seed(0)
    net = MultimodalModel(cfg).visual.train()
    net.add_module("bench_head", torch.nn.Linear(cfg.vision.dim, 1000))
    return net


def loss_fn(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    return lambda: F.cross_entropy(net.bench_head(net.forward_features(images)["pooled"]), labels)


def inputs(batch: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    return images, torch.randint(0, 1000, (batch,), generator=g)


def _kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_worker(args) -> dict:
    common.set_threads(args.threads)
    net = build(args.model, args.image_size, args.checkpointing == "on")
    images, labels = inputs(args.batch, args.image_size)
    opt = common.adamw(net, "fused")
    step = common.train_step(loss_fn(net, images, labels), opt)
    step()  # optimizer state and first-touch allocations
    opt.zero_grad(set_to_none=True)  # the baseline: weights and optimizer state only
    before = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    peak = _kb("VmHWM")
    opt.zero_grad(set_to_none=True)
    before_forward = _kb("VmRSS")
    loss = loss_fn(net, images, labels)()  # autograd now holds what backward will need
    saved = _kb("VmRSS") - before_forward
    del loss
    return {
        "step_peak": (peak - before) * 1024,
        "rss_before": before * 1024,
        "saved": saved * 1024,
    }


def measure_memory(args, checkpointing: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--memory-worker",
        "on" if checkpointing else "off",
        f"--model={args.model}",
        f"--image-size={args.image_size}",
        f"--batch={args.batch}",
    ]
    if args.threads:
        cmd.append(f"--threads={args.threads}")
    return common.run_worker(cmd, "memory worker", {"MALLOC_MMAP_THRESHOLD_": "131072"})


def _ratio(on: float, off: float) -> float | None:
    """on / off; None when `off` is 0 (a small model's forward can grow the RSS by nothing:
    its activations fit in memory the allocator already holds)."""
    return on / off if off else None


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__, bf16=False, compile=False)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--model", default="vit_s16", help="a registry name with a vision tower")
    p.add_argument("--memory-worker", choices=["on", "off"], default=None, dest="checkpointing")
    p.add_argument("--markdown", default=None, help="write a RESULTS.md section here")
    p.set_defaults(budget=60.0)
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"batch": 1, "image_size": 1}, models="mmssl")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    common.apply_quick(args)
    if args.checkpointing:
        print(json.dumps(memory_worker(args)))
        return 0
    memory = {on: measure_memory(args, on) for on in (False, True)}
    threads = common.set_threads(args.threads)
    peaks = {"float32": common.matmul_peak(torch.float32, reps=3)}
    plain = build(args.model, args.image_size, False)
    ckpt = build(args.model, args.image_size, True)
    ckpt.load_state_dict(copy.deepcopy(plain.state_dict()))
    images, labels = inputs(args.batch, args.image_size)
    with torch.no_grad():
        diff = (loss_fn(plain, images, labels)() - loss_fn(ckpt, images, labels)()).abs()
    print(f"same weights: |loss difference| {float(diff):.2e}")
    flops = common.count_flops(lambda: loss_fn(plain, images, labels)().backward())
    plain.zero_grad(set_to_none=True)
    runs = [
        common.Run(
            f"activation_checkpointing={on}",
            "mmssl",
            "float32",
            common.train_step(loss_fn(net, images, labels), common.adamw(net, "fused")),
        )
        for on, net in ((False, plain), (True, ckpt))
    ]
    rounds = common.alternate(runs, args.rounds, args.budget, 2 if args.quick else 3, peaks)
    config = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "optimizer": "fused AdamW",
        "threads": threads,
    }
    command = "python bench/bench_actckpt.py " + " ".join(argv or sys.argv[1:])
    lines = [
        f"### Activation checkpointing trade ({args.model}, {args.image_size} px)",
        "",
        f"Command: `{command}`  ",
        "Config: " + ", ".join(f"{k}={v}" for k, v in config.items()) + "  ",
        f"Rounds: {rounds}; step FLOPs without recomputation: {flops / 1e9:.2f} GFLOP; "
        f"load average at the end: {[round(x, 2) for x in os.getloadavg()]}",
        "",
        "| train.activation_checkpointing | median step s | CPU s | images/s "
        "| peak step memory MB | held after forward MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for (on, mem), run in zip(memory.items(), runs):
        cpu = statistics.median(run.cpu_times)
        lines.append(
            f"| {str(on).lower()} | {run.median:.3f} | {cpu:.3f} | {args.batch / run.median:.1f} "
            f"| {mem['step_peak'] / MB:.0f} | {mem['saved'] / MB:.0f} |"
        )
        rows.append({"checkpointing": on, "median_s": run.median, "cpu_median_s": cpu, **mem})
    ratios = {
        "step time (wall), on / off": _ratio(runs[1].median, runs[0].median),
        "step time (CPU), on / off": _ratio(rows[1]["cpu_median_s"], rows[0]["cpu_median_s"]),
        "peak step memory, on / off": _ratio(memory[True]["step_peak"], memory[False]["step_peak"]),
        "held after forward, on / off": _ratio(memory[True]["saved"], memory[False]["saved"]),
    }
    lines.append("")
    lines += [
        f"- {k}: **{v:.2f}x**" if v is not None else f"- {k}: n/a (nothing measured without)"
        for k, v in ratios.items()
    ]
    lines += [
        "",
        "Peak step memory: the RSS peak of one step above weights + optimizer state "
        "(activations, gradients, temporaries); held after forward: RSS growth over the "
        "forward.  Checkpointing keeps only each Block's input and recomputes the Block in "
        "the backward (one more forward: ~1.33x the FLOPs).",
        "",
    ]
    print("\n" + "\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines))
    if args.json:
        record = {"config": config, "rows": rows, "ratios": ratios, "rounds": rounds}
        record["command"] = command
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
