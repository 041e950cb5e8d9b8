"""Time and peak memory of the CLIP and SigLIP losses under data parallelism.

Simulates a global batch (default 4,096, D=512) on real gloo CPU processes (default 2) and
compares, per rank, forward + backward of:

- CLIP ``local_loss`` (B_local x B_global logits) against ``full`` (B_global x B_global);
- SigLIP ``chunked`` (ring exchange of text chunks) against ``local_loss`` (gathered texts)
  and ``full``.

Memory method: every configuration runs in a fresh set of processes. glibc is told to serve
every allocation above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the
resident set at once and RSS follows the live tensor bytes. After one warm-up step the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` <- 5), and the reported peak is
VmHWM - VmRSS(before the step): the extra resident memory of one forward + backward,
including gathered buffers, logits, saved activations and gradients. The inputs themselves
(2 x B_local x D fp32) exist before the measurement and are not counted.

    python bench/bench_losses.py [--global-batch 4096] [--dim 512] [--world-size 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mmssl.cliargs import summary

CONFIGS = [
    ("clip", "local_loss"),
    ("clip", "full"),
    ("siglip", "chunked"),
    ("siglip", "local_loss"),
    ("siglip", "full"),
]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rank_bench(loss: str, gather: str, global_batch: int, dim: int, iters: int) -> dict:
    from mmssl import distributed
    from mmssl.objectives import ClipLoss, SigLipLoss

    world = distributed.world_size()
    n = global_batch // world
    g = torch.Generator().manual_seed(distributed.rank())
    image = torch.randn(n, dim, generator=g).requires_grad_(True)
    text = torch.randn(n, dim, generator=g).requires_grad_(True)
    module = ClipLoss(gather=gather) if loss == "clip" else SigLipLoss(gather=gather)

    def step() -> float:
        image.grad = text.grad = None
        module.zero_grad(set_to_none=True)
        value = module(image, text)
        value.backward()
        return float(value.detach())

    step()  # warm-up: first-call allocations, gloo buffers
    distributed.barrier()
    resettable = _reset_peak()
    rss0 = _status_kib("VmRSS")
    hwm0 = _status_kib("VmHWM")
    t0 = time.perf_counter()
    value = 0.0
    for _ in range(iters):
        value = step()
    distributed.barrier()
    seconds = (time.perf_counter() - t0) / iters
    peak = _status_kib("VmHWM") - (rss0 if resettable else hwm0)
    return {"seconds": seconds, "peak_mib": peak / 1024, "loss": value, "reset": resettable}


def run_config(loss: str, gather: str, global_batch: int, dim: int, world: int, iters: int) -> dict:
    from distributed_utils import run_distributed

    per_rank = run_distributed(
        _rank_bench, world, loss, gather, global_batch, dim, iters, timeout=900.0
    )
    return {
        "seconds": max(r["seconds"] for r in per_rank),
        "peak_mib": max(r["peak_mib"] for r in per_rank),
        "peak_mib_ranks": [round(r["peak_mib"], 1) for r in per_rank],
        "loss": per_rank[0]["loss"],
        "reset": all(r["reset"] for r in per_rank),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    least = {"global_batch": 1, "dim": 1, "world_size": 1, "iters": 1}
    problem = common.args_problem(args, least)
    if not problem and args.global_batch % args.world_size:
        problem = "error: --global-batch must be divisible by --world-size"
    if problem:
        print(problem, file=sys.stderr)
        return 2
    # inherited by the spawned ranks: large tensors are mmapped and returned on free
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    b, w = args.global_batch, args.world_size
    n = b // w
    print(f"global batch {b}, D={args.dim}, {w} gloo ranks (B_local={n}), fp32, fwd+bwd")
    print(f"one logits matrix: local {n * b * 4 / 2**20:.0f} MiB, full {b * b * 4 / 2**20:.0f} MiB")
    results = {}
    for loss, gather in CONFIGS:
        r = run_config(loss, gather, b, args.dim, w, args.iters)
        results[(loss, gather)] = r
        print(
            f"{loss:7s} {gather:11s} {r['seconds'] * 1e3:9.1f} ms/step  "
            f"peak {r['peak_mib']:8.1f} MiB/rank {r['peak_mib_ranks']}  loss {r['loss']:.4f}"
            + ("" if r["reset"] else "  (peak counter not resettable: lifetime peak)"),
            flush=True,
        )

    def ratio(a: tuple[str, str], c: tuple[str, str]) -> str:
        ra, rc = results[a], results[c]
        return (
            f"{a[0]} {a[1]} / {c[1]}: memory {ra['peak_mib'] / rc['peak_mib']:.2f}x, "
            f"time {ra['seconds'] / rc['seconds']:.2f}x"
        )

    print(ratio(("clip", "local_loss"), ("clip", "full")))
    print(ratio(("siglip", "chunked"), ("siglip", "local_loss")))
    print(ratio(("siglip", "chunked"), ("siglip", "full")))
    print(ratio(("siglip", "local_loss"), ("siglip", "full")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
