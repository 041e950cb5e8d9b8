"""Make tests/ (distributed_utils) and tests/train/ (train_helpers) importable here; the
`one_process_group` fixture of the modules that run the engine in-process."""

import os
import sys
from pathlib import Path

import pytest

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def one_process_group():
    """In-process engine runs set the one-process group's variables; leave the environment
    as found.  The group itself stays for later modules, as in a real process: DeepSpeed
    caches its groups, and an engine built after the group was destroyed and made anew
    failed on the stale cache.  Use per module: `pytest.mark.usefixtures("one_process_group")`."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
