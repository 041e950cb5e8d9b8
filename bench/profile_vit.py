"""Where a ViT-S/16 bf16 training step spends its time, timm against mmssl (torch.profiler).

    python bench/profile_vit.py [--steps 3] [--rows 12]

Same weights (mmssl loads timm's), 112 px, batch 32, bf16 autocast, fused AdamW.  Prints
each side's self-CPU time per step, the share of matmul / attention / convolution kernels,
and the top ops.  With ~87% of a step in those kernels, no change around them can make one
side 1.3x faster than the other: that needs other kernels or fewer FLOPs.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

KERNELS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::convolution_backward",
    "aten::mkldnn_convolution",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args(argv)
    import timm

    from mmssl.interop import load_timm_vit

    torch.manual_seed(0)
    peer = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=112, num_classes=0
    ).train()
    ours = load_timm_vit(peer).train()
    x = torch.randn(32, 3, 112, 112)
    sides = {
        "timm": (peer, lambda: peer(x)),
        "mmssl": (ours, lambda: ours.forward_features(x)["pooled"]),
    }
    for name, (model, forward) in sides.items():
        opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=True)

        def step(opt: torch.optim.Optimizer = opt, forward=forward) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = forward()
            out.float().pow(2).mean().backward()
            opt.step()

        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        kernels = sum(e.self_cpu_time_total for e in events if e.key in KERNELS)
        print(
            f"== {name}: self CPU {total / args.steps / 1e6:.3f} s per step, "
            f"matmul + attention + convolution {kernels / total:.1%}"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
