"""ViT training step: mmssl vs timm `vit_small_patch16_224` on the same weights.

    python bench/bench_vit.py [--batch 32] [--image-size 112] [--compile] [--quick]

One step = forward of the ViT-S/16 with timm's 1000-class head (copied onto mmssl's pooled
features), cross-entropy, backward, AdamW.  mmssl asks for the pooled features only
(`forward_pooled`, as its `encode_image`, fine-tuning and training do when nothing reads
the tokens): its last block computes the class token's row only, where timm computes
every token's and keeps the class token's.  "mmssl fp32 all tokens" does timm's work
(`forward_features`), for the same-work ratio: the same-config margin is mostly those rows.
Paths (see bench/common.py for the method):
- fp32, same configuration: timm with the optimizer timm's `create_optimizer_v2('adamw')`
  builds (torch AdamW, per-parameter loop on CPU) vs mmssl with the same optimizer and the
  same weight-decay groups (timm's `no_weight_decay()` names are exempt on both sides);
- best paths: timm bf16 autocast with torch's fused AdamW (as mmssl's fast paths use), with
  its fused attention (default) and without it (`fused_attn = False`: timm's matmul +
  softmax + matmul); mmssl fused AdamW in fp32, bf16 autocast, bf16 weights with fp32
  master weights, and (--compile) compiled blocks in fp32 and under bf16 autocast.  bf16
  paths run only where bf16 matmuls are fast (--bf16);
- the floor of mmssl's bf16 autocast step (bench/floor.py): its GEMMs, replayed alone, and
  its fused AdamW step; its share of the bf16 peak is the most these kernels allow.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from floor import FLOOR_PATH, gemm_floor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--model", default="vit_small_patch16_224")
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"batch": 1, "image_size": 1}, models="timm")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    common.apply_quick(args)
    threads = common.set_threads(args.threads)
    import timm
    import timm.optim

    from mmssl.interop import load_timm_vit
    from mmssl.nn.compile import compile_blocks

    peaks = common.measure_peaks(args.quick)
    torch.manual_seed(0)
    peer = timm.create_model(args.model, img_size=args.image_size, pretrained=False).train()
    ours = load_timm_vit(peer).train()
    head = torch.nn.Linear(peer.head.in_features, peer.head.out_features)
    head.load_state_dict(peer.head.state_dict())
    ours.add_module("bench_head", head)  # the same classifier, so both sides do the same work
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, head.out_features, (args.batch,), generator=g)
    with torch.no_grad():
        diff = (peer(images) - head(ours.forward_features(images)["pooled"])).abs().max()
    print(f"same weights: max |logit difference| {float(diff):.2e}")

    def peer_loss(model: torch.nn.Module = peer) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    def ours_loss(model: torch.nn.Module = ours) -> torch.Tensor:
        return F.cross_entropy(model.bench_head(model.forward_pooled(images)), labels)

    def ours_all_tokens_loss() -> torch.Tensor:  # timm's work: every token's row
        return F.cross_entropy(ours.bench_head(ours.forward_features(images)["pooled"]), labels)

    peer_opt = timm.optim.create_optimizer_v2(peer, "adamw", lr=1e-4, weight_decay=0.05)
    # timm's fast path: the same groups, torch's fused AdamW (as mmssl's fast paths use)
    peer_fused = timm.optim.create_optimizer_v2(
        peer, "adamw", lr=1e-4, weight_decay=0.05, fused=True
    )
    # timm exempts these from weight decay (`no_weight_decay()`); so does mmssl's side here
    no_decay = tuple(sorted(peer.no_weight_decay()))
    # timm's last block computes every token, mmssl's the class token's row only: each
    # side's fraction of the peak is computed from its own work
    peer_flops = common.count_flops(lambda: peer_loss().backward())
    peer.zero_grad(set_to_none=True)
    Run = common.Run
    runs = [
        Run(
            "timm fp32",
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
            common.train_step(ours_loss, common.adamw(ours, "default", no_decay=no_decay)),
            "fp32",
        ),
        Run(
            "mmssl fp32 fused AdamW",
            "mmssl",
            "float32",
            common.train_step(ours_loss, common.adamw(ours, "fused", no_decay=no_decay)),
        ),
        Run(
            "mmssl fp32 all tokens (same AdamW)",
            "mmssl",
            "float32",
            common.train_step(
                ours_all_tokens_loss, common.adamw(ours, "default", no_decay=no_decay)
            ),
            "fp32-work",
            flops=common.count_flops(lambda: ours_all_tokens_loss().backward()),
        ),
    ]
    ours.zero_grad(set_to_none=True)
    flops = common.count_flops(lambda: ours_loss().backward())
    ours.zero_grad(set_to_none=True)
    skip = common.bf16_skip_reason(args, peaks, flops)
    runs.append(
        Run(
            "timm bf16 autocast fused AdamW",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_fused, True),
            flops=peer_flops,
        )
    )

    @contextlib.contextmanager
    def timm_unfused():
        attns = [m for m in peer.modules() if hasattr(m, "fused_attn")]
        for m in attns:
            m.fused_attn = False
        try:
            yield
        finally:
            for m in attns:
                m.fused_attn = True

    runs.append(
        Run(
            "timm bf16 autocast fused AdamW, unfused attention",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_fused, True, timm_unfused),
            flops=peer_flops,
        )
    )
    bf16_opt = common.adamw(ours, "fused", no_decay=no_decay)
    bf16_step = common.train_step(ours_loss, bf16_opt, True)
    runs.append(Run("mmssl bf16 autocast fused AdamW", "mmssl", "bfloat16", bf16_step))
    if not skip:
        ours_bf16 = copy.deepcopy(ours)
        master = common.Bf16Master(ours_bf16)
        images_bf16 = images.bfloat16()
        runs.append(
            Run(
                "mmssl bf16 weights + fp32 master",
                "mmssl",
                "bfloat16",
                master.step_fn(
                    lambda: F.cross_entropy(
                        ours_bf16.bench_head(ours_bf16.forward_pooled(images_bf16)),
                        labels,
                    )
                ),
            )
        )
        # what no eager path can beat: the GEMMs of that step, and its AdamW, alone
        runs.append(Run(FLOOR_PATH, "floor", "bfloat16", gemm_floor(bf16_step, bf16_opt)))
    for r in runs:
        if r.dtype == "bfloat16":
            r.skipped = skip
    if args.compile and not args.quick:
        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
        runs.append(
            Run(
                "mmssl fp32 fused AdamW compiled",
                "mmssl",
                "float32",
                common.train_step(
                    lambda: ours_loss(compiled), common.adamw(compiled, "fused", no_decay=no_decay)
                ),
            )
        )
        compiled_bf16 = copy.deepcopy(compiled)  # its own compiled blocks (CompiledForward)
        runs.append(
            Run(
                "mmssl bf16 autocast fused AdamW compiled",
                "mmssl",
                "bfloat16",
                common.train_step(
                    lambda: ours_loss(compiled_bf16),
                    common.adamw(compiled_bf16, "fused", no_decay=no_decay),
                    True,
                ),
                skipped=skip,
            )
        )
    print(f"torch threads {threads}; timing {sum(not r.skipped for r in runs)} paths", flush=True)
    rounds = common.alternate(runs, args.rounds, args.budget, 2 if args.quick else 3, peaks)
    config = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "optimizer": "AdamW lr 1e-4 wd 0.05",
        "threads": threads,
    }
    record = common.summarize(
        "ViT training step vs timm", config, runs, flops, peaks, rounds, ("images/s", args.batch)
    )
    record["command"] = "python bench/bench_vit.py " + " ".join(argv or sys.argv[1:])
    common.write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
