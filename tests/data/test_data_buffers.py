"""Batch memory from mmssl.data.buffers: plain tensors, fresh per call, worker-safe."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from mmssl.data import buffers


class _Filled(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, bool]:
        x = buffers.empty(2, 3, 512, 512)  # 6 MB: above numpy's 4 MiB huge-page threshold
        x.copy_(torch.arange(x.numel(), dtype=torch.float32).view_as(x)).add_(i)
        scratch = buffers.empty(4, 8, dtype=torch.uint8, leaves=False)
        return x, x.is_shared(), scratch.is_shared()


def test_empty_is_a_fresh_contiguous_tensor():
    a = buffers.empty(4, 3, 8, 8)
    assert a.shape == (4, 3, 8, 8) and a.dtype == torch.float32 and a.is_contiguous()
    for dtype in (torch.uint8, torch.bfloat16, torch.int64):
        b = buffers.empty(5, 6, dtype=dtype)
        assert b.shape == (5, 6) and b.dtype == dtype and b.is_contiguous()
        b.copy_(torch.arange(30).view(5, 6))  # every element is addressable
        assert b[4, 5].item() == 29
    a.fill_(1.0)
    c = buffers.empty(4, 3, 8, 8)
    c.fill_(2.0)
    assert a.data_ptr() != c.data_ptr() and bool((a == 1.0).all())
    assert not a.is_shared()  # outside a worker: ordinary (numpy) memory


def test_batches_cross_a_dataloader_worker_unchanged():
    """The pipeline hands its batches out whole (batch_size=None), as here.  In the
    worker a batch tensor is allocated in shared memory (sent as a handle), scratch is
    not; what arrives equals what the same code computes in this process."""
    got = list(DataLoader(_Filled(), batch_size=None, num_workers=1))
    assert len(got) == 2
    for i, (x, shared, scratch_shared) in enumerate(got):
        assert shared and not scratch_shared
        assert x.shape == (2, 3, 512, 512) and x.dtype == torch.float32
        assert torch.equal(x, _Filled()[i][0])
