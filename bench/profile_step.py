"""Where a bf16 training step spends its time, peer against mmssl (torch.profiler).

    python bench/profile_step.py vit|clip|gpt [--steps 3] [--rows 12]

Same weights (mmssl loads the peer's) and the configurations of bench_vit.py (timm
ViT-S/16, 112 px, batch 32), bench_clip.py (open_clip ViT-B-32, batch 16) and
bench_gpt.py (HF GPT-2, 6 x 384, context 256, batch 8).  Each side runs its best path of
those benches: the peer under bf16 autocast with its own optimizer (ViT and CLIP: also with
its unfused attention), mmssl under bf16 autocast with fused AdamW (GPT: and the fused
head + loss).  Prints each side's self-CPU
time per step, the share of matmul / attention / convolution kernels, and the top ops.
Where one side spends ~85% of a step in those kernels, no change around them can make
the other 1.3x faster: that needs other kernels or fewer FLOPs; where the peer spends a
third of its step elsewhere (GPT's fp32 logits), a fused op can.  A kernel itself can be
the outlier: SDPA's CPU flash backward took 23% of timm's ViT-S/16 step at 50 tokens,
for ~1% of its FLOPs (hence mmssl.nn.attention's matmul kernel).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mmssl.cliargs import summary

KERNELS = (
    "aten::mm",
    "aten::_softmax",
    "aten::_softmax_backward_data",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::convolution_backward",
    "aten::mkldnn_convolution",
)
Side = tuple[torch.nn.Module, Callable[[], torch.Tensor], bool]  # model, loss, fused AdamW


def vit_sides() -> dict[str, Side]:
    import timm

    from mmssl.interop import load_timm_vit

    peer = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=112, num_classes=0
    ).train()
    ours = load_timm_vit(peer).train()
    unfused = copy.deepcopy(peer)
    for m in unfused.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = torch.randn(32, 3, 112, 112)
    return {
        "timm": (peer, lambda: peer(x).float().pow(2).mean(), True),
        "timm, unfused attention": (unfused, lambda: unfused(x).float().pow(2).mean(), True),
        "mmssl": (ours, lambda: ours.forward_pooled(x).float().pow(2).mean(), True),
    }


def clip_sides() -> dict[str, Side]:
    import open_clip
    from open_clip.loss import ClipLoss

    from mmssl.interop import load_open_clip
    from mmssl.objectives import clip_loss

    peer = open_clip.create_model("ViT-B-32", pretrained=None).train()
    ours = load_open_clip(peer).train()
    images = torch.randn(16, 3, 224, 224)
    text = torch.randint(1, peer.vocab_size - 1, (16, peer.context_length))
    text[:, -1] = peer.vocab_size - 1
    criterion = ClipLoss()

    def math_loss() -> torch.Tensor:  # the kernel choice matters in the forward only
        with sdpa_kernel(SDPBackend.MATH):
            return criterion(*peer(images, text))

    def ours_loss() -> torch.Tensor:
        img, txt = ours(images, text, text != 0)
        return clip_loss(img.float(), txt.float(), ours.logit_scale.exp())

    return {
        "open_clip": (peer, lambda: criterion(*peer(images, text)), False),
        "open_clip, SDPA math kernel": (peer, math_loss, False),
        "mmssl": (ours, ours_loss, True),
    }


def gpt_sides() -> dict[str, Side]:
    import transformers

    from mmssl.interop import load_hf_gpt2
    from mmssl.objectives import head_next_token_loss

    cfg = transformers.GPT2Config(
        n_layer=6,
        n_embd=384,
        n_head=6,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    peer = transformers.GPT2LMHeadModel(cfg).train()
    ours = load_hf_gpt2(peer).train()
    tokens = torch.randint(0, cfg.vocab_size, (8, 256))
    text = ours.text

    def ours_loss() -> torch.Tensor:
        return head_next_token_loss(text.forward_tokens(tokens), text.head_weight(), tokens)

    return {
        "HF GPT-2": (peer, lambda: peer(tokens, labels=tokens).loss, True),
        "mmssl": (ours, ours_loss, True),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("model", choices=["vit", "clip", "gpt"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"steps": 1, "rows": 1})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    torch.manual_seed(0)
    sides = {"vit": vit_sides, "clip": clip_sides, "gpt": gpt_sides}[args.model]()
    for name, (model, loss_fn, fused) in sides.items():
        opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=fused or None)

        def step(opt: torch.optim.Optimizer = opt, loss_fn=loss_fn) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn()
            loss.float().backward()
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
