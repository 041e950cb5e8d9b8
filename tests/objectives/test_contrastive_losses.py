"""NT-Xent and CLIP against naive per-pair loops and analytic values (single process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.objectives import (
    ClipLoss,
    NTXentLoss,
    SigLipLoss,
    caption_keys,
    clip_loss,
    nt_xent_loss,
    positives_from_ids,
    positives_from_labels,
    siglip_loss,
)
from mmssl.objectives.contrastive import clamped_scale, row_groups, sorted_row_groups


@pytest.fixture(autouse=True)
def _float64():
    # naive loops vs vectorised code: compare at 1e-10, without leaking the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm()


def naive_nt_xent(z1: Tensor, z2: Tensor, tau: float, pos: Tensor | None) -> Tensor:
    """Loop over anchors and candidates; views indexed 0..2N-1, sample of view k is k % N."""
    n = z1.shape[0]
    views = [_unit(v) for v in list(z1) + list(z2)]
    total = torch.zeros(())
    for a in range(2 * n):
        denom = sum(torch.exp(views[a] @ views[k] / tau) for k in range(2 * n) if k != a)
        positives = [
            k
            for k in range(2 * n)
            if k != a and (k % n == a % n or (pos is not None and bool(pos[a % n, k % n])))
        ]
        terms = [torch.log(torch.exp(views[a] @ views[p] / tau) / denom) for p in positives]
        total = total - sum(terms) / len(terms)
    return total / (2 * n)


def naive_clip(img: Tensor, txt: Tensor, scale: float, pos: Tensor | None) -> Tensor:
    n = img.shape[0]
    x, y = [_unit(v) for v in img], [_unit(v) for v in txt]
    pos = torch.eye(n, dtype=torch.bool) if pos is None else pos
    total = torch.zeros(())
    for i in range(n):  # image -> text rows
        denom = sum(torch.exp(scale * x[i] @ y[j]) for j in range(n))
        ps = [j for j in range(n) if pos[i, j]]
        total = total - sum(torch.log(torch.exp(scale * x[i] @ y[j]) / denom) for j in ps) / len(ps)
    for j in range(n):  # text -> image rows
        denom = sum(torch.exp(scale * y[j] @ x[i]) for i in range(n))
        ps = [i for i in range(n) if pos[i, j]]
        total = total - sum(torch.log(torch.exp(scale * y[j] @ x[i]) / denom) for i in ps) / len(ps)
    return total / (2 * n)


def _grads(fn, *inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    value = fn(*leaves)
    return value.detach(), list(torch.autograd.grad(value, leaves))


def _close(a: tuple[Tensor, list[Tensor]], b: tuple[Tensor, list[Tensor]]) -> None:
    torch.testing.assert_close(a[0], b[0], atol=1e-10, rtol=1e-10)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-10)


LABELS = torch.tensor([0, 1, 0, 2, 1, 0])


@pytest.mark.parametrize("use_mask", [False, True])
def test_nt_xent_matches_naive_loop(use_mask: bool) -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    pos = positives_from_labels(LABELS) if use_mask else None
    got = _grads(lambda a, b: nt_xent_loss(a, b, 0.3, pos), z1, z2)
    ref = _grads(lambda a, b: naive_nt_xent(a, b, 0.3, pos), z1, z2)
    _close(got, ref)


@pytest.mark.parametrize("use_mask", [False, True])
def test_clip_matches_naive_loop(use_mask: bool) -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    pos = positives_from_labels(LABELS) if use_mask else None
    got = _grads(lambda a, b: clip_loss(a, b, 4.0, pos), img, txt)
    ref = _grads(lambda a, b: naive_clip(a, b, 4.0, pos), img, txt)
    _close(got, ref)


def test_clip_asymmetric_mask_uses_transpose_for_text_rows() -> None:
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 3] = True  # image 0 also matches text 3, not the other way round
    got = _grads(lambda a, b: clip_loss(a, b, 3.0, pos), img, txt)
    ref = _grads(lambda a, b: naive_clip(a, b, 3.0, pos), img, txt)
    _close(got, ref)


def test_identity_mask_equals_no_mask() -> None:
    z1, z2 = torch.randn(7, 3), torch.randn(7, 3)
    eye = torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.5, eye), nt_xent_loss(z1, z2, 0.5))
    torch.testing.assert_close(clip_loss(z1, z2, 2.0, eye), clip_loss(z1, z2, 2.0))


@pytest.mark.parametrize("mask", ["labels_off_diagonal", "none_positive"])
def test_mask_without_diagonal_still_pairs_each_row_with_its_own(mask: str) -> None:
    # as nt_xent_loss always did: the matching pair stays positive whatever the mask says
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    eye = torch.eye(6, dtype=torch.bool)
    pos = (
        positives_from_labels(LABELS) & ~eye
        if mask == "labels_off_diagonal"
        else torch.zeros_like(eye)
    )
    _close(
        _grads(lambda x, y: clip_loss(x, y, 4.0, pos), a, b),
        _grads(lambda x, y: naive_clip(x, y, 4.0, pos | eye), a, b),
    )
    _close(
        _grads(lambda x, y: nt_xent_loss(x, y, 0.3, pos), a, b),
        _grads(lambda x, y: naive_nt_xent(x, y, 0.3, pos), a, b),
    )


@pytest.mark.parametrize("loss", [nt_xent_loss, clip_loss, siglip_loss])
def test_empty_batch_is_an_error_not_nan(loss) -> None:
    empty = torch.randn(0, 4)
    args = {nt_xent_loss: (), clip_loss: (1.0,), siglip_loss: (1.0, 0.0)}[loss]
    with pytest.raises(ValueError, match="batch is empty"):
        loss(empty, empty, *args)


@pytest.mark.parametrize("module", [NTXentLoss, ClipLoss, SigLipLoss])
def test_empty_batch_is_an_error_in_the_modules_too(module) -> None:
    # the functions raised; the modules (what a training loop holds) returned NaN
    empty = torch.randn(0, 4)
    with pytest.raises(ValueError, match="batch is empty"):
        module()(empty, empty)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_nt_xent_identical_embeddings_is_log_2n_minus_1(n: int) -> None:
    z = torch.ones(n, 8)
    if n > 1:
        assert float(nt_xent_loss(z, z.clone(), 0.07)) == pytest.approx(math.log(2 * n - 1))
    # with every sample positive the uniform target equals the uniform prediction, same value
    every = torch.ones(n, n, dtype=torch.bool)
    assert float(nt_xent_loss(z, z, 0.07, every)) == pytest.approx(math.log(2 * n - 1), abs=1e-12)


def test_nt_xent_orthogonal_samples_identical_views() -> None:
    n, tau = 5, 0.2
    z = torch.eye(n) * 3.0  # unnormalised on purpose: the loss normalises
    # positive at 1/tau, self excluded, 2N-2 negatives at similarity 0
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / tau))
    assert float(nt_xent_loss(z, z, tau)) == pytest.approx(expected, rel=1e-12)


def test_clip_perfectly_separated() -> None:
    n, scale = 6, 1 / 0.07
    e = torch.eye(n)
    expected = math.log(1 + (n - 1) * math.exp(-scale))
    assert float(clip_loss(e, e, scale)) == pytest.approx(expected, rel=1e-9)
    assert ClipLoss()(e, e).item() == pytest.approx(expected, rel=1e-6)


def test_clip_repeated_caption_soft_targets_analytic() -> None:
    # samples 0 and 1 share a caption and an embedding: both are positives of each other
    n, s = 5, 4.0
    e = torch.eye(n)
    e[1] = e[0]
    ids = torch.tensor([[3, 4, 0], [3, 4, 9], [5, 0, 0], [6, 0, 0], [7, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    pos = positives_from_ids(ids, mask)
    assert pos[0, 1] and pos[1, 0] and pos.sum() == n + 2
    # rows 0, 1 (both directions): two positives at s, N-2 negatives at 0
    grouped = math.log(2 + (n - 2) * math.exp(-s))
    # the other rows: one positive at s, N-1 negatives at 0
    single = math.log(1 + (n - 1) * math.exp(-s))
    expected = (4 * grouped + 2 * (n - 2) * single) / (2 * n)
    assert float(clip_loss(e, e, s, pos)) == pytest.approx(expected, rel=1e-12)
    # the same through the module, with caption keys
    loss = ClipLoss(init_logit_scale=math.log(s))(e, e, caption_keys(ids, mask))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_modules_equal_functions_without_process_group() -> None:
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    pos = positives_from_labels(LABELS)
    for gather in ("local_loss", "full"):
        nt = NTXentLoss(temperature=0.3, gather=gather)
        torch.testing.assert_close(nt(z1, z2), nt_xent_loss(z1, z2, 0.3))
        torch.testing.assert_close(nt(z1, z2, LABELS), nt_xent_loss(z1, z2, 0.3, pos))
        cl = ClipLoss(gather=gather)
        torch.testing.assert_close(cl(z1, z2, LABELS), clip_loss(z1, z2, 1 / 0.07, pos))


def test_clip_logit_scale_init_and_clamp() -> None:
    loss = ClipLoss()
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    assert loss.scale().item() == 100.0
    e = torch.eye(3)
    torch.testing.assert_close(loss(e, e), clip_loss(e, e, 100.0))


@pytest.mark.parametrize("scale", [0.5, 20.0, 49.9])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clamped_scale_under_the_clamp_is_plain_autograd(scale: float, sign: float) -> None:
    """Under the clamp: the value and gradient of exp(x).clamp(max=) (the reference)."""
    x = torch.tensor(math.log(scale), requires_grad=True)
    ref = torch.tensor(math.log(scale), requires_grad=True)
    out, want = clamped_scale(x, 50.0), ref.exp().clamp(max=50.0)
    assert out.item() == want.item()
    (sign * 0.3 * out).backward()
    (sign * 0.3 * want).backward()
    assert x.grad is not None and ref.grad is not None
    assert x.grad.item() == ref.grad.item() != 0.0


def test_clamped_scale_above_the_clamp_passes_only_a_downward_gradient() -> None:
    """Above the clamp a descent step may lower x (grad > 0) but not raise it further."""
    for sign, want in ((1.0, 1.0 * 50.0), (-1.0, 0.0)):
        x = torch.tensor(math.log(60.0), requires_grad=True)
        out = clamped_scale(x, 50.0)
        assert out.item() == 50.0
        (sign * out).backward()
        assert x.grad is not None
        assert x.grad.item() == pytest.approx(want)


def test_clip_logit_scale_comes_back_under_the_clamp() -> None:
    """A scale that overshot the clamp recovers once the loss wants a softer temperature, as
    open_clip's clamp of the parameter after each step allows (a zero gradient above the
    clamp left it there for good)."""
    torch.manual_seed(0)
    loss = ClipLoss(init_logit_scale=math.log(6.0), max_logit_scale=5.0)
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    # unrelated pairs: the softer the logits, the lower the loss (d loss / d scale > 0)
    z1, z2 = torch.randn(32, 8), torch.randn(32, 8)
    for _ in range(20):
        opt.zero_grad()
        loss(z1, z2).backward()
        opt.step()
    assert loss.logit_scale.item() < math.log(5.0)


def test_inputs_are_normalised_inside() -> None:
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(nt_xent_loss(5 * z1, z2), nt_xent_loss(F.normalize(z1), z2))
    torch.testing.assert_close(clip_loss(z1, 7 * z2, 2.0), clip_loss(z1, z2, 2.0))


def test_positives_helpers() -> None:
    lab = torch.tensor([1, 2, 1])
    assert positives_from_labels(lab).tolist() == [
        [True, False, True],
        [False, True, False],
        [True, False, True],
    ]
    assert positives_from_labels(lab, torch.tensor([2, 1])).tolist() == [
        [False, True],
        [True, False],
        [False, True],
    ]
    ids = torch.tensor([[1, 2, 7], [1, 2, 8], [1, 3, 7]])
    assert positives_from_ids(ids).sum() == 3  # padding unknown: all rows differ
    for seed, (n, t) in enumerate([(1, 4), (64, 1), (64, 5), (200, 16)]):
        g = torch.Generator().manual_seed(seed)
        keys = torch.randint(-1, 3, (n // 4 + 1, t), generator=g)  # many repeated rows
        keys = keys[torch.randint(0, len(keys), (n,), generator=g)]
        want = torch.unique(keys, dim=0, return_inverse=True)[1]  # the host-synced reference
        if t > 1:  # the accelerator path, run here on the CPU
            assert torch.equal(sorted_row_groups(keys), want)
            assert torch.equal(sorted_row_groups(keys.float() / 3), want)
        got = row_groups(keys)
        assert torch.equal(got[:, None] == got[None, :], want[:, None] == want[None, :])
    floats = torch.tensor([0.2, 0.7, 0.2])  # float labels group by value, not truncated
    assert row_groups(floats).tolist() == [0.2, 0.7, 0.2]
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert positives_from_ids(ids, mask).tolist()[0] == [True, True, False]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: NTXentLoss(gather="everything"), "gather must be one of"),
        (lambda: ClipLoss(gather="chunked"), "gather must be one of"),
        (lambda: NTXentLoss(temperature=0.0), "temperature must be > 0"),
        (lambda: NTXentLoss(temperature=float("nan")), "temperature must be > 0"),
        # the function took them: 0 gave NaN, a negative temperature a loss of the wrong sign
        (
            lambda: nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), 0.0),
            "temperature must be > 0",
        ),
        (lambda: nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), -0.1), "temperature must be"),
        (lambda: nt_xent_loss(torch.randn(3, 4), torch.randn(4, 4)), r"must both be \(B, D\)"),
        (lambda: clip_loss(torch.randn(3), torch.randn(3), 1.0), r"must both be \(B, D\)"),
        (
            lambda: clip_loss(torch.randn(3, 2), torch.randn(3, 2), 1.0, torch.eye(4).bool()),
            "positives mask has shape",
        ),
        (
            lambda: ClipLoss()(torch.randn(3, 2), torch.randn(3, 2), torch.arange(4)),
            "positive_keys has 4 rows",
        ),
        (
            lambda: caption_keys(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4).bool()),
            "text_mask shape",
        ),
    ],
)
def test_bad_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_nt_xent_takes_an_integer_positives_mask_as_clip_loss_does() -> None:
    # a 0/1 integer mask failed in masked_fill_, where clip_loss and siglip_loss take it
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    mask = labels[:, None] == labels[None]
    expected = nt_xent_loss(z1, z2, 0.1, mask)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.1, mask.int()), expected)
