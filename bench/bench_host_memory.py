"""Host memory kept for reuse (`train.keep_host_memory`): a bf16 ViT step with glibc's default
malloc against the trainer's setting (mmssl.train.host_memory), for timm and for mmssl.

    python bench/bench_host_memory.py [--batch 32] [--image-size 112] [--rounds 3]

The setting is process-wide, so each (side, setting) pair runs in a fresh process, and the
four processes alternate within each round.  Each process builds timm's
`vit_small_patch16_224` (mmssl loads the same weights), takes 2 warm-up steps and then
`--steps` timed ones: bf16 autocast with fused AdamW, timm with its faster unfused attention
(as bench_vit.py's best peer path).  Reported per pair: the median over rounds of each
process's median step, minor page faults per timed step, and the peak RSS.  The setting
helps the peer as much as mmssl: it is a property of the process, not of the library, and
bench_vit.py's ratios do not use it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PAIRS = [("timm", "default"), ("timm", "keep"), ("mmssl", "default"), ("mmssl", "keep")]


def worker(args) -> dict:
    from mmssl.train.host_memory import keep_freed_memory

    took = keep_freed_memory() if args.mode == "keep" else None
    common.set_threads(args.threads)
    import timm

    from mmssl.interop import load_timm_vit

    torch.manual_seed(0)
    peer = timm.create_model(
        "vit_small_patch16_224", img_size=args.image_size, pretrained=False
    ).train()
    if args.side == "timm":
        for m in peer.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        net, forward = peer, peer.forward
    else:
        net = load_timm_vit(peer).train()
        net.add_module("bench_head", peer.head)
        del peer
        forward = lambda x: net.bench_head(net.forward_features(x)["pooled"])  # noqa: E731
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, 1000, (args.batch,), generator=g)
    step = common.train_step(
        lambda: F.cross_entropy(forward(images), labels), common.adamw(net, "fused"), bf16=True
    )
    for _ in range(2):
        step()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "took": took,
        "median_s": statistics.median(times),
        "faults_per_step": faults / args.steps,
        "peak_rss_mb": peak_kb / 1024,
    }


def run_worker(args, side: str, mode: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        mode,
        f"--batch={args.batch}",
        f"--image-size={args.image_size}",
        f"--steps={args.steps}",
    ]
    if args.threads:
        cmd.append(f"--threads={args.threads}")
    return common.run_worker(cmd, f"{side} {mode} worker")


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__, bf16=False, compile=False, budget=False, json=False)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "MODE"), default=None)
    p.add_argument("--markdown", default=None, help="write a RESULTS.md section here")
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"batch": 1, "image_size": 1, "steps": 1}, patch=16)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    common.apply_quick(args)
    if args.worker:
        args.side, args.mode = args.worker
        print(json.dumps(worker(args)))
        return 0
    rounds = args.rounds or 3
    results: dict[tuple[str, str], list[dict]] = {pair: [] for pair in PAIRS}
    for r in range(rounds):
        for pair in PAIRS if r % 2 == 0 else PAIRS[::-1]:
            results[pair].append(run_worker(args, *pair))
            print(f"round {r + 1}: {pair[0]} {pair[1]}: {results[pair][-1]}", flush=True)
    med = {
        pair: {k: statistics.median(x[k] for x in rs) for k in rs[0] if k != "took"}
        for pair, rs in results.items()
    }
    took = all(x["took"] for x in results[("mmssl", "keep")])
    command = "python bench/bench_host_memory.py " + " ".join(argv or sys.argv[1:])
    lines = [
        f"### Host memory kept for reuse (train.keep_host_memory), ViT-S/16 {args.image_size} px",
        "",
        f"Command: `{command}`  ",
        f"Config: batch={args.batch}, bf16 autocast, fused AdamW, {args.steps} timed steps per "
        f"process, {rounds} rounds of 4 processes; threads={common.set_threads(args.threads)}; "
        f"mallopt took: {took}; load average at the end: "
        f"{[round(x, 2) for x in os.getloadavg()]}",
        "",
        "| side | malloc | median step s | page faults per step | peak RSS MB |",
        "|---|---|---:|---:|---:|",
    ]
    for (side, mode), m in med.items():
        lines.append(
            f"| {side} | {mode} | {m['median_s']:.3f} | {m['faults_per_step']:.0f} "
            f"| {m['peak_rss_mb']:.0f} |"
        )
    ratios = {
        "timm: default / keep step time": med[("timm", "default")]["median_s"]
        / med[("timm", "keep")]["median_s"],
        "mmssl: default / keep step time": med[("mmssl", "default")]["median_s"]
        / med[("mmssl", "keep")]["median_s"],
        "default malloc: timm / mmssl step time": med[("timm", "default")]["median_s"]
        / med[("mmssl", "default")]["median_s"],
        "kept heap: timm / mmssl step time": med[("timm", "keep")]["median_s"]
        / med[("mmssl", "keep")]["median_s"],
    }
    lines += [""] + [f"- {k}: **{v:.2f}x**" for k, v in ratios.items()]
    lines += [
        "",
        "Each process runs one side with one malloc setting (the setting is process-wide); "
        "`keep` is what `mmssl train` sets on the CPU by default.  It speeds up the peer too: "
        "the ratios of the step benches above run with glibc's default.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
