"""Argument checks of `mmssl.data.pipeline.build_pipeline`, and the image normalisation
check that recipes (`data.mean`/`std`) and exports (`preprocess.mean`/`std`) share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmssl.data.augment import is_real
from mmssl.data.errors import DataError


def is_int(value: Any) -> bool:
    """An integer, a numpy one too (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_args(
    image_size: Any,
    num_views: Any,
    seed: Any,
    shuffle: Any,
    num_workers: Any,
    max_pixels: Any,
    augment: Any,
) -> None:
    """The sizes and counts of `build_pipeline` in range: otherwise torch or numpy fail deep
    inside a worker (or a negative count silently means none)."""
    for name, value, least in (
        ("image_size", image_size, 2),  # a 1-pixel view has no border to reflect a blur at
        ("num_views", num_views, 0),
        ("seed", seed, 0),  # numpy seeds are non-negative
        ("shuffle", shuffle, 1),
        ("num_workers", num_workers, 0),
        ("max_pixels", max_pixels, 1),
    ):
        if not (is_int(value) and value >= least):
            raise DataError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(augment, (tuple, list)) and len(augment) != num_views:
        raise DataError(f"{len(augment)} augment configs for num_views={num_views}")


def check_norm(mean: Any, std: Any, prefix: str = "") -> None:
    """Per-channel normalisation takes both mean and std (one alone used to be ignored
    without a word): 3 finite numbers each, on the [0, 1] scale of the images (mean in
    [0, 1], std in (0, 1]: the 0-255 scale normalised every image to about -2 without a
    word).  DataError names `prefix`mean/std."""
    if (mean is None) != (std is None):
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise DataError(
            f"{prefix}{given} needs {prefix}{missing} too (images are normalised with both)"
        )
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        try:
            ok = not isinstance(values, (str, bytes)) and len(values) == 3
            ok = ok and all(is_real(v) and math.isfinite(float(v)) for v in values)
        except TypeError:
            ok = False
        if not ok:
            raise DataError(f"{prefix}{name} must be 3 finite numbers (R, G, B), got {values!r}")
    if std is not None and not all(float(v) > 0 for v in std):
        raise DataError(f"{prefix}std must be > 0 in every channel, got {std!r}")
    for name, values, bound in (("mean", mean, "in [0, 1]"), ("std", std, "at most 1")):
        if values is not None and not all(0 <= float(v) <= 1 for v in values):
            raise DataError(
                f"{prefix}{name} must be {bound} in every channel (images are in [0, 1]), got "
                f"{values!r}; divide a {name} on the 0-255 scale by 255"
            )
