"""`init_distributed` and the launch environment: a group a caller already started is adopted
whatever the environment says (the partial-environment check refused one: the reviewer's
harness sets RANK and WORLD_SIZE but not LOCAL_RANK)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_process_group")


def test_a_started_group_is_adopted_without_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mmssl.train.engine import init_distributed

    init_distributed()  # the one-process group of this module
    assert torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    init_distributed()  # adopted: no "RANK is set but LOCAL_RANK not"
