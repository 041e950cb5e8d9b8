"""AugSelf (Lee et al., 2021): predict the augmentation difference between two views.

A small MLP reads [f(v1); f(v2)] and predicts, per group of the descriptor layout
(`mmssl.descriptor`):

- continuous groups (v1: blur, color, color_diff, crop): the difference w1 - w2, scored by
  MSE on tanh of the prediction, as in the AugSelf code. The target is the raw difference;
  groups normalised to [0, 1] give differences in [-1, 1], blur sigma differences may exceed
  that range and then saturate the tanh, also as in AugSelf.
- binary groups (v1: grayscale): whether the two views *agree* (target 1 when w1 == w2),
  scored by BCE on the logit. This is AugSelf's target for flip, `(f1 == f2)`: the two bits
  of a pair are not identifiable from a difference, agreement is.

Horizontal flip has no slot in v1: it is carried by the mirrored crop centre x, so the crop
regression already asks the network whether (and how) the views were mirrored relative to
each other; AugSelf folds flip into its crop centres the same way.

The loss is symmetric by default, as in AugSelf: both [f1; f2] -> w1 - w2 and
[f2; f1] -> w2 - w1 are scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.descriptor import DescriptorLayout, check_descriptor, get_layout


def augself_targets(omega1: Tensor, omega2: Tensor, layout: DescriptorLayout) -> Tensor:
    """(B, D) descriptors of view 1 and 2 -> (B, D) targets: w1 - w2, or agreement for bits."""
    target = omega1 - omega2
    for g in layout.groups:
        if g.binary:
            agree = (omega1[:, g.slice] > 0.5) == (omega2[:, g.slice] > 0.5)
            target[:, g.slice] = agree.to(target.dtype)
    return target


def augself_group_losses(
    pred: Tensor, omega1: Tensor, omega2: Tensor, version: str = "v1"
) -> dict[str, Tensor]:
    """Per-group losses, keyed by the layout's group names (fixed keys for a version).

    pred: (B, D) raw head outputs (pre-tanh for continuous groups, logits for binary ones);
    omega1, omega2: (B, D) descriptors of the two views.
    """
    layout = get_layout(version)
    for t in (pred, omega1, omega2):
        check_descriptor(t, version)
    if not pred.shape == omega1.shape == omega2.shape or pred.ndim != 2:
        raise ValueError(
            f"pred, omega1, omega2 must all be (B, {layout.dim}), got {tuple(pred.shape)}, "
            f"{tuple(omega1.shape)}, {tuple(omega2.shape)}"
        )
    target = augself_targets(omega1, omega2, layout)
    losses = {}
    for g in layout.groups:
        p, t = pred[:, g.slice], target[:, g.slice]
        if g.binary:
            losses[g.name] = F.binary_cross_entropy_with_logits(p, t)
        else:
            losses[g.name] = F.mse_loss(torch.tanh(p), t)
    return losses


def augself_loss(
    pred: Tensor,
    omega1: Tensor,
    omega2: Tensor,
    version: str = "v1",
    weights: dict[str, float] | None = None,
) -> Tensor:
    """Weighted sum of `augself_group_losses` (weight 1 for groups missing from `weights`;
    a name that is no group of the layout is refused: a typo left that group at 1)."""
    weights = weights or {}
    check_group_names(weights, get_layout(version))
    losses = augself_group_losses(pred, omega1, omega2, version)
    return sum((weights.get(k, 1.0) * v for k, v in losses.items()), pred.new_zeros(()))


def check_group_names(weights: dict[str, float], layout: DescriptorLayout) -> None:
    """ValueError naming the groups of `layout` if `weights` names any other."""
    unknown = sorted(set(weights) - set(layout.names))
    if unknown:
        raise ValueError(f"unknown AugSelf weight groups {unknown}; groups: {layout.names}")


class AugSelfHead(nn.Module):
    """MLP head predicting the descriptor difference of two views from their features.

    dim: feature dim of f(v); descriptor_dim must match the layout of `version`; hidden: MLP
    width; weights: per-group loss weights (0 switches a group off; AugSelf's own recipes use
    only crop and color).
    """

    def __init__(
        self,
        dim: int,
        descriptor_dim: int = 13,
        hidden: int = 512,
        version: str = "v1",
        weights: dict[str, float] | None = None,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        layout = get_layout(version)
        if descriptor_dim != layout.dim:
            raise ValueError(
                f"descriptor_dim={descriptor_dim} does not match layout {layout.describe()}"
            )
        check_group_names(weights or {}, layout)
        self.version = version
        self.weights = dict(weights or {})
        self.symmetric = symmetric
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, descriptor_dim),
        )

    def predict(self, f1: Tensor, f2: Tensor) -> Tensor:
        """f1, f2: (B, dim) features -> (B, descriptor_dim) raw predictions."""
        if f1.ndim != 2 or f1.shape != f2.shape:
            raise ValueError(
                f"f1, f2 must both be (B, dim), got {tuple(f1.shape)}, {tuple(f2.shape)}"
            )
        # in the head's own dtype: DeepSpeed's bf16 casts the head with the model
        return self.mlp(torch.cat([f1, f2], dim=-1).to(next(self.mlp.parameters()).dtype))

    def forward(self, f1: Tensor, f2: Tensor, omega1: Tensor, omega2: Tensor) -> Tensor:
        """f*: (B, dim) features of the views; omega*: (B, descriptor_dim) descriptors."""
        if self.symmetric:
            pred = self.predict(torch.cat([f1, f2]), torch.cat([f2, f1]))
            omega1, omega2 = torch.cat([omega1, omega2]), torch.cat([omega2, omega1])
        else:
            pred = self.predict(f1, f2)
        # the loss in fp32, whatever the head's dtype (as the other objectives' losses)
        return augself_loss(
            pred.float(), omega1.float(), omega2.float(), self.version, self.weights
        )

    def extra_repr(self) -> str:
        """The settings shown in the module's repr."""
        return f"version={self.version!r}, weights={self.weights}, symmetric={self.symmetric}"
