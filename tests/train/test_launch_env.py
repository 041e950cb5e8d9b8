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


def test_the_environments_ninja_comes_first(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A shell without the venv on PATH built DeepSpeed's ops with the system's ninja, one with
    it with the venv's; each version discarded the other's build log and rebuilt every op
    (1-2 minutes a launch).  The ninja beside this Python now comes first, once."""
    import os
    import sys

    from mmssl.train.engine import env_ninja_first

    env_bin = tmp_path / "bin"
    env_bin.mkdir()
    monkeypatch.setattr(sys, "executable", str(env_bin / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin"]))
    env_ninja_first()
    assert os.environ["PATH"] == os.pathsep.join(["/usr/local/bin", "/usr/bin"])  # none there
    (env_bin / "ninja").write_text("")
    for _ in range(2):
        env_ninja_first()
        assert os.environ["PATH"] == os.pathsep.join([str(env_bin), "/usr/local/bin", "/usr/bin"])


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_world_size_below_one_is_named(monkeypatch, value: str) -> None:
    """WORLD_SIZE=0 divided the batch by zero (a traceback), -2 was reported as a world size."""
    from mmssl.schema import ConfigError
    from mmssl.train.recipe import world_size_from_env

    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ConfigError, match=f"WORLD_SIZE must be an integer >= 1, got '{value}'"):
        world_size_from_env()


@pytest.mark.parametrize("build_fails", [True, False])
def test_a_failed_op_build_names_the_compiler(monkeypatch, build_fails: bool) -> None:
    """On the CPU DeepSpeed compiles its shared-memory op the first time on a machine; without
    a C++ compiler training died with a ~60-line traceback. Other errors pass as they are."""
    import deepspeed

    from mmssl.schema import ConfigError
    from mmssl.train.engine import init_distributed

    message = "Error building extension 'deepspeed_shm_comm'" if build_fails else "other"

    def fail(**kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(deepspeed, "init_distributed", fail)
    expected = (
        (ConfigError, "needs a working C\\+\\+ compiler")
        if build_fails
        else (RuntimeError, "other")
    )
    with pytest.raises(expected[0], match=expected[1]):
        init_distributed()
