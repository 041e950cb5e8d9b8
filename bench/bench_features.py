"""Inference feature extraction (images/s): mmssl `forward_features` vs timm on the same
weights.

    python bench/bench_features.py [--batch 32] [--image-size 224] [--compile] [--quick]

Under `torch.inference_mode()`: timm's `forward_features` vs mmssl's `forward_features`
(pooled + tokens) of `vit_small_patch16_224`.  fp32 same configuration; best paths: bf16
autocast on both sides (only where bf16 matmuls are fast, see --bf16), channels-last input
and (--compile) compiled blocks for mmssl.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def infer(fn, images: torch.Tensor, bf16: bool = False):
    def step() -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            fn(images)

    return step


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model", default="vit_small_patch16_224")
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"batch": 1, "image_size": 1}, models="timm")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    common.apply_quick(args)
    threads = common.set_threads(args.threads)
    import timm

    from mmssl.interop import load_timm_vit
    from mmssl.nn.compile import compile_blocks

    peaks = common.measure_peaks(args.quick)
    torch.manual_seed(0)
    peer = timm.create_model(args.model, img_size=args.image_size, pretrained=False).eval()
    ours = load_timm_vit(peer).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    with torch.inference_mode():
        diff = peer.forward_features(images)[:, 0] - ours.forward_features(images)["pooled"]
    print(f"same weights: max |pooled difference| {float(diff.abs().max()):.2e}")
    flops = common.count_flops(lambda: ours.forward_features(images))
    skip = common.bf16_skip_reason(args, peaks, flops)
    Run = common.Run
    runs = [
        Run("timm fp32", "peer", "float32", infer(peer.forward_features, images), "fp32"),
        Run("mmssl fp32", "mmssl", "float32", infer(ours.forward_features, images), "fp32"),
        Run(
            "mmssl fp32 channels-last input",
            "mmssl",
            "float32",
            infer(ours.forward_features, images.contiguous(memory_format=torch.channels_last)),
        ),
        Run(
            "timm bf16 autocast",
            "peer",
            "bfloat16",
            infer(peer.forward_features, images, True),
            skipped=skip,
        ),
        Run(
            "mmssl bf16 autocast",
            "mmssl",
            "bfloat16",
            infer(ours.forward_features, images, True),
            skipped=skip,
        ),
    ]
    if not skip:
        ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
        runs.append(
            Run(
                "mmssl bf16 weights",
                "mmssl",
                "bfloat16",
                infer(ours_bf16.forward_features, images.bfloat16()),
            )
        )
    if args.compile and not args.quick:
        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
        runs.append(
            Run("mmssl fp32 compiled", "mmssl", "float32", infer(compiled.forward_features, images))
        )
    print(f"torch threads {threads}; timing {sum(not r.skipped for r in runs)} paths", flush=True)
    rounds = common.alternate(runs, args.rounds, args.budget, 2 if args.quick else 3, peaks)
    config = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "threads": threads,
    }
    record = common.summarize(
        "Feature extraction vs timm (inference)",
        config,
        runs,
        flops,
        peaks,
        rounds,
        ("images/s", args.batch),
    )
    record["command"] = "python bench/bench_features.py " + " ".join(argv or sys.argv[1:])
    common.write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
