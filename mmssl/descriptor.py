"""The augmentation descriptor layout: versioned, fixed, shared by data, models and objectives.

v1 follows the CASSLE layout with keys in sorted order (13 dims):

========== ===== ====== ===========================================================
group      slice binary meaning
========== ===== ====== ===========================================================
blur       0:1   no     Gaussian blur sigma, 0 when not applied
color      1:5   no     brightness, contrast, saturation, hue strengths, normalised
                        so that 0 is "unchanged": factor - 1 for the first three,
                        the hue shift in turns (|h| <= 0.5) for the fourth; 0 when
                        colour jitter was not applied.  Not divided by the jitter
                        range (as CASSLE's code does), so a descriptor means the
                        same under any AugmentConfig
color_diff 5:8   no     per-channel (R, G, B) mean change caused by the colour ops
                        (jitter and grayscale): the mean after minus the mean
                        before.  CASSLE's code records before minus after, of the
                        jitter alone: negate it to compare
crop       8:12  no     centre y, centre x, height, width, normalised to [0, 1];
                        centre x mirrored (1 - cx) when the view was flipped
grayscale  12:13 yes    1 when converted to grayscale, else 0
========== ===== ====== ===========================================================

Horizontal flip has no slot of its own in v1: it is carried by the mirrored crop centre x.

The neutral descriptor (`DescriptorLayout.neutral`) is that of the un-augmented view: the
crop (0.5, 0.5, 1, 1), nothing else applied.  It also conditions every plain image, in
training (a CLIP-style source's resized, centre-cropped image) and at evaluation (cond=None),
whatever the source's aspect ratio: it stands for "the standard view", the same at both,
not for the exact box a centre crop of a non-square image takes (which evaluation would not
know).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class DescriptorGroup:
    """One named group of descriptor dims: `t[..., start:start + dim]`."""

    name: str
    start: int
    dim: int
    binary: bool = False

    @property
    def slice(self) -> slice:
        """The group's dims as a slice of the last axis."""
        return slice(self.start, self.start + self.dim)


@dataclass(frozen=True)
class DescriptorLayout:
    """An ordered, contiguous set of groups plus the descriptor of an un-augmented view."""

    version: str
    groups: tuple[DescriptorGroup, ...]
    neutral: tuple[float, ...]

    @property
    def dim(self) -> int:
        """Total descriptor dims (13 for v1)."""
        return sum(g.dim for g in self.groups)

    @property
    def names(self) -> tuple[str, ...]:
        """The group names, in layout order."""
        return tuple(g.name for g in self.groups)

    @property
    def binary_groups(self) -> tuple[str, ...]:
        """The names of the 0/1-valued groups."""
        return tuple(g.name for g in self.groups if g.binary)

    def group(self, name: str) -> DescriptorGroup:
        """The group called `name`; KeyError naming the groups if none is."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"descriptor {self.version} has no group {name!r}; groups: {self.names}")

    def describe(self) -> str:
        """One-line summary, e.g. `v1[13]: blur 0:1, ..., grayscale 12:13 (binary)`."""
        parts = [
            f"{g.name} {g.start}:{g.start + g.dim}" + (" (binary)" if g.binary else "")
            for g in self.groups
        ]
        return f"{self.version}[{self.dim}]: " + ", ".join(parts)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form, written into checkpoint configs."""
        return {
            "version": self.version,
            "dim": self.dim,
            "groups": [
                {"name": g.name, "start": g.start, "dim": g.dim, "binary": g.binary}
                for g in self.groups
            ],
        }

    def neutral_tensor(self, batch_size: int | None = None) -> Tensor:
        """The descriptor of an un-augmented view: (D,) or (B, D) float32."""
        t = torch.tensor(self.neutral, dtype=torch.float32)
        return t if batch_size is None else t.expand(batch_size, -1).clone()


def _contiguous(spec: list[tuple[str, int, bool]]) -> tuple[DescriptorGroup, ...]:
    groups, start = [], 0
    for name, dim, binary in spec:
        groups.append(DescriptorGroup(name, start, dim, binary))
        start += dim
    return tuple(groups)


DESCRIPTOR_V1 = DescriptorLayout(
    version="v1",
    groups=_contiguous(
        [
            ("blur", 1, False),
            ("color", 4, False),
            ("color_diff", 3, False),
            ("crop", 4, False),
            ("grayscale", 1, True),
        ]
    ),
    # full-image crop: centre (0.5, 0.5), size (1, 1); everything else off
    neutral=(0.0,) + (0.0,) * 4 + (0.0,) * 3 + (0.5, 0.5, 1.0, 1.0) + (0.0,),
)

LAYOUTS: dict[str, DescriptorLayout] = {"v1": DESCRIPTOR_V1}
# the layout the data pipeline writes (`mmssl.data.augment`), and so the one training runs
# with and checkpoints and exports record: a model's condition.layout must be this one
PIPELINE_LAYOUT = "v1"


def get_layout(version: str = "v1") -> DescriptorLayout:
    """The layout of a descriptor version; ValueError naming the known versions otherwise."""
    if version not in LAYOUTS:
        raise ValueError(
            f"unknown augmentation descriptor version {version!r}; known: {sorted(LAYOUTS)}"
        )
    return LAYOUTS[version]


def check_descriptor(t: Tensor, version: str = "v1") -> None:
    """Raise ValueError unless `t` is a (..., D) floating tensor of the given layout's width."""
    layout = get_layout(version)
    if not isinstance(t, Tensor):
        raise ValueError(f"augmentation descriptor must be a tensor, got {type(t).__name__}")
    if t.ndim < 1 or t.shape[-1] != layout.dim:
        raise ValueError(
            f"augmentation descriptor has shape {tuple(t.shape)}, expected (..., {layout.dim}) "
            f"for layout {layout.describe()}"
        )
    if not t.is_floating_point():
        raise ValueError(f"augmentation descriptor must be floating point, got {t.dtype}")


def render_descriptor(vec: Tensor | np.ndarray | list[float]) -> str:
    """Short text for a v1 descriptor, e.g. "crop 0.42 at (0.31, 0.55), hue +0.08, grayscale"."""
    v = [float(a) for a in (vec.tolist() if hasattr(vec, "tolist") else vec)]
    if len(v) != 13:
        raise ValueError(f"a v1 descriptor has 13 values, got {len(v)}")
    parts = []
    cy, cx, h, w = v[8:12]
    if abs(h * w - 1) > 5e-3 or abs(cy - 0.5) > 5e-3 or abs(cx - 0.5) > 5e-3:
        parts.append(f"crop {h * w:.2f} at ({cy:.2f}, {cx:.2f})")
    for name, val in zip(("brightness", "contrast", "saturation", "hue"), v[1:5]):
        if abs(val) >= 5e-3:
            parts.append(f"{name} {val:+.2f}")
    if v[12] > 0.5:
        parts.append("grayscale")
    if v[0] > 0:
        parts.append(f"blur {v[0]:.1f}")
    return ", ".join(parts) if parts else "original image"
