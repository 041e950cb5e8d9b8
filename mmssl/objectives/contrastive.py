"""Softmax contrastive objectives: NT-Xent (SimCLR) and CLIP, plus the shared positives helpers.

Conventions shared by every contrastive loss in mmssl (this file, `siglip.py`):

- Embeddings are L2-normalised inside the loss, so raw projections can be passed; already
  normalised inputs are unchanged by it.
- Positives: by default only the matching pair (the other view, the paired caption) is
  positive. An optional boolean mask marks more positives (same label, identical caption
  ids); softmax losses then use soft targets spread uniformly over the positives, so
  templated captions repeated within a batch are no longer scored as negatives. The
  matching pair is always positive: a mask without its diagonal gets it added (masks
  built from keys have it anyway), so no row is left without a positive.
- An empty batch is a ValueError: a mean over no pairs has no value (it would be NaN).
- Data parallelism: the modules take `gather`:
  - ``"local_loss"``: each rank scores its own rows against the gathered global batch,
    O(B_local x B_global) memory;
  - ``"full"``: every rank gathers everything and computes the global loss, O(B_global^2).
  Both return the global loss value on every rank and a gradient that, once averaged over
  ranks as DDP/DeepSpeed do, equals the single-process gradient on the concatenated batch
  (see `mmssl.distributed`). Positives masks are built over the *global* batch from
  gathered keys. Without a process group both modes are the plain loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl import distributed

SOFTMAX_GATHER_MODES = ("local_loss", "full")


def check_gather(gather: str, allowed: tuple[str, ...]) -> str:
    """Return `gather` if it is one of `allowed`, else raise a ValueError naming the options."""
    if gather not in allowed:
        raise ValueError(f"gather must be one of {allowed}, got {gather!r}")
    return gather


# ----------------------------------------------------------------------------- positives


def row_groups(keys: Tensor) -> Tensor:
    """(N, ...) keys -> (N,) group ids; rows with identical keys share an id.

    (N,) labels are their own ids.  (N, T) rows get the index of their row in lexicographic
    order of the distinct rows, what `torch.unique(dim=0, return_inverse=True)` gives.  On
    an accelerator, unique would size its output on the host (a sync per step), so the rows
    are grouped with sorts on the device instead (`sorted_row_groups`); on the CPU there is
    no sync to save and unique is several times faster.
    """
    flat = keys.reshape(keys.shape[0], -1)
    if flat.shape[1] == 1:
        return flat[:, 0]
    if flat.device.type == "cpu":
        return torch.unique(flat, dim=0, return_inverse=True)[1]
    return sorted_row_groups(flat)


def sorted_row_groups(flat: Tensor) -> Tensor:
    """`torch.unique(flat, dim=0, return_inverse=True)[1]` without a host sync: T stable
    sorts, last column first, then a running count of the row changes."""
    order = torch.arange(flat.shape[0], device=flat.device)
    for t in reversed(range(flat.shape[1])):
        order = order[torch.sort(flat[order, t], stable=True).indices]
    rows = flat[order]
    new = torch.ones(flat.shape[0], dtype=torch.long, device=flat.device)
    new[1:] = (rows[1:] != rows[:-1]).any(dim=1).long()
    return torch.empty_like(order).scatter_(0, order, new.cumsum(0) - 1)


def positives_from_labels(labels: Tensor, other: Tensor | None = None) -> Tensor:
    """(N,) labels [, (M,) labels] -> (N, M) bool mask of equal labels (M = N by default)."""
    other = labels if other is None else other
    return labels[:, None] == other[None, :]


def caption_keys(text: Tensor, text_mask: Tensor | None = None, pad: int = -1) -> Tensor:
    """(N, T) token ids -> (N, T) keys with padding set to `pad`, so only real tokens compare."""
    if text_mask is None:
        return text
    if text_mask.shape != text.shape:
        raise ValueError(f"text_mask shape {tuple(text_mask.shape)} != text {tuple(text.shape)}")
    return text.masked_fill(~text_mask.bool(), pad)


def positives_from_ids(ids: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """(N, T) caption token ids -> (N, N) bool mask of rows with identical (unpadded) ids."""
    groups = row_groups(caption_keys(ids, text_mask))
    return groups[:, None] == groups[None, :]


def global_positives(
    keys: Tensor | None, offset: int, n: int, all_rows: bool, device: torch.device
) -> Tensor | None:
    """Positives of this rank's rows (or of all rows) against the global batch.

    keys: (n, ...) labels or caption keys of this rank, moved to `device` (the embeddings'
    device, which the collective backend needs). Returns (n or B_global, B_global) bool, or
    None when `keys` is None. Collective: every rank must call it.
    """
    if keys is None:
        return None
    groups = row_groups(distributed.all_gather_no_grad(keys.to(device)))  # (B_global,)
    rows = groups if all_rows else groups[offset : offset + n]
    return rows[:, None] == groups[None, :]


def soft_target_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Per-row cross-entropy against uniform targets over the positives.

    logits: (R, C), -inf where a column is excluded; positives: (R, C) bool, disjoint from the
    excluded columns, at least one per row. Returns (R,).
    """
    logp = logits.log_softmax(dim=-1)
    n_pos = positives.sum(dim=-1).clamp_min(1)
    return -logp.masked_fill(~positives, 0.0).sum(dim=-1) / n_pos


