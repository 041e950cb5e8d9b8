"""Conditioners and the conditioned projector.

A conditioner turns what produced a view into a condition vector c (B, C):
- `DescriptorEncoder` (gamma): an MLP over the augmentation descriptor omega (layout v1, 13 dims);
- `TextConditioner`: the text tower's pooled embedding of a prompt, through a linear map.
  Training conditions every image of a source on its `condition_prompt`;
  `mmssl.descriptor.render_descriptor` renders a descriptor as such a prompt, but the
  training Task does not feed per-view rendered descriptors.

c then enters the image model at one or more places, chosen by config:
- the projector (`Projector`, mode concat / film / hyper, below);
- the backbone: adaLN-Zero-style modulation in the Blocks (`vision.cond_dim`; see
  `mmssl.nn.norm` for how its gate differs from DiT's);
- prefix tokens prepended to the patch tokens (`vision.cond_tokens`).

Every mode equals the unconditioned model at init (zero-initialised conditioning weights),
except prefix tokens: extra tokens take part in attention from the first step.  A
`VisionEncoder` given cond=None runs the plain path; `MultimodalModel.forward_features`
given none conditions a descriptor-conditioned backbone on the neutral descriptor, as
training conditions a plain image, and a text-conditioned one on the prompt it trained with
when its export records one (`MultimodalModel.image_condition`).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.descriptor import check_descriptor, get_layout
from mmssl.nn.layers import check_dtype


class DescriptorEncoder(nn.Module):
    """gamma: omega (B, 13) -> c (B, C), a two-layer MLP.  Checks the descriptor layout."""

    def __init__(self, cond_dim: int, hidden_dim: int = 128, layout: str = "v1"):
        super().__init__()
        self.layout = get_layout(layout)
        self.net = nn.Sequential(
            nn.Linear(self.layout.dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, cond_dim)
        )

    def forward(self, aug: torch.Tensor) -> torch.Tensor:
        """aug: (B, 13) descriptors, any float dtype -> c (B, C) in the weights' dtype.

        c follows the weights, not `aug`: a bf16 model (DeepSpeed casts the whole module)
        gets a bf16 c for its bf16 modulation layers, also from an fp32 neutral descriptor.
        """
        check_descriptor(aug, self.layout.version)
        if aug.ndim != 2:  # a (13,) c would fail deep inside the blocks' modulation
            raise ValueError(
                f"descriptors must be (B, {aug.shape[-1]}), one row per image, got "
                f"{tuple(aug.shape)}; a single descriptor for every image is aug[None]"
            )
        # indexing a Sequential is typed as any Module
        return self.net(aug.to(cast(nn.Linear, self.net[0]).weight.dtype))


class TextConditioner(nn.Module):
    """Pooled text features (B, D_text) of a prompt -> c (B, C) by a linear map.

    The text tower itself is the model's; this module holds only the map, so the same text
    tower serves CLIP and conditioning.
    """

    def __init__(self, text_dim: int, cond_dim: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, cond_dim)

    def forward(self, pooled_text: torch.Tensor) -> torch.Tensor:
        """pooled_text (B, D_text) -> c (B, C)."""
        return self.proj(pooled_text)


class Projector(nn.Module):
    """The SSL projection head  f (B, D) -> z (B, out_dim), optionally conditioned on c (B, C).

    Layers: Linear(D, H) -> [conditioning] -> ReLU -> Linear(H, out) (more hidden layers with
    `depth` > 2).  Conditioning of the first layer's output h:
    - "concat" (CASSLE): h = W [f; c] + b, the c columns zero-initialised;
    - "film": h = h * (1 + s(c)) + b(c), with s and b zero-initialised;
    - "hyper": a hypernetwork for the first layer, W(c) = W0 + sum_k a_k(c) W_k with
      a = ReLU(Linear(c)) (K of them) and every W_k zero-initialised.  That is the bilinear
      term sum_k a_k (W_k f), computed without materialising per-sample weights.
      A multiplicative interaction of c and f is what undoes, say, a hue rotation.
    """

    # the modules of the other modes are None
    cond_in: nn.Linear | None
    film: nn.Linear | None
    hyper_coef: nn.Linear | None
    hyper_weight: nn.Parameter | None

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        depth: int = 2,
        cond: str = "none",
        cond_dim: int | None = None,
        hyper_rank: int = 32,
    ):
        super().__init__()
        if cond not in ("none", "concat", "film", "hyper"):
            raise ValueError(f"projector cond must be none/concat/film/hyper, got {cond!r}")
        if cond != "none" and not cond_dim:
            raise ValueError(f"projector cond={cond!r} needs a condition dim")
        if depth < 2:  # the conditioning acts on the hidden layer, so there must be one
            raise ValueError(f"projector depth must be >= 2 (Linear layers), got {depth}")
        if cond == "hyper" and hyper_rank < 1:
            raise ValueError(f"projector hyper_rank must be >= 1, got {hyper_rank}")
        self.mode = cond
        self.hidden_dim = hidden_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        # a conditioned mode has a cond_dim (checked above): `and cond_dim` only narrows its type
        self.cond_in = (
            nn.Linear(cond_dim, hidden_dim, bias=False) if cond == "concat" and cond_dim else None
        )
        self.film = nn.Linear(cond_dim, 2 * hidden_dim) if cond == "film" and cond_dim else None
        if cond == "hyper" and cond_dim:
            self.hyper_coef = nn.Linear(cond_dim, hyper_rank)
            self.hyper_weight = nn.Parameter(torch.zeros(hyper_rank * hidden_dim, in_dim))
        else:
            self.hyper_coef = None
            self.hyper_weight = None
        layers: list[nn.Module] = []
        for _ in range(depth - 2):
            layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
        self.rest = nn.Sequential(*layers, nn.ReLU(), nn.Linear(hidden_dim, out_dim))
        self.reset_conditioning()

    @torch.no_grad()
    def reset_conditioning(self) -> None:
        """Zero the conditioning weights, so the projector equals the plain one."""
        for p in (self.cond_in, self.film):
            if p is not None:
                nn.init.zeros_(p.weight)
                if p.bias is not None:
                    nn.init.zeros_(p.bias)
        if self.hyper_weight is not None:
            nn.init.zeros_(self.hyper_weight)

    def forward(self, features: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """features f (B, D), cond c (B, C) or None -> z (B, out_dim); cond=None gives the plain
        head."""
        h = self.fc1(features)  # (B, H)
        if cond is not None:
            reader = self.cond_in or self.film or self.hyper_coef
            if reader is None:  # a c of any shape was ignored
                raise ValueError("this projector is not conditioned (cond='none'): pass cond=None")
            check_cond(
                cond,
                reader.in_features,
                features.shape[0],
                "projector cond",
                "features",
                reader.weight,
            )
            if self.cond_in is not None:
                h = h + self.cond_in(cond)
            elif self.film is not None:
                scale, shift = self.film(cond).chunk(2, dim=-1)
                h = h * (1 + scale) + shift
            elif self.hyper_weight is not None and self.hyper_coef is not None:
                coef = F.relu(self.hyper_coef(cond))  # (B, K)
                per_k = F.linear(features, self.hyper_weight)  # (B, K * H): W_k f for every k
                per_k = per_k.view(features.shape[0], -1, self.hidden_dim)  # (B, K, H)
                h = h + torch.einsum("bk,bkh->bh", coef, per_k)
        return self.rest(h)


def check_cond(
    cond: torch.Tensor,
    width: int,
    batch: int,
    what: str = "cond",
    rows: str = "images",
    weight: torch.Tensor | None = None,
) -> None:
    """ValueError unless `cond` is (B or 1, width) for B `rows`, TypeError unless its dtype
    is `weight`'s (a weight that reads it) outside autocast.  cond is the conditioner's c,
    which the adaLN blocks, prefix tokens and projector read; torch's own errors were "mat1
    and mat2 shapes cannot be multiplied" (or "... must have the same dtype") or a broadcast
    deep inside."""
    if cond.ndim != 2 or cond.shape[1] != width or cond.shape[0] not in (1, batch):
        raise ValueError(
            f"{what} must be (B or 1, {width}) for {batch} {rows}, got {tuple(cond.shape)}: the "
            "conditioner's c, made from a descriptor or a text by MultimodalModel.condition"
        )
    if weight is not None:
        check_dtype(cond, weight, what)


class PrefixTokens(nn.Module):
    """c (B, C) -> k condition tokens (B, k, D) to prepend to the patch tokens.  Not zero
    at init, and even zero tokens would take attention weight: unlike adaLN-Zero, a model
    with them does not start equal to its unconditioned twin."""

    def __init__(self, cond_dim: int, num_tokens: int, dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(cond_dim, num_tokens * dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (B, C) -> condition tokens (B, k, D)."""
        dim = self.proj.out_features // self.num_tokens  # not -1: a batch of 0 has no size
        return self.proj(cond).view(cond.shape[0], self.num_tokens, dim)
