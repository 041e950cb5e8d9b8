"""`optim.layer_decay`: layer-wise learning-rate decay, the fine-tuning rule of BEiT and MAE
(timm's `--layer-decay`, `param_groups_layer_decay`).

In a stack of L blocks (a tower's trunk, a caption decoder), block i (0-based) trains at
lr x d^(L - i), so the last block takes d and the deeper layers less; the tower's embeddings
(patch embedding, class token, position and token tables, the pre-norm) take d^(L + 1), as
a layer 0 below the first block.  Everything outside the blocks and embeddings (final norms,
projections, heads, the logit scale, conditioners) trains at lr, and so does a token table
tied to the LM head: it is the output layer too (at d^(L+1) the head would hardly train).
Each tower counts its own depth; a shared trunk is one stack, whose depth the text tower's
embeddings take too.
"""

from __future__ import annotations

from torch import nn

from mmssl.models.text import TextTransformer

# parameters below the first block: their tower's layer 0 (timm's ViT "stem", and the text
# tower's token table; norm_pre is open_clip's ln_pre)
EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "token_embed", "norm_pre")


def layer_scales(module: nn.Module, decay: float) -> dict[str, float]:
    """{parameter name: lr multiplier} of every parameter of `module` (named once)."""
    names = [n for n, _ in module.named_parameters()]
    tied = {  # token tables that are also their tower's LM head
        f"{where}.token_embed.weight" if where else "token_embed.weight"
        for where, m in module.named_modules()
        if isinstance(m, TextTransformer) and m.cfg.lm_head and m.cfg.tie_embeddings
    }
    depth: dict[str, int] = {}  # stack (the name before ".blocks.") -> its number of blocks
    for name in names:
        parts = name.split(".")
        if "blocks" in parts:
            i = parts.index("blocks")
            stack = ".".join(parts[:i])
            depth[stack] = max(depth.get(stack, 0), int(parts[i + 1]) + 1)
    scales = {}
    for name in names:
        parts = name.split(".")
        if name in tied:
            scales[name] = 1.0
        elif "blocks" in parts:
            i = parts.index("blocks")
            layers = depth[".".join(parts[:i])]
            scales[name] = decay ** (layers - int(parts[i + 1]))
        elif embedding := next((k for k in EMBEDDINGS if k in parts), None):
            tower = ".".join(parts[: parts.index(embedding)])
            own = [d for s, d in depth.items() if s.startswith(tower + ".") or s == tower]
            layers = max(own or depth.values() or [0])  # no trunk of its own: a shared one
            scales[name] = decay ** (layers + 1)
        else:
            scales[name] = 1.0
    return scales
