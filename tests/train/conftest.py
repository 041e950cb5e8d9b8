"""Make tests/ (distributed_utils) and tests/train/ (train_helpers) importable here; the
`one_process_group` fixture of the modules that run the engine in-process."""

import sys
from pathlib import Path

import pytest

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture(scope="module")
def one_process_group():
    """The environment of in-process engine runs restored at the end of the module.  The
    group itself stays for later modules, as in a real process: DeepSpeed caches its groups,
    and an engine built after the group was destroyed and made anew failed on the stale
    cache.  Use per module: `pytest.mark.usefixtures("one_process_group")`."""
    from train_helpers import restored_env

    with restored_env():
        yield
