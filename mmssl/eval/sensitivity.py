"""Does a conditioned encoder use its condition?  The omega-usage diagnostic.

- **Loss rise under shuffling**: the SimCLR loss on fixed augmented batches, with the true
  descriptors, then with all of omega shuffled across the batch, then with one descriptor
  group (crop, color, color_diff, blur, grayscale) shuffled at a time.  A mechanism that
  ignores omega shows no rise; one that uses it to undo an augmentation gets worse when the
  descriptor no longer matches the view.
- **Centred cosine** between f(x) and f(t(x)) for one augmentation type at a time.  Features
  are centred by the training mean first: post-activation features share a large common
  component, so raw cosines are near 1 for any pair and say little about invariance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmssl.descriptor import get_layout
from mmssl.models.multimodal import MultimodalModel
from mmssl.objectives import nt_xent_loss


def conditioned_simclr_loss(
    model: MultimodalModel,
    views: list[torch.Tensor],
    augs: list[torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """SimCLR loss with each view conditioned on its own descriptor (both branches).

    views: two (B, 3, H, W); augs: two (B, 13).  Unconditioned models ignore augs.
    """
    z = []
    for view, aug in zip(views, augs):
        c = model.condition(aug)
        z.append(model.project(model.forward_features(view, c)["pooled"], c))
    return nt_xent_loss(z[0], z[1], temperature)


def _shuffled(aug: torch.Tensor, sl: slice, generator: torch.Generator) -> torch.Tensor:
    out = aug.clone()
    perm = torch.randperm(aug.shape[0], generator=generator)
    out[:, sl] = aug[perm][:, sl]
    return out


@torch.no_grad()
def omega_usage(
    model: MultimodalModel,
    batches: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    temperature: float,
    seed: int = 0,
    version: str = "v1",
) -> dict[str, float]:
    """Mean SimCLR loss on `batches` ((views, augs) pairs) and its rise when omega is shuffled.

    Returns {"loss", "rise/all", "rise/<group>" for every group of the layout}.
    """
    layout = get_layout(version)
    g = torch.Generator().manual_seed(seed)
    slices = {"all": slice(0, layout.dim)} | {grp.name: grp.slice for grp in layout.groups}
    totals = dict.fromkeys(["loss", *(f"rise/{k}" for k in slices)], 0.0)
    for views, augs in batches:
        base = conditioned_simclr_loss(model, views, augs, temperature).item()
        totals["loss"] += base
        for name, sl in slices.items():
            shuffled = [_shuffled(a, sl, g) for a in augs]
            rise = conditioned_simclr_loss(model, views, shuffled, temperature).item() - base
            totals[f"rise/{name}"] += rise
    return {k: v / len(batches) for k, v in totals.items()}


@torch.no_grad()
def features(model: MultimodalModel, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Pooled features (N, D) for downstream use: cond=None, or the neutral descriptor's
    condition for a backbone-conditioned model (see MultimodalModel.neutral_condition)."""
    vision = model.visual
    assert vision is not None
    backbone = bool(vision.cfg.cond_dim or vision.cfg.cond_tokens)
    out = []
    for chunk in images.split(batch_size):
        cond = model.neutral_condition(chunk.shape[0], chunk.device) if backbone else None
        out.append(model.forward_features(chunk, cond)["pooled"].float())
    return torch.cat(out)


@torch.no_grad()
def centred_cosines(
    model: MultimodalModel,
    images: torch.Tensor,
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    mean: torch.Tensor,
) -> dict[str, float]:
    """Mean cosine of (f(x) - mean) and (f(t(x)) - mean) for each named transform t.

    images: (N, 3, H, W) clean images; mean: (D,) training-mean feature.
    """
    ref = features(model, images) - mean
    return {
        name: F.cosine_similarity(ref, features(model, t(images)) - mean, dim=-1).mean().item()
        for name, t in transforms.items()
    }
