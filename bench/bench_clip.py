"""CLIP training step: mmssl vs open_clip ViT-B-32 on the same weights.

    python bench/bench_clip.py [--batch 16] [--compile] [--quick]

One step = encode 224 px images and 77-token texts, the symmetric InfoNCE loss with the
learnable logit scale (open_clip's `ClipLoss` / mmssl's `clip_loss`), backward, AdamW (as
open_clip's training script builds it: torch AdamW, no decay for gains, biases and the
class token; the fast paths of both sides use torch's fused AdamW).
Texts are random tokens ending in the end-of-text id (the largest id, which open_clip pools
at) and zero-padded; mmssl gets `text_mask = text != 0`.  Paths: see bench/bench_vit.py.
Both sides pad to the 77-token context; mmssl's text tower skips the columns that are
padding in every caption (`mmssl.models.text_masks.trim_padding`), open_clip runs them.  The
default end-of-text positions (5-76; one caption ends at 76) leave nothing to skip;
`--caption-tokens 5,20` (web-caption lengths) shows the skip.  The FLOPs line counts mmssl's
work; each side's fraction of the peak is computed from its own work.  Both towers' last
blocks compute the pooled rows only (see bench/bench_vit.py); "mmssl fp32 all tokens" does
open_clip's work (every row, no column trimmed), for the same-work ratio.
The floor row times the GEMMs of mmssl's bf16 autocast step alone (bench/floor.py).
open_clip's towers attend through torch's SDPA (`nn.MultiheadAttention`); the peer also
runs under `sdpa_kernel(SDPBackend.MATH)`, torch's unfused kernel, and its best path is the
faster of the two.  On the CPU (torch 2.14) the MATH kernel computes a bf16 attention in
fp32 (it casts q, k, v up): open_clip offers no bf16 matmul attention, which mmssl's bf16
path uses at these lengths, so part of the best-path margin is that kernel (about 4% of the
open_clip step, measured by patching SDPA in a review).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from floor import FLOOR_PATH, gemm_floor  # noqa: E402

# open_clip's class token (`class_embedding`) is 1-D, so its training script does not decay
# it; mmssl holds it as (1, 1, D), which the 1-D rule alone would decay
NO_DECAY = ("cls_token",)


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument(
        "--caption-tokens",
        default="5,77",
        help="LO,HI: the end-of-text position, drawn uniformly from [LO, HI) (at most the "
        "context); a caption holds position + 1 tokens.  5,20: web-caption lengths",
    )
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"batch": 2}, models="open_clip")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        lo, hi = (int(v) for v in args.caption_tokens.split(","))
    except ValueError:
        lo = hi = 0
    if not 1 <= lo < hi:
        print("error: --caption-tokens must be LO,HI with 1 <= LO < HI", file=sys.stderr)
        return 2
    common.apply_quick(args, min_batch=2)  # a contrastive loss needs negatives: batch >= 2
    threads = common.set_threads(args.threads)
    import open_clip
    from open_clip.loss import ClipLoss as PeerClipLoss

    from mmssl.interop import load_open_clip
    from mmssl.nn.compile import compile_blocks
    from mmssl.objectives import clip_loss

    # the end-of-text positions are drawn from [LO, min(HI, context)): LO must be inside
    text_cfg = (open_clip.get_model_config(args.model) or {}).get("text_cfg", {})
    context = text_cfg.get("context_length", 77)
    if lo >= context:
        print(
            f"error: --caption-tokens LO must be below {args.model}'s context length {context}",
            file=sys.stderr,
        )
        return 2
    peaks = common.measure_peaks(args.quick)
    torch.manual_seed(0)
    peer = open_clip.create_model(args.model, pretrained=None).train()
    ours = load_open_clip(peer).train()
    size = peer.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    ctx, vocab = peer.context_length, peer.vocab_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=g)
    lengths = torch.randint(lo, min(hi, ctx), (args.batch,), generator=g)
    lengths[0] = min(hi, ctx) - 1  # the longest caption reaches the range's end
    text = torch.randint(1, vocab - 1, (args.batch, ctx), generator=g)
    pos = torch.arange(ctx)[None]
    text = torch.where(pos == lengths[:, None], vocab - 1, text)
    text = torch.where(pos > lengths[:, None], 0, text)
    mask = text != 0
    with torch.no_grad():
        pi, pt, _ = peer(images, text)
        oi, ot = ours(images, text, mask)
        diff = max(float((pi - oi).abs().max()), float((pt - ot).abs().max()))
    print(f"same weights: max |embedding difference| {diff:.2e}")
    peer_criterion = PeerClipLoss()

    def peer_loss() -> torch.Tensor:
        img, txt, scale = peer(images, text)
        return peer_criterion(img, txt, scale)

    def make_ours_loss(model: torch.nn.Module):
        def loss() -> torch.Tensor:
            img, txt = model(images, text, mask)
            return clip_loss(img, txt, model.logit_scale.exp())

        return loss

    ours_loss = make_ours_loss(ours)

    def all_tokens_loss() -> torch.Tensor:  # open_clip's work: every row, no column trimmed
        v, t = ours.visual, ours.text
        img = v.proj(v.forward_features(images)["pooled"])
        txt = t.proj(t.forward_features(text, mask)["pooled"])
        img, txt = (torch.nn.functional.normalize(e, dim=-1) for e in (img, txt))
        return clip_loss(img, txt, ours.logit_scale.exp())

    flops = common.count_flops(lambda: ours_loss().backward())
    ours.zero_grad(set_to_none=True)
    # open_clip runs every caption to the context length; mmssl drops all-padding columns,
    # so each side's fraction of the peak is computed from its own work
    peer_flops = common.count_flops(lambda: peer_loss().backward())
    peer.zero_grad(set_to_none=True)
    peer_opt = common.adamw(peer, "default", lr=5e-4, wd=0.2)
    peer_fused = common.adamw(peer, "fused", lr=5e-4, wd=0.2)  # its fast paths, as mmssl's
    Run = common.Run
    runs = [
        Run(
            "open_clip fp32",
            "peer",
            "float32",
            common.train_step(peer_loss, peer_opt),
            "fp32",
            flops=peer_flops,
        ),
        Run(
            "mmssl fp32 (same AdamW)",
            "mmssl",
            "float32",
            common.train_step(ours_loss, common.adamw(ours, "default", 5e-4, 0.2, NO_DECAY)),
            "fp32",
        ),
        Run(
            "mmssl fp32 fused AdamW",
            "mmssl",
            "float32",
            common.train_step(ours_loss, common.adamw(ours, "fused", 5e-4, 0.2, NO_DECAY)),
        ),
        Run(
            "mmssl fp32 all tokens (same AdamW)",
            "mmssl",
            "float32",
            common.train_step(all_tokens_loss, common.adamw(ours, "default", 5e-4, 0.2, NO_DECAY)),
            "fp32-work",
            flops=common.count_flops(lambda: all_tokens_loss().backward()),
        ),
    ]
    ours.zero_grad(set_to_none=True)
    skip = common.bf16_skip_reason(args, peaks, flops)
    bf16_opt = common.adamw(ours, "fused", 5e-4, 0.2, NO_DECAY)
    bf16_step = common.train_step(ours_loss, bf16_opt, True)
    bf16_runs = [
        Run(
            "open_clip bf16 autocast fused AdamW",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_fused, True),
            skipped=skip,
            flops=peer_flops,
        ),
        Run(
            "open_clip bf16 autocast fused AdamW, SDPA math kernel",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_fused, True, lambda: sdpa_kernel(SDPBackend.MATH)),
            skipped=skip,
            flops=peer_flops,
        ),
        Run("mmssl bf16 autocast fused AdamW", "mmssl", "bfloat16", bf16_step, skipped=skip),
    ]
    runs += bf16_runs
    if not skip:
        ours_bf16 = copy.deepcopy(ours)
        master = common.Bf16Master(ours_bf16, 5e-4, 0.2)
        images_bf16 = images.bfloat16()

        def bf16_loss() -> torch.Tensor:
            img, txt = ours_bf16(images_bf16, text, mask)
            return clip_loss(img.float(), txt.float(), ours_bf16.logit_scale.float().exp())

        runs.append(
            Run("mmssl bf16 weights + fp32 master", "mmssl", "bfloat16", master.step_fn(bf16_loss))
        )
        # what no eager path can beat: the GEMMs of the autocast step, and its AdamW, alone
        runs.append(Run(FLOOR_PATH, "floor", "bfloat16", gemm_floor(bf16_step, bf16_opt)))
    if args.compile and not args.quick:
        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
        runs.append(
            Run(
                "mmssl fp32 fused AdamW compiled",
                "mmssl",
                "float32",
                common.train_step(
                    make_ours_loss(compiled), common.adamw(compiled, "fused", 5e-4, 0.2, NO_DECAY)
                ),
            )
        )
    print(f"torch threads {threads}; timing {sum(not r.skipped for r in runs)} paths", flush=True)
    rounds = common.alternate(runs, args.rounds, args.budget, 2 if args.quick else 3, peaks)
    config = {
        "model": args.model,
        "image_size": size,
        "context_length": ctx,
        "end_of_text_positions": f"[{lo}, {min(hi, ctx)})",
        "batch": args.batch,
        "optimizer": "AdamW lr 5e-4 wd 0.2",
        "threads": threads,
    }
    record = common.summarize(
        "CLIP training step vs open_clip"
        + ("" if args.caption_tokens == "5,77" else f", captions to position {min(hi, ctx) - 1}"),
        config,
        runs,
        flops,
        peaks,
        rounds,
        ("pairs/s", args.batch),
    )
    record["command"] = "python bench/bench_clip.py " + " ".join(argv or sys.argv[1:])
    common.write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
