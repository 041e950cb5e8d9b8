"""Small layers: DropPath (stochastic depth), LayerScale, PatchEmbed."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability `p` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p <= 1.0:  # NaN too
            raise ValueError(f"drop_path must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) -> (B, ...): in training, each sample's x zeroed with probability p, the
        rest scaled by 1 / (1 - p) so the expectation is unchanged; the identity in eval."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        if keep == 0.0:  # always dropped: zeros (not 0 / 0), as timm
            return x * 0.0
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT), initialised at `init_values`."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> x * gamma, (..., D)."""
        return x * self.gamma


def check_dtype(x: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    """TypeError naming the fix when floating-point input `x` and the `weight` it meets
    differ in dtype outside autocast (torch's own message names neither: "mat1 and mat2
    must have the same dtype")."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{what} are {x.dtype} but the model's weights are {weight.dtype}: cast one to "
            "the other (.to(dtype)) or run under torch.autocast"
        )


class PatchProjection(nn.Conv2d):
    """A conv with kernel = stride = `patch_size` (the weight is the conv's, (D, C, p, p), so
    timm and open_clip load into it), applied as one matrix multiply over the flattened
    patches: (B, C, H, W) -> (B, N, D), patches in row-major order.  The same sum as the
    conv; in bf16 on the CPU the conv's backward was 5x slower than the matmul's (13 ms
    against 2.7 ms at ViT-S/16, 112 px, batch 32).  A module of its own, so the weight is
    used inside its owner's forward (ZeRO-3 gathers a module's parameters around it).
    Other settings (a changed stride or padding, a size the patch does not divide) run the
    conv itself.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, bias: bool = True):
        super().__init__(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> patch embeddings (B, N, D)."""
        b, c, h, w = images.shape
        p = self.kernel_size[0]
        patch = (p, p) == self.kernel_size == self.stride and self.padding == (0, 0)
        if not (patch and self.dilation == (1, 1) and self.groups == 1) or h % p or w % p:
            return super().forward(images).flatten(2).transpose(1, 2)  # as the conv it is
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, (h // p) * (w // p), c * p * p)  # (B, N, C p p)
        weight = self.weight.reshape(self.out_channels, -1)
        return nn.functional.linear(patches, weight, self.bias)


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each projected to `dim` (see PatchProjection).
    (B, C, H, W) -> (B, N, D), N = (H/p)(W/p)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = PatchProjection(in_chans, dim, patch_size, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W), floating point -> (B, N, D); other shapes and dtypes are refused
        with a message naming the mistake."""
        # the usual mistakes (a single image, HWC, uint8 pixels) otherwise surface as a matmul
        # shape or dtype error deep inside the projection
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels (shape {tuple(images.shape)}), the "
                f"model takes {self.proj.in_channels}: expected (B, C, H, W)"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point (pixels scaled to [0, 1]), got {images.dtype}"
            )
        check_dtype(images, self.proj.weight, "images")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
        return self.proj(images)  # (B, N, D)
