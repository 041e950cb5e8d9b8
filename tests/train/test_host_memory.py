"""train.keep_host_memory: freed blocks are reused instead of page-faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# three live 4 MiB outputs per iteration (3,072 pages of 4 KiB), freed at its end
PROGRAM = """
import resource, sys, torch
from mmssl.train.host_memory import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.randn(1024, 1024)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

for _ in range(50):  # the heap grows to its working size
    ys = [x * 2 for _ in range(3)]
    del ys
f0 = faults()
for _ in range(100):
    ys = [x * 2 for _ in range(3)]
    del ys
print(took, (faults() - f0) / 100)
"""


def _faults_per_iteration(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


GLIBC_MALLOC = platform.libc_ver()[0] == "glibc" and "LD_PRELOAD" not in os.environ


@pytest.mark.skipif(not GLIBC_MALLOC, reason="glibc's malloc and mallopt")
def test_kept_heap_reuses_freed_blocks_without_page_faults():
    took, kept = _faults_per_iteration("keep")
    assert took == "True"
    # every iteration writes 3,072 fresh pages if freed blocks go back to the kernel; kept,
    # they are reused: a few faults of other allocations at most
    assert kept < 30, kept


def test_keep_host_memory_false_after_a_run_that_set_it_says_it_has_no_effect(
    tmp_path, monkeypatch, caplog
):
    """The setting is process-wide and cannot be undone (glibc reads no threshold back): a
    second run of a sweep in one process asked for false and silently kept the first's."""
    import logging

    from train_helpers import restored_env, synthetic_recipe

    from mmssl.train import host_memory
    from mmssl.train.cli import main as train_main

    monkeypatch.setattr(host_memory, "_KEPT", False)
    with restored_env(), caplog.at_level(logging.WARNING, logger="mmssl.train"):
        off = str(synthetic_recipe(tmp_path, "off", 1, keep_host_memory=False))
        assert train_main([off]) == 0
        assert "keep_host_memory=false has no effect" not in caplog.text
        assert train_main([str(synthetic_recipe(tmp_path, "on", 1))]) == 0
        assert host_memory.kept() == GLIBC_MALLOC
        caplog.clear()
        assert train_main([str(synthetic_recipe(tmp_path, "off2", 1, keep_host_memory=False))]) == 0
    assert ("keep_host_memory=false has no effect" in caplog.text) == GLIBC_MALLOC
