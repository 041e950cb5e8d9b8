"""SigLIP: pairwise sigmoid loss with a learnable temperature and bias (Zhai et al., 2023).

Every image-text pair is an independent binary problem: label +1 for matching pairs (and for
extra positives from the optional mask), -1 otherwise. The loss is the sum over all pairs
divided by the batch size, as in the paper. Embeddings are normalised inside the loss.

Data-parallel modes (`gather`):
- ``"chunked"`` (default): text chunks travel round a ring of ranks (send right, receive
  left, with gradient); each rank only ever holds (B_local x B_local) logits. Local batch
  sizes must be equal on every rank.
- ``"local_loss"``: gather all texts; this rank's images against them, (B_local x B_global).
- ``"full"``: gather everything; every rank computes the whole (B_global x B_global) loss.
All return the global loss on every rank and DDP-exact gradients (see `contrastive.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl import distributed
from mmssl.objectives.contrastive import (
    check_gather,
    check_keys,
    check_mask,
    check_not_empty,
    check_pair,
    report_global_mean,
    row_groups,
    with_diagonal,
)

SIGLIP_GATHER_MODES = ("chunked", "local_loss", "full")


def _siglip_sum(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor,
    positives: Tensor | None,
    diag_offset: int | None,
) -> Tensor:
    """Summed -log sigmoid(label * logit) of image: (n, E) against text: (m, E).

    positives: (n, m) bool, or None for "image i matches text diag_offset + i" (no match at
    all when diag_offset is None, i.e. a chunk of other samples).
    """
    logits = (scale * image) @ text.T + bias  # (n, m); autograd keeps only the small operands
    # -log sigmoid(z x) = softplus(x) - [z = +1] x: no (n, m) label or product tensors to keep
    total = F.softplus(logits).sum()
    if positives is not None:
        return total - torch.where(positives, logits, 0.0).sum()
    if diag_offset is not None:
        return total - logits.diagonal(offset=diag_offset).sum()
    return total


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    positives: Tensor | None = None,
) -> Tensor:
    """Sigmoid loss -1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b)).

    image_emb, text_emb: (N, E), normalised here; logit_scale t (already exponentiated),
    logit_bias b; positives: optional (N, N) bool, z_ij = +1 where True or i = j (the
    matching pair is positive whatever the mask's diagonal says, as in `nt_xent_loss`), -1
    elsewhere. Returns a scalar; raises ValueError on an empty batch.
    """
    check_pair(image_emb, text_emb, "image_emb, text_emb")
    n = image_emb.shape[0]
    check_not_empty(n)
    check_mask(positives, (n, n))
    positives = with_diagonal(positives)
    image, text = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=image.dtype, device=image.device)
    bias = torch.as_tensor(logit_bias, dtype=image.dtype, device=image.device)
    return _siglip_sum(image, text, scale, bias, positives, 0) / n


class SigLipLoss(nn.Module):
    """SigLIP loss: learnable t' (t = exp t', init log 10) and bias b (init -10), as the paper."""

    def __init__(
        self,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        learnable: bool = True,
        gather: str = "chunked",
    ) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), learnable)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)), learnable)
        self.gather = check_gather(gather, SIGLIP_GATHER_MODES)

    def forward(
        self, image_emb: Tensor, text_emb: Tensor, positive_keys: Tensor | None = None
    ) -> Tensor:
        """image_emb, text_emb: (B, E) local pairs; positive_keys: (B,) labels or (B, T) keys."""
        check_pair(image_emb, text_emb, "image_emb, text_emb")
        check_keys(positive_keys, image_emb.shape[0])
        image, text = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
        scale, bias = self.logit_scale.exp(), self.logit_bias
        n, r = image.shape[0], distributed.rank()
        sizes = distributed.gather_sizes(n, image.device)
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        n_all, world = sum(sizes), len(sizes)
        check_not_empty(n_all)  # every rank's count: all ranks raise together
        groups = (
            None
            if positive_keys is None
            else row_groups(distributed.all_gather_no_grad(positive_keys.to(image.device)))
        )  # (B_global,)

        def positives(rows: slice, cols: slice) -> Tensor | None:
            return None if groups is None else groups[rows, None] == groups[None, cols]

        own = slice(offsets[r], offsets[r] + n)
        if self.gather == "full":
            image_all = distributed.all_gather_with_grad(image)
            text_all = distributed.all_gather_with_grad(text)
            every = slice(0, n_all)
            return _siglip_sum(image_all, text_all, scale, bias, positives(every, every), 0) / n_all
        if self.gather == "local_loss":
            text_all = distributed.all_gather_with_grad(text)
            local = _siglip_sum(
                image, text_all, scale, bias, positives(own, slice(0, n_all)), own.start
            )
            return report_global_mean(local * world / n_all)
        if len(set(sizes)) != 1:
            raise ValueError(f"chunked SigLIP needs equal local batch sizes, got {sizes}")
        local = _siglip_sum(image, text, scale, bias, positives(own, own), 0)
        chunk = text
        for step in range(1, world):
            chunk = distributed.send_right_recv_left(chunk)  # now holds rank (r - step)'s texts
            src = (r - step) % world
            cols = slice(offsets[src], offsets[src] + n)
            local = local + _siglip_sum(image, chunk, scale, bias, positives(own, cols), None)
        return report_global_mean(local * world / n_all)

    def extra_repr(self) -> str:
        """The settings shown in the module's repr."""
        return f"gather={self.gather!r}"
