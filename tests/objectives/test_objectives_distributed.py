"""Data-parallel exactness of the contrastive and LM losses on real gloo processes.

Each case runs a replicated linear "encoder" followed by the loss module on every rank's
slice of a global batch, and compares with one process on the concatenated batch:

- the loss value on every rank equals the single-process loss;
- the gradient of every rank-local input equals world_size x the single-process gradient of
  that slice (DDP/DeepSpeed *average* over ranks, so this is what makes training exact);
- the rank-average of every replicated parameter's gradient (encoder weight, logit scale,
  bias) equals the single-process gradient.

Tolerance 1e-5 in fp32. Broken gathers (no all-reduce in backward, as in lightly's old
GatherLayer; local-only negatives) run through the same comparison and must fail it.
"""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_utils import run_distributed
from torch import Tensor, nn

from mmssl import distributed
from mmssl.objectives import (
    ClipLoss,
    NextTokenLoss,
    NTXentLoss,
    SigLipLoss,
    caption_keys,
    clip_loss,
    nt_xent_loss,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOL = 1e-5
DIM = 16
# (loss, gather, with positives keys, local batch sizes per rank)
Case = tuple[str, str, bool, tuple[int, ...]]

W2_CASES: list[Case] = [
    (loss, gather, keys, (4, 4))
    for loss, modes in [
        ("nt_xent", ("local_loss", "full")),
        ("clip", ("local_loss", "full")),
        ("siglip", ("chunked", "local_loss", "full")),
    ]
    for gather in modes
    for keys in (False, True)
] + [
    ("clip", "local_loss", True, (3, 5)),
    # `full` with uneven batches: its mean is over the whole batch, not rank count x this
    # rank's (a mutation audit's survivors of all three losses)
    ("nt_xent", "full", False, (5, 3)),
    ("clip", "full", True, (3, 5)),
    ("siglip", "full", True, (3, 5)),
    # the logit scale above its clamp, where the whole batch's gradient asks for a larger
    # scale (masked) but rank 0's share asks for a smaller one: masking per rank let that
    # share through (the averaged gradient was 0.0017 against 0)
    ("clip_over", "local_loss", False, (2, 2)),
    ("clip_over", "full", False, (2, 2)),
    ("nt_xent", "local_loss", False, (5, 3)),
    ("siglip", "local_loss", False, (3, 5)),
    ("next_token", "-", True, (3, 5)),
]
W3_CASES: list[Case] = [
    ("nt_xent", "full", True, (2, 3, 4)),
    ("siglip", "chunked", False, (3, 3, 3)),
    ("siglip", "chunked", True, (3, 3, 3)),
    ("clip", "local_loss", True, (2, 3, 4)),
]
# deliberately broken data parallelism: the comparison must reject these
BROKEN_CASES: list[tuple[str, Case]] = [
    ("no_allreduce", ("clip", "full", False, (4, 4))),
    ("no_allreduce", ("clip", "local_loss", True, (4, 4))),
    ("no_allreduce", ("nt_xent", "full", False, (4, 4))),
    ("no_allreduce", ("siglip", "local_loss", False, (4, 4))),
    ("local_only", ("clip", "local_loss", False, (4, 4))),
    ("local_only", ("nt_xent", "local_loss", False, (4, 4))),
]


def case_id(case: Case) -> str:
    loss, gather, keys, sizes = case
    return f"{loss}-{gather}-{'keys' if keys else 'nokeys'}-{'x'.join(map(str, sizes))}"


# ----------------------------------------------------------------------------- case setup


def make_inputs(case: Case) -> dict[str, Tensor]:
    """Global inputs of a case, identical in every process (seeded)."""
    loss, _, _, sizes = case
    n = sum(sizes)
    g = torch.Generator().manual_seed(1234 + n)
    if loss == "next_token":
        vocab, t = 11, 6
        tokens = torch.randint(0, vocab, (n, t), generator=g)
        lengths = torch.randint(2, t + 1, (n,), generator=g)
        lengths[: sizes[0]] = 2  # rank 0 holds far fewer target tokens than rank 1
        mask = torch.arange(t)[None, :] < lengths[:, None]
        return {"a": torch.randn(n, t, DIM, generator=g), "tokens": tokens, "mask": mask}
    if loss == "clip_over":  # the numerics tester's case: pairs close enough to ask for more
        g = torch.Generator().manual_seed(63)
        a = torch.randn(n, 3, dtype=torch.float64, generator=g)
        return {"a": a, "b": a + 0.05 * torch.randn(n, 3, dtype=torch.float64, generator=g)}
    labels = torch.randint(0, 3, (n,), generator=g)
    # caption ids that repeat across ranks, differing only under the padding mask
    text = torch.randint(0, 50, (n, 5), generator=g)
    text = text[labels]  # rows with the same label share their ids ...
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[:, 4] = False
    text[:, 4] = torch.randint(0, 50, (n,), generator=g)  # ... except under the mask
    keys = labels if loss != "clip" else caption_keys(text, mask)
    return {
        "a": torch.randn(n, DIM, generator=g),
        "b": torch.randn(n, DIM, generator=g),
        "keys": keys,
    }


def make_modules(case: Case) -> tuple[nn.Module, nn.Module]:
    """(replicated encoder, loss module), identically initialised in every process."""
    loss, gather, _, _ = case
    torch.manual_seed(0)
    encoder = nn.Linear(DIM, DIM if loss != "next_token" else 11)
    if loss == "nt_xent":
        module: nn.Module = NTXentLoss(temperature=0.2, gather=gather)
    elif loss == "clip":
        module = ClipLoss(init_logit_scale=math.log(5.0), gather=gather)
    elif loss == "clip_over":
        encoder = nn.Identity()  # float64 pairs as they are
        module = ClipLoss(init_logit_scale=math.log(200.0), gather=gather).double()
    elif loss == "siglip":
        # a milder bias than the paper's -10 keeps every gradient far from zero
        module = SigLipLoss(init_logit_scale=math.log(5.0), init_logit_bias=-2.0, gather=gather)
    else:
        module = NextTokenLoss()
    return encoder, module


def run_case(case: Case, lo: int, hi: int, mode: str = "ok") -> dict[str, Any]:
    """Loss and gradients on rows lo:hi of the case's global batch."""
    loss, _, use_keys, _ = case
    inputs = make_inputs(case)
    encoder, module = make_modules(case)
    a = inputs["a"][lo:hi].clone().requires_grad_(True)
    if loss == "next_token":
        value = module(encoder(a), inputs["tokens"][lo:hi], inputs["mask"][lo:hi])
        grads = {"a": a}
    else:
        b = inputs["b"][lo:hi].clone().requires_grad_(True)
        keys = inputs["keys"][lo:hi] if use_keys else None
        ea, eb = encoder(a), encoder(b)
        if mode == "local_only":  # solo-learn style: negatives from the local batch only
            value = (
                clip_loss(ea, eb, module.scale())
                if loss == "clip"
                else nt_xent_loss(ea, eb, module.temperature)
            )
        else:
            value = module(ea, eb, keys)
        grads = {"a": a, "b": b}
    value.backward()
    params = dict(encoder.named_parameters(prefix="encoder"))
    params.update(module.named_parameters(prefix="loss"))
    return {
        "loss": value.detach(),
        "grads": {k: t.grad.detach().clone() for k, t in grads.items()},
        "param_grads": {k: p.grad.detach().clone() for k, p in params.items()},
    }


# ----------------------------------------------------------------------------- broken gather


class _GatherNoAllReduce(torch.autograd.Function):
    """lightly's old GatherLayer: backward keeps the local slice without summing over ranks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        r = dist.get_rank()
        return grad[r * ctx.n : (r + 1) * ctx.n]


def _broken_gather(x: Tensor) -> Tensor:
    return _GatherNoAllReduce.apply(x)


# ----------------------------------------------------------------------------- processes


def _worker(cases: list[Case], broken: list[tuple[str, Case]]) -> dict[str, Any]:
    r = distributed.rank()
    out: dict[str, Any] = {}
    real_gather = dist.all_gather
    size_exchanges = []

    def spy(parts: list[Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.shape == (1,) and x.dtype == torch.long:  # `_gather_sizes`
            size_exchanges.append(x)
        return real_gather(parts, x, *args, **kwargs)

    for case in cases:
        sizes = case[3]
        out[case_id(case)] = run_case(case, sum(sizes[:r]), sum(sizes[: r + 1]))
        if len(set(sizes)) == 1:  # as the training loop runs them: no size exchange
            with distributed.equal_batches(), mock.patch.object(dist, "all_gather", spy):
                result = run_case(case, sum(sizes[:r]), sum(sizes[: r + 1]))
            result["size_exchanges"] = len(size_exchanges)
            out[f"equal:{case_id(case)}"] = result
    for mode, case in broken:
        sizes = case[3]
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        if mode == "no_allreduce":
            with mock.patch.object(distributed, "all_gather_with_grad", _broken_gather):
                out[f"{mode}:{case_id(case)}"] = run_case(case, lo, hi)
        else:
            out[f"{mode}:{case_id(case)}"] = run_case(case, lo, hi, mode)
    return out


def max_diffs(case: Case, per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """Max abs differences of the distributed results against one process on the whole batch."""
    sizes = case[3]
    world = len(sizes)
    ref = run_case(case, 0, sum(sizes))
    d_loss = max(abs(float(res["loss"] - ref["loss"])) for res in per_rank)
    d_input = 0.0
    for r, res in enumerate(per_rank):
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        for k, g in res["grads"].items():
            d_input = max(d_input, float((g - world * ref["grads"][k][lo:hi]).abs().max()))
    d_param = 0.0
    for k, g_ref in ref["param_grads"].items():
        mean = sum(res["param_grads"][k] for res in per_rank) / world
        d_param = max(d_param, float((mean - g_ref).abs().max()))
    return {"loss": d_loss, "input_grad": d_input, "param_grad": d_param}


@pytest.fixture(scope="module")
def results_w2() -> dict[str, list[dict[str, Any]]]:
    per_rank = run_distributed(_worker, 2, W2_CASES, BROKEN_CASES)
    return {k: [res[k] for res in per_rank] for k in per_rank[0]}


@pytest.fixture(scope="module")
def results_w3() -> dict[str, list[dict[str, Any]]]:
    per_rank = run_distributed(_worker, 3, W3_CASES, [])
    return {k: [res[k] for res in per_rank] for k in per_rank[0]}


@pytest.mark.parametrize("case", W2_CASES, ids=case_id)
def test_two_ranks_equal_single_process(case: Case, results_w2: dict[str, Any]) -> None:
    diffs = max_diffs(case, results_w2[case_id(case)])
    print(case_id(case), diffs)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("case", [c for c in W2_CASES if len(set(c[3])) == 1], ids=case_id)
def test_equal_batches_skip_the_size_exchange(case: Case, results_w2: dict[str, Any]) -> None:
    per_rank = results_w2[f"equal:{case_id(case)}"]
    assert [res.pop("size_exchanges") for res in per_rank] == [0, 0]
    diffs = max_diffs(case, per_rank)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("case", W3_CASES, ids=case_id)
def test_three_ranks_equal_single_process(case: Case, results_w3: dict[str, Any]) -> None:
    # with 3 ranks "send right, receive left" differs from the reverse ring, unlike with 2
    diffs = max_diffs(case, results_w3[case_id(case)])
    print(case_id(case), diffs)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize(
    "mode, case", BROKEN_CASES, ids=lambda x: x if isinstance(x, str) else case_id(x)
)
def test_broken_data_parallelism_is_caught(
    mode: str, case: Case, results_w2: dict[str, Any]
) -> None:
    diffs = max_diffs(case, results_w2[f"{mode}:{case_id(case)}"])
    print(mode, case_id(case), diffs)
    assert max(diffs.values()) > 1e-3, f"the comparison cannot see a broken gather: {diffs}"


def test_references_are_not_trivial() -> None:
    # a comparison is only meaningful if the gradients it compares are far from zero
    for case in W2_CASES + W3_CASES:
        ref = run_case(case, 0, sum(case[3]))
        for k, g in ref["grads"].items():
            assert g.abs().max() > 1e-3, (case_id(case), k)
        assert torch.isfinite(ref["loss"]) and not F.relu(-ref["loss"]) > 0
