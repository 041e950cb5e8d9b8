"""Parsing of the fault-injection spec (`MMSSL_FAULTS`, mmssl/train/faults.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mmssl.train.faults import Faults


def test_rank_limited_fault_applies_to_that_rank_only() -> None:
    spec = "nan_loss@5:r1,inf_grad@2-3"
    assert Faults(spec, rank=0).loss == {2: "inf_grad", 3: "inf_grad"}
    assert Faults(spec, rank=1).loss == {5: "nan_loss", 2: "inf_grad", 3: "inf_grad"}
    loss = torch.tensor(1.0)
    assert math.isnan(Faults(spec, rank=1).poison(loss, 5).item())
    assert Faults(spec, rank=0).poison(loss, 5) is loss


@pytest.mark.parametrize(
    "item", ["nan_loss@5:r", "nan_loss@5:r-1", "nan_loss@5:rx", "inf_grad@5:r 1", "nan_loss@5-3"]
)
@pytest.mark.parametrize("rank", [0, 1])
def test_malformed_spec_is_an_error_naming_it(item: str, rank: int) -> None:
    """A malformed rank (or range) is refused on every rank, not read as 'every rank'."""
    with pytest.raises(ValueError, match=f"MMSSL_FAULTS: cannot read '{item}'"):
        Faults(f"pause@step_end:3,{item}", rank=rank)


def test_malformed_steps_fail_on_every_rank() -> None:
    """The steps of a fault limited to another rank are still read."""
    with pytest.raises(ValueError, match="cannot read 'nan_loss@x:r1'"):
        Faults("nan_loss@x:r1", rank=0)
