"""mmssl.distributed: one-process behaviour, and the collectives on 3 real gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed_utils import run_distributed

from mmssl import distributed
from mmssl.objectives import SigLipLoss

SIZES = (1, 2, 3)  # unequal on purpose: the gathers must not assume equal local batches


def _single_process_defaults() -> None:
    import os

    assert not distributed.is_initialized()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    os.environ.pop("LOCAL_RANK", None)
    assert distributed.local_rank() == 0
    os.environ["LOCAL_RANK"] = "3"
    assert distributed.local_rank() == 3
    os.environ["LOCAL_RANK"] = "first"
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got 'first'"):
        distributed.local_rank()
    distributed.barrier()


def _single_process_collectives_are_identities() -> None:
    assert not distributed.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.send_right_recv_left(x) is x
    g = distributed.all_gather_no_grad(x)
    assert not g.requires_grad and g.equal(x.detach())
    s = distributed.all_reduce_sum(x)
    assert s.equal(x.detach()) and s.data_ptr() != x.data_ptr()
    assert distributed.all_reduce_mean(x).equal(x.detach())
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object([1, 2]) == [1, 2]
    assert distributed.gather_sizes(5) == [5]


@pytest.mark.parametrize(
    "check", [_single_process_defaults, _single_process_collectives_are_identities]
)
def test_without_a_process_group(check: Any) -> None:
    """Run in a fresh process: in-process DeepSpeed runs earlier in the session (train,
    finetune) leave their one-process group behind, as DeepSpeed cannot tear it down."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(check)


def _collectives() -> dict[str, Any]:
    r, w = distributed.rank(), distributed.world_size()
    out: dict[str, Any] = {"rank": r, "world_size": w, "local_rank": distributed.local_rank()}
    n = SIZES[r]
    x = (torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 10 * r).requires_grad_(True)
    gathered = distributed.all_gather_with_grad(x)
    # every rank weighs the gathered rows differently, so the gradient of x needs every rank
    weights = (r + 1) * torch.arange(1, gathered.shape[0] + 1, dtype=torch.float32)[:, None]
    (gathered * weights).sum().backward()
    out["gathered"] = gathered.detach()
    out["gather_grad"] = x.grad.clone()
    # the backward all-reduces a copy of the incoming gradient: reduced in place, it changed
    # the caller's tensor and so the gradient of everything else it reaches
    other = torch.zeros(sum(SIZES), 2, requires_grad=True)
    v = torch.full((sum(SIZES), 2), float(r + 1))
    (distributed.all_gather_with_grad(x.detach().requires_grad_(True)) + other).backward(v)
    out["upstream"], out["other_grad"] = v.clone(), other.grad.clone()
    out["no_grad"] = distributed.all_gather_no_grad(x)
    out["labels"] = distributed.all_gather_no_grad(torch.full((n, 3), r, dtype=torch.long))
    out["sum"] = distributed.all_reduce_sum(torch.tensor([r + 1.0]))
    out["mean"] = distributed.all_reduce_mean(torch.tensor([r + 1.0]))
    out["objects"] = distributed.all_gather_object(("rank", r))
    out["broadcast"] = distributed.broadcast_object({"from": r}, src=1)
    out["sizes"] = distributed.gather_sizes(n)
    y = torch.full((2,), float(r), requires_grad=True)
    received = distributed.send_right_recv_left(y)
    (received * (r + 1)).sum().backward()
    out["received"] = received.detach()
    out["exchange_grad"] = y.grad.clone()
    distributed.barrier()
    try:  # chunked SigLIP cannot ring unequal chunks: every rank must get the same error
        SigLipLoss(gather="chunked")(torch.randn(n, 4), torch.randn(n, 4))
        out["chunked_error"] = None
    except ValueError as e:
        out["chunked_error"] = str(e)
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_collectives_on_three_ranks() -> None:
    res = run_distributed(_collectives, 3)
    w = 3
    rows = [
        torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 10 * r for r, n in enumerate(SIZES)
    ]
    full = torch.cat(rows)
    offsets = [0, 1, 3]
    # d/dx_r of sum_s (s+1) * sum_k (k+1) * g_k: rows k of rank r, summed over all ranks s
    factor = sum(s + 1 for s in range(w))
    for r, out in enumerate(res):
        assert (out["rank"], out["world_size"], out["local_rank"]) == (r, w, r)
        assert out["gathered"].equal(full) and out["no_grad"].equal(full)
        k = torch.arange(offsets[r], offsets[r] + SIZES[r], dtype=torch.float32) + 1
        assert out["gather_grad"].equal((factor * k)[:, None].expand(-1, 2))
        assert out["upstream"].eq(r + 1).all() and out["other_grad"].eq(r + 1).all()
        assert out["labels"][:, 0].tolist() == [0, 1, 1, 2, 2, 2]
        assert out["sum"].item() == 6.0 and out["mean"].item() == 2.0
        assert out["objects"] == [("rank", 0), ("rank", 1), ("rank", 2)]
        assert out["broadcast"] == {"from": 1}
        assert out["sizes"] == list(SIZES)
        # received from the left neighbour; the gradient of y comes back from the right one
        assert out["received"].tolist() == [float((r - 1) % w)] * 2
        assert out["exchange_grad"].tolist() == [float((r + 1) % w + 1)] * 2
        assert "chunked SigLIP needs equal local batch sizes, got [1, 2, 3]" == out["chunked_error"]


def _fails() -> None:
    if distributed.rank() == 1:
        raise RuntimeError("boom on rank 1")
    distributed.barrier()  # rank 0 would wait here forever for the dead rank 1


@pytest.mark.distributed
@pytest.mark.slow
def test_launcher_reports_child_errors_without_hanging() -> None:
    """A hang would end in run_distributed's TimeoutError, which this does not match."""
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_fails, 2, timeout=100.0)


def test_no_other_module_calls_torch_distributed() -> None:
    """DESIGN: mmssl/distributed.py is the only module that calls torch.distributed (the
    training entry point and the engine's launch check did; one place to change for another
    backend, one place to read for what a rank does)."""
    import re
    from pathlib import Path

    package = Path(distributed.__file__).parent
    uses = re.compile(r"\btorch\.distributed\b|\bfrom torch import distributed\b")
    found = [
        f"{path.relative_to(package)}:{i}"
        for path in sorted(package.rglob("*.py"))
        if path != Path(distributed.__file__)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if uses.search(line.split("#")[0])
    ]
    assert len(list(package.rglob("*.py"))) > 50  # the scan read the package
    assert not found, found
