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


@pytest.fixture()
def reloaded_compiled():
    """mmssl.data.decode loads each compiled (numba) module once a process: a test that
    changes whether it can load (numba hidden, NUMBA_DISABLE_JIT) sees its own state, and
    the tests after it the real one."""
    from mmssl.data import decode

    decode._load_compiled.cache_clear()
    decode._SAID.clear()
    yield
    decode._load_compiled.cache_clear()
    decode._SAID.clear()


@pytest.fixture(autouse=True)
def _functional_linear_restored():
    """A ZeRO-3 engine replaces torch.nn.functional.linear for the whole process with
    DeepSpeed's wrapper ("this will persist unless manually reset"): the tests after one in
    the same process dispatched other kernels (bench/floor.py's GEMM record saw no addmm)."""
    import torch

    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear
