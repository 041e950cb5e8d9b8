"""Objectives: pure loss functions plus thin modules holding hyperparameters.

Objectives take tensors and never import models. Contrastive losses normalise embeddings
internally and are exact under data parallelism (see `contrastive.py`).
"""

from typing import TYPE_CHECKING

from mmssl import _submodule_attributes
from mmssl.objectives.augself import (
    AugSelfHead,
    augself_group_losses,
    augself_loss,
    augself_targets,
)
from mmssl.objectives.contrastive import (
    ClipLoss,
    NTXentLoss,
    caption_keys,
    clip_loss,
    nt_xent_loss,
    positives_from_ids,
    positives_from_labels,
    soft_target_cross_entropy,
)
from mmssl.objectives.lm import (
    CaptioningLoss,
    NextTokenLoss,
    captioning_loss,
    global_token_mean,
    head_next_token_loss,
    head_next_token_sum,
    next_token_loss,
    next_token_sum,
)
from mmssl.objectives.siglip import SigLipLoss, siglip_loss

__all__ = [
    "AugSelfHead",
    "CaptioningLoss",
    "ClipLoss",
    "NTXentLoss",
    "NextTokenLoss",
    "SigLipLoss",
    "augself_group_losses",
    "augself_loss",
    "augself_targets",
    "caption_keys",
    "captioning_loss",
    "clip_loss",
    "global_token_mean",
    "head_next_token_loss",
    "head_next_token_sum",
    "next_token_loss",
    "next_token_sum",
    "nt_xent_loss",
    "positives_from_ids",
    "positives_from_labels",
    "siglip_loss",
    "soft_target_cross_entropy",
]

if not TYPE_CHECKING:  # `mmssl.objectives.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
