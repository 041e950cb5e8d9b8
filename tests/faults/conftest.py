"""The fault-injection suite (issue 10): kill and resume, corrupt data, bad configs and CLI
input, hostile and damaged checkpoints, numerical faults, soak.

Every test here is marked `faults`; CI runs the short versions.  `MMSSL_FAULTS_FULL=1`
(`make faults`) runs the full repetition counts and the long soak.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent, _HERE.parent / "train", _HERE.parent / "data"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faults: fault-injection suite (tests/faults); MMSSL_FAULTS_FULL=1 for full counts",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))


@pytest.fixture(autouse=True)
def _no_stray_launches():
    """A failing or interrupted test leaves no rank of its launches running."""
    yield
    from fault_helpers import LAUNCHES

    while LAUNCHES:
        launch = LAUNCHES.pop()
        if any(p.poll() is None for p in launch.procs):
            launch.kill()


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch):
    """In-process training sets the one-process group's variables; keep them out of later
    tests.  DS_ACCELERATOR=cpu as everywhere in the suite."""
    import os

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    yield
    for key in keys:
        os.environ.pop(key, None)
