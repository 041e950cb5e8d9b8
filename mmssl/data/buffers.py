"""Memory for the batch tensors that the data pipeline writes once: views, images, sources.

Fresh memory costs page faults, and at 224 px they are a large part of a batch's cost.

- **In the loading process** (no DataLoader worker): a batch of 64 images as two float32
  views is 77 MB.  glibc serves a block that big with a fresh mmap and unmaps it on free,
  so every batch starts on pages the kernel has never mapped, and the first write to each
  4 KiB page is a fault.  numpy asks for transparent huge pages (`madvise`) on blocks of
  4 MiB and more; torch's CPU allocator does not (unless `THP_MEM_ALLOC_ENABLE=1` is set
  before torch starts).  On the 2-core benchmark VM, allocating and filling those views
  took about 495 µs a sample with torch's allocator and about 135 µs with numpy's
  (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise; with `never` both cost the
  same).
- **In a DataLoader worker**, a batch leaves through shared memory: pickling copies an
  ordinary tensor into a new shared segment (about 50 ms for those 77 MB).  A tensor that
  is already shared goes as a handle, so batches that leave the worker are written
  straight into shared memory, as torch's own `default_collate` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import get_worker_info


def empty(*shape: int, dtype: torch.dtype = torch.float32, leaves: bool = True) -> torch.Tensor:
    """An uninitialised, contiguous CPU tensor for a batch.

    leaves: the tensor is part of the batch handed to the consumer (views, images), so in
    a DataLoader worker it is allocated in shared memory; scratch (False) never is.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if leaves and get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(nbytes)
    else:  # the storage keeps the numpy array alive
        storage = torch.from_numpy(np.empty(nbytes, np.uint8)).untyped_storage()
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))  # contiguous
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)
