"""Memory for the batch tensors that the data pipeline writes once: views, images, sources.

A batch of 64 images at 224 px as two float32 views is 77 MB.  glibc serves a block that
big with a fresh mmap and unmaps it on free, so every batch starts on pages the kernel
has never mapped, and the first write to each 4 KiB page is a page fault.  numpy asks
for transparent huge pages (`madvise`) on blocks of 4 MiB and more; torch's CPU allocator
does not (unless `THP_MEM_ALLOC_ENABLE=1` is set before torch starts).  On the 2-core
benchmark VM, allocating and filling the two views of a 224 px batch cost about 495 µs a
sample with torch's allocator and about 135 µs with numpy's, where the kernel maps 2 MiB
at a time (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise; with `never` both
cost the same).

The tensors share the numpy array's memory and keep it alive; they pickle into a
DataLoader worker's shared memory like any other CPU tensor.
"""

from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.float32: np.float32, torch.uint8: np.uint8}


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised, contiguous CPU tensor in memory from numpy's allocator."""
    return torch.from_numpy(np.empty(shape, _NUMPY[dtype]))
