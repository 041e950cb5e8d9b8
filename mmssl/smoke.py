"""`mmssl smoke`: build a registry model and run one forward and backward pass on a batch.

A quick check that an installation works end to end; prints shapes and parameter counts.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mmssl.cliargs import ArgumentParser, check_numbers
from mmssl.models.condition import DescriptorEncoder
from mmssl.models.registry import create_model, list_models
from mmssl.objectives import clip_loss


def main(argv: list[str] | None = None) -> int:
    """`mmssl smoke`: exit code 0; bad arguments exit 2."""
    parser = ArgumentParser(prog="mmssl smoke", description=__doc__)
    parser.add_argument(
        "--model",
        default="clip_vit_b32",
        help="a name from list_models() (default: clip_vit_b32, full size; test_tiny_clip is quick)",
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problem = check_numbers(
        args, {"batch_size": (lambda v: v >= 1, ">= 1"), "seed": (lambda v: v >= 0, ">= 0")}
    )
    if problem:
        parser.error(problem)
    if args.model not in list_models():
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(list_models())}")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = create_model(args.model).train()
    print(
        f"model {args.model}: {model.num_params():,} parameters "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )
    b = args.batch_size
    losses: list[torch.Tensor] = []
    embeddings: list[torch.Tensor] = []
    text = None
    if model.text is not None:
        tc = model.text.cfg
        text = torch.randint(0, tc.vocab_size, (b, min(tc.context_length, 32)))
    # every part runs: the conditioner (on random descriptors, or on the text as a prompt),
    # the projector and the caption decoder, so each parameter can receive a gradient
    cond = None
    if isinstance(model.conditioner, DescriptorEncoder):
        cond = model.condition(aug=torch.rand(b, model.conditioner.layout.dim))
    elif model.conditioner is not None:
        cond = model.condition(cond_text=text)
    if model.visual is not None:
        vc = model.visual.cfg
        images = torch.randn(b, vc.in_chans, vc.image_size, vc.image_size)
        feats = model.forward_features(images, cond)
        emb = model.encode_image(images, cond)
        print(
            f"  vision: {model.num_params('vision'):,} params; images {tuple(images.shape)} -> "
            f"pooled {tuple(feats['pooled'].shape)}, tokens {tuple(feats['tokens'].shape)}, "
            f"embedding {tuple(emb.shape)}"
            + ("" if cond is None else f", condition {tuple(cond.shape)}")
        )
        embeddings.append(emb)
        if model.projector is not None:
            z = model.project(feats["pooled"], cond)
            print(f"  projector: z {tuple(z.shape)}")
            losses.append(z.pow(2).mean())
        if model.caption is not None and text is not None:
            logits = model.caption_logits(feats["tokens"], text)
            print(f"  caption: logits {tuple(logits.shape)}")
            losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), text[:, 1:].flatten()))
    if text is not None and model.text is not None:  # text is set exactly with a text tower
        tc = model.text.cfg
        emb = model.encode_text(text)
        print(
            f"  text: {model.num_params('text'):,} params; text {tuple(text.shape)} -> "
            f"embedding {tuple(emb.shape)}"
        )
        embeddings.append(emb)
        if tc.lm_head:
            logits = model.lm_logits(text)
            print(f"  lm: logits {tuple(logits.shape)}")
            losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), text[:, 1:].flatten()))
    if model.logit_scale is not None:
        # A CLIP loss on the pair, so the logit scale gets its gradient too.
        losses.append(clip_loss(embeddings[0], embeddings[1], model.logit_scale.exp()))
    else:
        losses += [emb.pow(2).mean() for emb in embeddings]
    t0 = time.perf_counter()
    loss = torch.stack(losses).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    with_grad = sum(g is not None for g in grads)
    norm = torch.sqrt(sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros(())))
    print(
        f"  backward in {time.perf_counter() - t0:.1f} s: loss {loss.item():.4f}, "
        f"{with_grad}/{len(grads)} parameter tensors received a gradient, grad norm {norm:.4f}"
    )
    return 0


if __name__ == "__main__":
    from mmssl.cliargs import tolerant_streams

    tolerant_streams()
    raise SystemExit(main())
