"""Language-modelling objectives: next-token prediction and captioning.

Shift convention: logits are aligned with the input tokens, i.e. ``logits[:, t]`` is the
prediction made after reading ``tokens[:, :t + 1]`` and is scored against
``tokens[:, t + 1]``. The first token is never a target.  With tokens as long as the logits
the last position has no target; a packed LM row (the data pipeline's, context_length + 1
tokens) is one token longer than the logits of its first context_length, and that token is
the last position's target, so every position trains (nanoGPT's x = row[:-1], y = row[1:]).

A target position counts when its token is not `ignore_index` and, if a mask is given,
``mask[:, t + 1]`` is True (padding excluded). The loss is the mean over counted targets.

Data parallelism: a per-rank token mean is not the global token mean when ranks hold
different numbers of tokens. The modules and `global_token_mean` (which the training Task
uses) therefore normalise by the global count of targets (a scalar all-reduce), so the
rank-averaged gradient and the reported value equal the single-process loss on the
concatenated batch.  The plain functions (`next_token_loss`, `head_next_token_loss`) are
per-rank means.

Gradient accumulation: the training loop counts a step's targets over all its micro-batches
(`count_targets`, on the host, before the first forward) and passes that count to
`global_token_mean`, so the accumulated gradient is that of the token mean over the whole
step rather than the mean of per-micro-batch token means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl import distributed
from mmssl.nn.linear_ce import check_label_smoothing, linear_cross_entropy
from mmssl.objectives.contrastive import report_global_mean


def _shifted_targets(
    tokens: Tensor, mask: Tensor | None, ignore_index: int, length: int | None = None
) -> Tensor:
    """(B, T) targets aligned with T positions of logits: tokens[:, t + 1], `ignore_index`
    where not counted.  tokens (B, T), the last position without a target, or (B, T + 1),
    a packed row (module docstring).  Padding the targets rather than slicing
    `logits[:, :-1]` keeps the logits (the largest tensor of an LM step) a view, where the
    slice would copy them forward and zero-fill a full gradient backward."""
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != tokens {tuple(tokens.shape)}")
    pad = 0 if length is not None and tokens.shape[1] == length + 1 else 1
    targets = F.pad(tokens[:, 1:], (0, pad), value=ignore_index)  # (B, T)
    if mask is not None:
        counted = F.pad(mask[:, 1:].bool(), (0, pad), value=False)  # (B, T)
        targets = targets.masked_fill(~counted, ignore_index)
    return targets


def _aligned(positions: Tensor, tokens: Tensor, what: str) -> None:
    """ValueError unless tokens (B, T) or (B, T + 1) go with positions (B, T, ...)."""
    b, t = positions.shape[:2] if positions.ndim == 3 else (-1, -1)
    if tokens.ndim != 2 or tuple(tokens.shape) not in ((b, t), (b, t + 1)):
        raise ValueError(
            f"expected {what} and tokens (B, T) or a packed row (B, T + 1), got "
            f"{tuple(positions.shape)} and {tuple(tokens.shape)}"
        )


def count_targets(tokens: Tensor, mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """The number of targets `next_token_sum` scores on tokens: (B, T) with mask: (B, T) bool
    or None, as a 0-d int64 tensor on the tokens' device."""
    return (_shifted_targets(tokens, mask, ignore_index) != ignore_index).sum()


def next_token_sum(
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over counted targets and their number (a 0-d int64 tensor)."""
    _aligned(logits, tokens, "logits (B, T, V)")
    check_label_smoothing(label_smoothing)
    targets = _shifted_targets(tokens, mask, ignore_index, logits.shape[1])
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()  # a softmax over the vocabulary needs fp32 sums
    total = F.cross_entropy(
        flat_logits,
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return total, (targets != ignore_index).sum()


def next_token_loss(
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean next-token cross-entropy.

    logits: (B, T, V) aligned with tokens: (B, T) int64; mask: optional (B, T) bool, True for
    real tokens. Returns a scalar (0 when no position counts).
    """
    total, count = next_token_sum(logits, tokens, mask, ignore_index, label_smoothing)
    return total / count.clamp_min(1)


def head_next_token_loss(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """`next_token_loss(F.linear(hidden, weight), tokens, mask, ...)` without the logits.

    hidden: (B, T, D) final-normed hidden states; weight: (V, D) the LM head's (tied or
    not).  The head and the cross-entropy run as one op (`mmssl.nn.linear_ce`), which never
    holds fp32 (B, T, V) tensors: the same value, and the same gradients up to the rounding
    of the compute dtype.
    """
    total, count = head_next_token_sum(hidden, weight, tokens, mask, ignore_index, label_smoothing)
    return total / count.clamp_min(1)


def head_next_token_sum(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """`next_token_sum` through the fused head: the summed cross-entropy over counted
    targets and their number (a 0-d int64 tensor)."""
    _aligned(hidden, tokens, "hidden (B, T, D)")
    targets = _shifted_targets(tokens, mask, ignore_index, hidden.shape[1]).reshape(-1)
    total = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, ignore_index, label_smoothing
    )
    return total, (targets != ignore_index).sum()


def global_token_mean(total: Tensor, count: Tensor, count_all: Tensor | None = None) -> Tensor:
    """A rank's summed loss and target count -> the token mean over the global batch.

    Each rank back-propagates `total * world / count_all`, so the engine's rank-averaged
    gradient is that of the global mean; every rank reports the global mean itself.  Two
    scalar all-reduces (the count, and the reported value, as the contrastive losses do),
    no host sync.  Collective: every rank must call it.

    count_all: the global count to divide by when the caller has it already (0-d float
    tensor): the training loop's, a step's targets over every rank and micro-batch divided by
    the number of micro-batches, which makes the accumulated gradient the step's token mean.
    The count is then not all-reduced here, and `count` is unused.
    """
    world = distributed.world_size()
    if count_all is None:
        if world == 1:
            return total / count.clamp_min(1)
        count_all = distributed.all_reduce_sum(count.to(torch.float64)).clamp_min(1)
    local = total * world / count_all.to(total.dtype)
    return report_global_mean(local)


def captioning_loss(
    logits: Tensor,
    text: Tensor,
    text_mask: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Captioning loss of a text decoder conditioned on image tokens (cross-attention or prefix).

    logits: (B, T, V) for the caption positions only (with an image prefix, drop the prefix
    positions first), aligned with text: (B, T); text_mask: (B, T) bool. The image condition
    does not change the shift: the same next-token loss as `next_token_loss`.
    """
    return next_token_loss(logits, text, text_mask, ignore_index, label_smoothing)


class NextTokenLoss(nn.Module):
    """Next-token (and captioning) loss with a token mean over the global batch."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        super().__init__()
        check_label_smoothing(label_smoothing)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """logits: (B, T, V); tokens: (B, T); mask: (B, T) bool or None. Returns a scalar."""
        total, count = next_token_sum(logits, tokens, mask, self.ignore_index, self.label_smoothing)
        return global_token_mean(total, count)

    def extra_repr(self) -> str:
        """The settings shown in the module's repr."""
        return f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"


class CaptioningLoss(NextTokenLoss):
    """Captioning loss: `NextTokenLoss` over decoder logits of the caption positions."""
