"""Session-wide fixtures shared by every test directory."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`mmssl demo-data` output (coloured digits + pydoc text), written once per session."""
    from mmssl.data.demo import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(str(out))
    return str(out)


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """In-process runs of a CLI (train, finetune) start a one-process gloo group and set
    RANK/WORLD_SIZE/MASTER_*; undo both so later tests see a plain single process."""
    import os

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