def check_pair(a: Tensor, b: Tensor, names: str) -> None:
    """ValueError unless `a` and `b` are both (B, D) of one shape; `names` names them in it."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must both be (B, D), got {tuple(a.shape)} and {tuple(b.shape)}")


def check_keys(keys: Tensor | None, n: int) -> None:
    """ValueError unless `keys` (positive keys, one per row) is None or has `n` rows."""
    if keys is not None and keys.shape[0] != n:
        raise ValueError(f"positive_keys has {keys.shape[0]} rows, the batch has {n}")


def check_mask(positives: Tensor | None, shape: tuple[int, int]) -> None:
    """ValueError unless the `positives` mask is None or has shape `shape`."""
    if positives is not None and tuple(positives.shape) != shape:
        raise ValueError(f"positives mask has shape {tuple(positives.shape)}, expected {shape}")


def check_not_empty(n: int) -> None:
    """The plain losses average over the batch: with no rows that mean would be NaN."""
    if n == 0:
        raise ValueError("the batch is empty (0 rows): a contrastive loss needs at least one pair")


def with_diagonal(positives: Tensor | None) -> Tensor | None:
    """(N, N) mask with each row's own pair marked positive, as the losses always score it."""
    if positives is None:
        return None
    return positives.bool() | torch.eye(
        positives.shape[0], dtype=torch.bool, device=positives.device
    )


def report_global_mean(local: Tensor) -> Tensor:
    """`local` with its value replaced by the rank-mean of `local`; the gradient is unchanged.

    For the local-loss modes: each rank back-propagates its own share, while every rank
    reports the exact global loss.
    """
    if distributed.world_size() == 1:
        return local
    return local + (distributed.all_reduce_mean(local.detach()) - local.detach())


# ----------------------------------------------------------------------------- NT-Xent


def _nt_xent_sum(
    a1: Tensor,
    a2: Tensor,
    c1: Tensor,
    c2: Tensor,
    offset: int,
    temperature: float,
    positives: Tensor | None,
) -> Tensor:
    """Summed NT-Xent of the 2n anchors [a1; a2] against the 2N candidates [c1; c2].

    a*: (n, D) rows of this rank, which sit at rows offset..offset+n of c*: (N, D).
    positives: (n, N) sample-level mask or None.
    """
    n, n_all = a1.shape[0], c1.shape[0]
    logits = (torch.cat([a1, a2]) / temperature) @ torch.cat([c1, c2]).T  # (2n, 2N)
    idx = torch.arange(n, device=a1.device) + offset
    self_idx = torch.cat([idx, idx + n_all])[:, None]  # (2n, 1)
    logits = logits.scatter(1, self_idx, float("-inf"))
    if positives is None:
        return F.cross_entropy(logits, torch.cat([idx + n_all, idx]), reduction="sum")
    pos = positives.bool().clone()  # 0/1 integers too, as clip_loss takes them
    pos[torch.arange(n, device=pos.device), idx] = (
        True  # the other view of the same sample is always positive
    )
    pos = pos.repeat(2, 2).scatter(1, self_idx, False)  # (2n, 2N); both views of positives
    return soft_target_cross_entropy(logits, pos).sum()


