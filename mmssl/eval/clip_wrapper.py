"""A CLIP-style face for an mmssl model, so harnesses written for open_clip models (the
CLIP_benchmark convention) can evaluate it:

    model, transform, tokenizer = load_clip("runs/quickstart/export")
    images = torch.stack([transform(pil) for pil in pil_images])      # (B, 3, S, S)
    image_features = model.encode_image(images)                        # (B, E)
    text_features = model.encode_text(tokenizer(["a photo of a 7."]))  # (1, E)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mmssl.eval.data import Preprocess

if TYPE_CHECKING:
    from mmssl.models.io import LogitParams
    from mmssl.models.multimodal import MultimodalModel


def mask_from_ids(ids: Tensor, eos_id: int, bos_id: int | None = None) -> Tensor:
    """(B, T) ids of `batch_encode` -> (B, T) bool mask: up to and including the first eos
    after a leading `bos_id`.

    CLIP-style harnesses pass bare ids; rows without eos are taken as all valid.  The leading
    bos is passed over: a tokenizer whose bos is its eos (GPT-2's `<|endoftext|>`) would
    otherwise end every text at its first token, giving every text the same embedding.
    """
    t = ids.shape[1]
    is_eos = ids == eos_id
    if bos_id is not None and t > 1:
        is_eos[:, 0] &= ids[:, 0] != bos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], t - 1))
    return torch.arange(t, device=ids.device)[None, :] <= first[:, None]


class CLIPTokenizer:
    """texts -> (B, context_length) int64 ids, as open_clip's `tokenize`."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, _ = self.tokenizer.batch_encode(texts, context_length or self.context_length)
        return ids


class ImageTransform:
    """A PIL image, or a (3, H, W) tensor (uint8, or float in [0, 1]), -> float (3, S, S), as
    the model's evaluation preprocessing (shorter side resize, centre crop, optional
    mean/std).  A PIL image becomes 8-bit RGB as the shard decoder makes it (`to_rgb8`:
    16-bit and float greyscale are scaled, not clipped white); a float tensor is quantised
    to uint8 as a decoded image is, so it gives the pixels its uint8 twin gives."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Any) -> Tensor:
        if isinstance(image, Tensor):
            return self.preprocess([_uint8_chw(image)])[0]
        if not hasattr(image, "convert"):
            raise TypeError(
                f"expected a PIL image or a (3, H, W) tensor, got {type(image).__name__}"
            )
        import numpy as np

        from mmssl.data.shard_inputs import to_rgb8

        rgb = np.asarray(to_rgb8(image)).copy()
        return self.preprocess([torch.from_numpy(rgb).permute(2, 0, 1)])[0]


def _uint8_chw(image: Tensor) -> Tensor:
    """A (3, H, W) image tensor as uint8; ValueError for another layout, dtype or range."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise ValueError(f"expected a uint8 or float image tensor, got {image.dtype}")
    if not bool(((image >= 0) & (image <= 1)).all()):  # NaN fails too
        raise ValueError("a float image tensor must hold values in [0, 1] (0..255 is uint8)")
    return (image.float() * 255).round().to(torch.uint8)


class CLIPWrapper(nn.Module):
    """encode_image(images (B, 3, S, S)) and encode_text(ids (B, T)) -> (B, E), unnormalised,
    plus `logit_scale` (and a SigLIP model's `logit_bias`); the mask the text tower needs is
    rebuilt from the eos position.  Inputs run on the model's device and the results come
    back on the inputs' device, so a harness's tensors all stay on one device.

    logits: the export's record of the objective the towers were trained with (`load_clip`
    passes its clip one, else its siglip one).  Its scale is the one the loss used: the
    model's parameter clamped at `max_logit_scale` (open_clip clamps the parameter itself;
    mmssl clamps in the loss, so the parameter may lie above).  Without one, the model's
    `logit_scale` parameter, and no bias.
    """

    def __init__(
        self,
        model: MultimodalModel,
        eos_id: int,
        bos_id: int | None = None,
        logits: LogitParams | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.logits = logits

    @property
    def logit_scale(self) -> Tensor:
        """log of the logit multiplier (open_clip's `logit_scale`): the trained objective's."""
        if self.logits is not None:
            return torch.tensor(self.logits.logit_scale, device=self._device())
        scale = self.model.logit_scale
        if scale is None:  # load_clip checks both towers, which come with the scale
            raise RuntimeError(
                "a CLIP-style model needs vision and text towers (and a logit scale)"
            )
        return scale

    @property
    def logit_bias(self) -> Tensor | None:
        """A SigLIP objective's learned bias; None for CLIP (as open_clip's models)."""
        if self.logits is None or self.logits.logit_bias is None:
            return None
        return torch.tensor(self.logits.logit_bias, device=self._device())

    def _device(self) -> torch.device:
        from mmssl.eval.loading import model_device

        return model_device(self.model)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """images (B, 3, S, S) -> (B, E), on the images' device."""
        out = self.model.encode_image(images.to(self._device()), normalize=normalize)
        return out.to(images.device)

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """ids (B, T) -> (B, E), on the ids' device; the mask is rebuilt from the eos position."""
        ids = text.to(self._device())
        out = self.model.encode_text(
            ids, mask_from_ids(ids, self.eos_id, self.bos_id), normalize=normalize
        )
        return out.to(text.device)

    def forward(self, images: Tensor, text: Tensor) -> tuple[Tensor, ...]:
        """open_clip's (image_features, text_features, logit_scale.exp()), normalised, with
        `logit_bias` fourth for a SigLIP model (as open_clip's); on the images' device."""
        out = (
            self.encode_image(images, normalize=True),
            self.encode_text(text, normalize=True).to(images.device),
            self.logit_scale.exp().to(images.device),
        )
        bias = self.logit_bias
        return out if bias is None else (*out, bias.to(images.device))


def load_clip(
    path: str | Path, tokenizer: str | None = None
) -> tuple[CLIPWrapper, ImageTransform, CLIPTokenizer]:
    """(model, transform, tokenizer) of an exported model or run directory, in eval mode, on
    the accelerator device (`mmssl.eval.loading.load_model`)."""
    from mmssl.eval.loading import EvalError, load_model

    loaded = load_model(path)
    text = loaded.model.text
    if loaded.model.visual is None or text is None:
        raise EvalError(f"{path}: a CLIP-style model needs vision and text towers")
    tok = loaded.tokenizer(tokenizer)
    records = loaded.logit_params
    chosen = [r for kind in ("clip", "siglip") for r in records.values() if r.type == kind]
    wrapper = CLIPWrapper(
        loaded.model, int(tok.eos_id), int(tok.bos_id), chosen[0] if chosen else None
    ).eval()
    return (
        wrapper,
        ImageTransform(loaded.preprocess),
        CLIPTokenizer(tok, text.cfg.context_length),
    )
