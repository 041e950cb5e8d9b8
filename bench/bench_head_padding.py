"""A/B of the fused LM head's row padding on the GPT-2 step (6 layers, width 384, context 256,
batch 8, bf16 autocast, fused AdamW): `mmssl.nn.linear_ce` pads the (N, V) logits buffer's
rows to a multiple of 64; aligned 1 is the unpadded op.  The two alternate step by step in
one process, so the machine's drift moves both; prints each median and the ratio.

    python bench/bench_head_padding.py [--rounds 8] [--threads N]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__, bf16=False, compile=False, budget=False, json=False)
    args = p.parse_args(argv)
    problem = common.args_problem(args, {})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    common.set_threads(args.threads)
    import transformers

    from mmssl.interop import load_hf_gpt2
    from mmssl.nn import linear_ce
    from mmssl.objectives import head_next_token_loss

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=6, n_embd=384, n_head=6, n_positions=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = load_hf_gpt2(transformers.GPT2LMHeadModel(cfg)).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (8, 256), generator=g)
    text = model.text

    def loss() -> torch.Tensor:
        return head_next_token_loss(text.forward_tokens(tokens), text.head_weight(), tokens)

    step = common.train_step(loss, common.adamw(model, "fused", 3e-4, 0.1), True)
    aligns = (1, linear_ce._ROW_ALIGN)
    times: dict[int, list[float]] = {a: [] for a in aligns}
    rounds = 2 if args.quick else (args.rounds or 8)
    try:
        for r in range(rounds + 1):  # the first round warms up
            for a in aligns:
                linear_ce._ROW_ALIGN = a
                t = time.perf_counter()
                step()
                if r:
                    times[a].append(time.perf_counter() - t)
    finally:
        linear_ce._ROW_ALIGN = aligns[1]
    for a, ts in times.items():
        print(f"rows aligned to {a:2d}: median {statistics.median(ts):.3f} s, min {min(ts):.3f} s")
    ratio = statistics.median(times[1]) / statistics.median(times[aligns[1]])
    print(f"unpadded / padded (median): {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