def nt_xent_loss(
    z1: Tensor, z2: Tensor, temperature: float = 0.1, positives: Tensor | None = None
) -> Tensor:
    """NT-Xent / InfoNCE of SimCLR over 2N views, mean over the 2N anchors.

    z1, z2: (N, D) embeddings of the two views (normalised here). Each anchor's candidates are
    the other 2N - 1 views; without a mask its positive is the other view of its sample and the
    other 2N - 2 are negatives. positives: optional (N, N) bool sample-level mask (e.g.
    `positives_from_labels`); every view of a positive sample becomes a soft-target positive,
    the other view of the same sample is positive whatever the mask's diagonal says, and
    self-similarity is always excluded. Raises ValueError on an empty batch.
    """
    if not temperature > 0:  # 0 gave NaN, a negative one a loss of the wrong sign
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_pair(z1, z2, "z1, z2")
    n = z1.shape[0]
    check_not_empty(n)
    check_mask(positives, (n, n))
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    return _nt_xent_sum(z1, z2, z1, z2, 0, temperature, positives) / (2 * n)


class NTXentLoss(nn.Module):
    """SimCLR loss with a fixed temperature; `gather` in ("local_loss", "full")."""

    def __init__(self, temperature: float = 0.1, gather: str = "local_loss") -> None:
        super().__init__()
        if not temperature > 0:  # NaN too
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather = check_gather(gather, SOFTMAX_GATHER_MODES)

    def forward(self, z1: Tensor, z2: Tensor, positive_keys: Tensor | None = None) -> Tensor:
        """z1, z2: (B, D) local views; positive_keys: (B,) labels or (B, T) caption keys."""
        check_pair(z1, z2, "z1, z2")
        check_keys(positive_keys, z1.shape[0])
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        n = z1.shape[0]
        sizes = distributed.gather_sizes(n, z1.device)
        offset, n_all = sum(sizes[: distributed.rank()]), sum(sizes)
        check_not_empty(n_all)  # every rank's count: all ranks raise together
        g1, g2 = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)
        if self.gather == "full":
            pos = global_positives(positive_keys, offset, n, True, z1.device)
            return _nt_xent_sum(g1, g2, g1, g2, 0, self.temperature, pos) / (2 * n_all)
        pos = global_positives(positive_keys, offset, n, False, z1.device)
        local = _nt_xent_sum(z1, z2, g1, g2, offset, self.temperature, pos)
        return report_global_mean(local * len(sizes) / (2 * n_all))

    def extra_repr(self) -> str:
        """The settings shown in the module's repr."""
        return f"temperature={self.temperature}, gather={self.gather!r}"


# ----------------------------------------------------------------------------- CLIP


def _clip_sum(
    image: Tensor,
    text: Tensor,
    image_all: Tensor,
    text_all: Tensor,
    offset: int,
    scale: Tensor,
    positives: Tensor | None,
) -> Tensor:
    """Summed image->text and text->image cross-entropies of this rank's n rows.

    image, text: (n, E) at rows offset..offset+n of image_all, text_all: (N, E).
    positives: (n, N) mask of this rank's samples against all samples (symmetric keys).
    """
    logits_i = scale * image @ text_all.T  # (n, N)
    logits_t = scale * text @ image_all.T  # (n, N)
    if positives is None:
        target = torch.arange(image.shape[0], device=image.device) + offset
        return F.cross_entropy(logits_i, target, reduction="sum") + F.cross_entropy(
            logits_t, target, reduction="sum"
        )
    return (
        soft_target_cross_entropy(logits_i, positives).sum()
        + soft_target_cross_entropy(logits_t, positives).sum()
    )


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    positives: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE of CLIP: mean of the image->text and text->image cross-entropies.

    image_emb, text_emb: (N, E), normalised here; logit_scale: the multiplier (already
    exponentiated and clamped); positives: optional (N, N) bool mask, positives[i, j] meaning
    image i and text j match (its transpose is used for the text->image direction); image i
    and text i always match, whatever the mask's diagonal says. Raises ValueError on an
    empty batch.
    """
    check_pair(image_emb, text_emb, "image_emb, text_emb")
    n = image_emb.shape[0]
    check_not_empty(n)
    check_mask(positives, (n, n))
    positives = with_diagonal(positives)
    image, text = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=image.dtype, device=image.device)
    if positives is None:
        return _clip_sum(image, text, image, text, 0, scale, None) / (2 * n)
    logits = scale * image @ text.T  # (N, N)
    loss_i = soft_target_cross_entropy(logits, positives).sum()
    loss_t = soft_target_cross_entropy(logits.T, positives.T).sum()
    return (loss_i + loss_t) / (2 * n)


class _ClampedExp(torch.autograd.Function):
    """min(exp(x), hi) whose gradient above `hi` still flows when it would lower x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, hi: float) -> Tensor:
        out = x.exp().clamp(max=hi)
        ctx.save_for_backward(x, out)
        ctx.hi = hi
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, out = ctx.saved_tensors
        # below the clamp: exp's own gradient (grad * exp(x)); above it, only a gradient
        # that a descent step turns into a lower x (grad > 0), taken at the clamp.  The sign
        # is the whole batch's: data parallel, each rank holds its share of the gradient,
        # and the optimizer steps on their average (one scalar all-reduce per backward, on
        # every rank alike: no branch on the value, no host sync)
        total = distributed.all_reduce_sum(grad) if distributed.world_size() > 1 else grad
        live = (x.exp() <= ctx.hi) | (total > 0)
        return torch.where(live, grad * out, torch.zeros_like(grad)), None


