"""GPT training step: mmssl vs Hugging Face GPT-2 (6 layers, dim 384, context 256) on the
same weights.

    python bench/bench_gpt.py [--batch 8] [--context-length 256] [--compile] [--quick]

One step = next-token logits over the GPT-2 vocabulary (50,257, tied head), the shifted
cross-entropy (HF's `labels=` loss / mmssl's `next_token_loss`), backward, AdamW.  The HF
side uses the optimizer its Trainer picks by default (fused torch AdamW for torch >= 2.8),
so the fp32 comparison gives mmssl the same one.  Dropout is 0 on the HF side (mmssl has
none).  HF runs its default attention (SDPA) and, as a second peer path, its "eager"
attention (matmul + softmax + matmul), each also with HF's `gelu_pytorch_tanh` in place of
GPT-2's `gelu_new` (the same function as one fused op, as mmssl runs it); its best path is
the fastest of these.  Paths: see bench/bench_vit.py; the
"fused head + loss" paths score the hidden states with `head_next_token_loss`
(`mmssl.nn.linear_ce`: the LM head and the cross-entropy as one op, no fp32 logits), which
is what the trainer's next_token objective runs by default (`fused_head`).  That default
is also in the fp32 same-configuration group: the same model, dtype and optimizer, scored
the way an mmssl run scores it.  The floor row times the GEMMs of the bf16 autocast fused
head + loss step alone (bench/floor.py).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from floor import FLOOR_PATH, gemm_floor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--num-heads", type=int, default=6)
    args = p.parse_args(argv)
    least = {"batch": 1, "context_length": 2, "depth": 1, "dim": 1, "num_heads": 1}
    problem = common.args_problem(args, least)
    if not problem and args.dim % args.num_heads:
        problem = "error: --dim must be divisible by --num-heads"
    if problem:
        print(problem, file=sys.stderr)
        return 2
    common.apply_quick(args)
    threads = common.set_threads(args.threads)
    import transformers

    from mmssl.interop import load_hf_gpt2
    from mmssl.nn.compile import compile_blocks
    from mmssl.objectives import head_next_token_loss, next_token_loss

    peaks = common.measure_peaks(args.quick)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_layer=args.depth,
        n_embd=args.dim,
        n_head=args.num_heads,
        n_positions=args.context_length,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    peer = transformers.GPT2LMHeadModel(hf_cfg).train()
    ours = load_hf_gpt2(peer).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hf_cfg.vocab_size, (args.batch, args.context_length), generator=g)
    with torch.no_grad():
        diff = (peer(tokens).logits - ours.lm_logits(tokens)).abs().max()
    print(f"same weights: max |logit difference| {float(diff):.2e}")

    @contextlib.contextmanager
    def hf_eager():
        peer.set_attn_implementation("eager")
        try:
            yield
        finally:
            peer.set_attn_implementation("sdpa")

    @contextlib.contextmanager
    def hf_tanh_gelu():
        # HF's gelu_pytorch_tanh: the same function as GPT-2's gelu_new (a chain of Python
        # element-wise ops), as one fused torch op, which mmssl's loader maps gelu_new to
        from transformers.activations import ACT2FN

        mlps = [block.mlp for block in peer.transformer.h]
        default = [mlp.act for mlp in mlps]
        for mlp in mlps:
            mlp.act = ACT2FN["gelu_pytorch_tanh"]
        try:
            yield
        finally:
            for mlp, act in zip(mlps, default):
                mlp.act = act

    @contextlib.contextmanager
    def hf_eager_tanh_gelu():
        with hf_eager(), hf_tanh_gelu():
            yield

    def peer_loss() -> torch.Tensor:
        return peer(tokens, labels=tokens).loss

    def make_ours_loss(model: torch.nn.Module):
        return lambda: next_token_loss(model.lm_logits(tokens), tokens)

    def make_fused_loss(model: torch.nn.Module):
        text = model.text
        return lambda: head_next_token_loss(text.forward_tokens(tokens), text.head_weight(), tokens)

    ours_loss = make_ours_loss(ours)
    peer_opt = common.adamw(peer, "fused", lr=3e-4, wd=0.1)
    Run = common.Run
    runs = [
        Run("HF GPT-2 fp32", "peer", "float32", common.train_step(peer_loss, peer_opt), "fp32"),
        Run(
            "HF GPT-2 fp32, gelu_pytorch_tanh",
            "peer",
            "float32",
            common.train_step(peer_loss, peer_opt, False, hf_tanh_gelu),
            "fp32",
        ),
        Run(
            "mmssl fp32 fused AdamW",
            "mmssl",
            "float32",
            common.train_step(ours_loss, common.adamw(ours, "fused", 3e-4, 0.1)),
            "fp32",
        ),
        Run(
            "mmssl fp32 fused AdamW, fused head + loss",
            "mmssl",
            "float32",
            common.train_step(make_fused_loss(ours), common.adamw(ours, "fused", 3e-4, 0.1)),
            "fp32",
        ),
    ]
    flops = common.count_flops(lambda: ours_loss().backward())
    ours.zero_grad(set_to_none=True)
    skip = common.bf16_skip_reason(args, peaks, flops)
    fused_opt = common.adamw(ours, "fused", 3e-4, 0.1)
    fused_step = common.train_step(make_fused_loss(ours), fused_opt, True)
    runs += [
        Run(
            "HF GPT-2 bf16 autocast",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_opt, True),
            skipped=skip,
        ),
        Run(
            "HF GPT-2 bf16 autocast, eager attention",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_opt, True, hf_eager),
            skipped=skip,
        ),
        Run(
            "HF GPT-2 bf16 autocast, gelu_pytorch_tanh",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_opt, True, hf_tanh_gelu),
            skipped=skip,
        ),
        Run(
            "HF GPT-2 bf16 autocast, eager attention, gelu_pytorch_tanh",
            "peer",
            "bfloat16",
            common.train_step(peer_loss, peer_opt, True, hf_eager_tanh_gelu),
            skipped=skip,
        ),
        Run(
            "mmssl bf16 autocast fused AdamW",
            "mmssl",
            "bfloat16",
            common.train_step(ours_loss, common.adamw(ours, "fused", 3e-4, 0.1), True),
            skipped=skip,
        ),
        Run(
            "mmssl bf16 autocast, fused head + loss", "mmssl", "bfloat16", fused_step, skipped=skip
        ),
    ]
    if not skip:
        ours_bf16 = copy.deepcopy(ours)
        master = common.Bf16Master(ours_bf16, 3e-4, 0.1)
        runs.append(
            Run(
                "mmssl bf16 weights + fp32 master",
                "mmssl",
                "bfloat16",
                master.step_fn(make_ours_loss(ours_bf16)),
            )
        )
        runs.append(
            Run(
                "mmssl bf16 weights + fp32 master, fused head + loss",
                "mmssl",
                "bfloat16",
                master.step_fn(make_fused_loss(ours_bf16)),
            )
        )
        # what no eager path can beat: the GEMMs of the fused autocast step, and its AdamW
        runs.append(Run(FLOOR_PATH, "floor", "bfloat16", gemm_floor(fused_step, fused_opt)))
    if args.compile and not args.quick:
        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
        runs.append(
            Run(
                "mmssl fp32 fused AdamW compiled",
                "mmssl",
                "float32",
                common.train_step(
                    make_ours_loss(compiled), common.adamw(compiled, "fused", 3e-4, 0.1)
                ),
            )
        )
    print(f"torch threads {threads}; timing {sum(not r.skipped for r in runs)} paths", flush=True)
    rounds = common.alternate(runs, args.rounds, args.budget, 2 if args.quick else 3, peaks)
    config = {
        "depth": args.depth,
        "dim": args.dim,
        "num_heads": args.num_heads,
        "context_length": args.context_length,
        "vocab_size": hf_cfg.vocab_size,
        "batch": args.batch,
        "optimizer": "AdamW lr 3e-4 wd 0.1",
        "threads": threads,
    }
    record = common.summarize(
        "GPT training step vs Hugging Face GPT-2",
        config,
        runs,
        flops,
        peaks,
        rounds,
        ("tokens/s", args.batch * args.context_length),
    )
    record["command"] = "python bench/bench_gpt.py " + " ".join(argv or sys.argv[1:])
    common.write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
