"""A rank that aborts at its teardown, once its training returned ("terminate called without an
active exception", seen now and then under load with both launchers, cause in native code not
found), made the launcher kill rank 0 while it still wrote the run's summary.md and loss.png:
a finished run lost its summary.  Every rank now waits for rank 0's before it returns."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import BIN, RECIPES, free_port, run, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DRIVER = """
import os, sys
from mmssl.train.cli import main
code = main(sys.argv[1:])
if os.environ["RANK"] == "1":
    os.abort()  # what the native teardown abort does: SIGABRT once training returned
sys.exit(code)
"""


def test_a_rank_aborting_at_teardown_costs_no_summary(demo_data: str, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [
        str(RECIPES / "quickstart.yaml"),
        *tiny_overrides(demo_data, str(tmp_path), "run"),
        "train.steps=2",
    ]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    res = run([*torchrun, str(driver), *args], timeout=300)
    assert res.returncode != 0 and "exitcode  : -6" in res.stderr, res.stderr[-2000:]
    summary = tmp_path / "run" / "summary.md"
    assert summary.is_file(), res.stderr[-2000:]
    assert "- steps: 0 -> 2 of 2" in summary.read_text()
    assert (tmp_path / "run" / "loss.png").is_file()
