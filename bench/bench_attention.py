"""Attention kernels on CPU: SDPA's fused kernel against matmul + softmax + matmul.

    python bench/bench_attention.py [--reps 15] [--threads N]

The shapes of the step benches (ViT-S/16 at 112 px, open_clip ViT-B-32's two towers,
the GPT config) and longer causal sequences to find the crossover, in bf16 and fp32,
forward only (feature extraction) and forward + backward (training).  The two kernels
alternate within each repetition; the median of each is printed, with the ratio
SDPA / matmul (above 1: matmul is faster) and what `Attention(kernel="auto")` picks.
Both kernels get the same inputs; the largest difference of their outputs is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mmssl.cliargs import summary
from mmssl.nn.attention import _use_matmul, matmul_attention  # noqa: E402

# (label, batch, heads, tokens, causal)
SHAPES = [
    ("ViT-S/16 112 px", 32, 6, 50, False),
    ("ViT-B/32 224 px", 16, 12, 50, False),
    ("CLIP text 77", 16, 8, 77, True),
    ("causal 128", 8, 6, 128, True),
    ("ViT-B/16 224 px", 8, 12, 197, False),
    ("GPT ctx 256", 8, 6, 256, True),
    ("causal 512", 4, 6, 512, True),
]


def _time(fn, q, k, v, causal: bool, train: bool) -> float:
    t = time.perf_counter()
    if train:
        fn(q, k, v, causal).sum().backward()
    else:
        with torch.no_grad():
            fn(q, k, v, causal)
    return time.perf_counter() - t


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def matmul(q, k, v, causal):
    return matmul_attention(q, k, v, is_causal=causal)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, >= 1 (default: all cores)"
    )
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"reps": 1})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    threads = common.set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads, median of {args.reps} alternating reps")
    print(
        f"{'shape':18} {'B x H x N':>12} {'dtype':>6} {'pass':>8} {'sdpa ms':>9} "
        f"{'matmul ms':>10} {'ratio':>6} {'auto':>7} {'max diff':>9}"
    )
    g = torch.Generator().manual_seed(0)
    for label, b, h, n, causal in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(b, h, n, 64, generator=g).to(dtype) for _ in range(3))
            for t in (q, k, v):
                t.requires_grad_(True)
            with torch.no_grad():
                diff = (sdpa(q, k, v, causal).float() - matmul(q, k, v, causal).float()).abs().max()
            pick = "matmul" if _use_matmul("auto", q, k) else "sdpa"
            for train in (False, True):
                times: dict[str, list[float]] = {"sdpa": [], "matmul": []}
                for _ in range(2):  # warm-up
                    _time(sdpa, q, k, v, causal, train), _time(matmul, q, k, v, causal, train)
                for _ in range(args.reps):
                    times["sdpa"].append(_time(sdpa, q, k, v, causal, train))
                    times["matmul"].append(_time(matmul, q, k, v, causal, train))
                s, m = (statistics.median(times[x]) * 1e3 for x in ("sdpa", "matmul"))
                print(
                    f"{label:18} {f'{b}x{h}x{n}':>12} {str(dtype)[6:]:>6} "
                    f"{'fwd+bwd' if train else 'fwd':>8} {s:9.2f} {m:10.2f} {s / m:6.2f} "
                    f"{pick:>7} {diff:9.1e}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