def clamped_scale(log_scale: Tensor, max_scale: float) -> Tensor:
    """The logit multiplier exp(log_scale), clamped at `max_scale`.

    open_clip clamps the parameter itself after each optimizer step (`clamp_(0, log 100)`).
    Under DeepSpeed that clamp would have to reach the fp32 master weights (or the ZeRO-3
    partitions), so mmssl clamps the value in the forward instead.  A plain
    `exp().clamp(max=)` would also zero the gradient of a parameter that overshot the
    clamp, leaving it there for good; here the gradient passes when it points back under
    the clamp, so, as in open_clip, the scale can come down again once the loss asks for a
    softer temperature.  Data parallel, the decision above the clamp is taken on the sum
    of the ranks' gradients, so every rank masks alike and the averaged gradient is the one
    process's on the whole batch.  It is taken per backward and per call, though: with
    gradient accumulation each micro-batch decides on its own share, as do two clip
    objectives on the one scale, so above the clamp a step whose shares disagree in sign
    keeps only the shares that lower the scale (open_clip steps on their sum, then clamps).
    """
    return _ClampedExp.apply(log_scale, float(max_scale))


class ClipLoss(nn.Module):
    """CLIP loss with a learnable log logit scale (init log(1/0.07), scale clamped at 100)."""

    def __init__(
        self,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        learnable: bool = True,
        gather: str = "local_loss",
    ) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), learnable)
        self.max_logit_scale = max_logit_scale
        self.gather = check_gather(gather, SOFTMAX_GATHER_MODES)

    def scale(self) -> Tensor:
        """The multiplier exp(logit_scale), clamped at `max_logit_scale` (`clamped_scale`)."""
        return clamped_scale(self.logit_scale, self.max_logit_scale)

    def forward(
        self, image_emb: Tensor, text_emb: Tensor, positive_keys: Tensor | None = None
    ) -> Tensor:
        """image_emb, text_emb: (B, E) local pairs; positive_keys: (B,) labels or (B, T) keys."""
        check_pair(image_emb, text_emb, "image_emb, text_emb")
        check_keys(positive_keys, image_emb.shape[0])
        image, text = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
        n = image.shape[0]
        sizes = distributed.gather_sizes(n, image.device)
        offset, n_all = sum(sizes[: distributed.rank()]), sum(sizes)
        check_not_empty(n_all)  # every rank's count: all ranks raise together
        image_all = distributed.all_gather_with_grad(image)
        text_all = distributed.all_gather_with_grad(text)
        scale = self.scale()
        if self.gather == "full":
            pos = global_positives(positive_keys, offset, n, True, image.device)
            return _clip_sum(image_all, text_all, image_all, text_all, 0, scale, pos) / (2 * n_all)
        pos = global_positives(positive_keys, offset, n, False, image.device)
        local = _clip_sum(image, text, image_all, text_all, offset, scale, pos)
        return report_global_mean(local * len(sizes) / (2 * n_all))

    def extra_repr(self) -> str:
        """The settings shown in the module's repr."""
        return f"max_logit_scale={self.max_logit_scale}, gather={self.gather!r}"
