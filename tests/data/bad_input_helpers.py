"""Helpers shared by test_data_bad_input.py and test_data_bad_images.py: a good sample."""

from __future__ import annotations

import numpy as np
from data_helpers import png_bytes


def _good(i: int) -> dict:
    arr = np.full((6, 6, 3), i % 256, np.uint8)
    return {"__key__": f"g{i:04d}", "png": png_bytes(arr), "txt": f"good {i}", "json": {"i": i}}
