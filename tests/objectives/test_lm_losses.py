"""Next-token and captioning losses against a naive loop over positions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mmssl.objectives import CaptioningLoss, NextTokenLoss, captioning_loss, next_token_loss


def naive_next_token(logits: Tensor, tokens: Tensor, mask: Tensor | None, ignore: int) -> Tensor:
    terms = []
    b, t, _ = logits.shape
    for i in range(b):
        for pos in range(t - 1):  # logits at pos predict the token at pos + 1
            target = int(tokens[i, pos + 1])
            if target == ignore or (mask is not None and not mask[i, pos + 1]):
                continue
            logp = logits[i, pos] - torch.logsumexp(logits[i, pos], dim=0)
            terms.append(-logp[target])
    return torch.stack(terms).mean()


def _batch(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [4], [2]])
    return logits, tokens, mask


@pytest.mark.parametrize("use_mask", [False, True])
def test_next_token_matches_naive_loop(use_mask: bool) -> None:
    logits, tokens, mask = _batch()
    tokens[0, 3] = -100  # an ignored target inside a row
    mask_arg = mask if use_mask else None
    got = next_token_loss(logits, tokens, mask_arg)
    torch.testing.assert_close(got, naive_next_token(logits, tokens, mask_arg, -100))
    got_cap = captioning_loss(logits, tokens, mask_arg)
    torch.testing.assert_close(got_cap, naive_next_token(logits, tokens, mask_arg, -100))


def test_custom_ignore_index_and_module() -> None:
    logits, tokens, mask = _batch(1)
    tokens[1, 2] = 0  # pad id used as ignore index
    ref = naive_next_token(logits, tokens, mask, 0)
    torch.testing.assert_close(next_token_loss(logits, tokens, mask, ignore_index=0), ref)
    torch.testing.assert_close(NextTokenLoss(ignore_index=0)(logits, tokens, mask), ref)
    torch.testing.assert_close(CaptioningLoss(ignore_index=0)(logits, tokens, mask), ref)


def test_gradient_only_reaches_counted_positions() -> None:
    logits, tokens, mask = _batch(2)
    logits.requires_grad_(True)
    next_token_loss(logits, tokens, mask).backward()
    counted = torch.zeros(3, 7, dtype=torch.bool)
    counted[:, :-1] = mask[:, 1:]
    assert (logits.grad.abs().sum(-1) > 0).equal(counted)


def test_uniform_logits_give_log_vocab() -> None:
    logits = torch.zeros(2, 5, 13)
    tokens = torch.randint(0, 13, (2, 5))
    assert next_token_loss(logits, tokens).item() == pytest.approx(math.log(13))


def test_label_smoothing_matches_torch_formula() -> None:
    logits, tokens, _ = _batch(3)
    got = next_token_loss(logits, tokens, label_smoothing=0.1)
    logp = logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    expected = (0.9 * nll - 0.1 * logp.mean(-1)).mean()
    torch.testing.assert_close(got, expected)


def test_no_counted_target_gives_zero() -> None:
    logits = torch.randn(2, 3, 5)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert next_token_loss(logits, torch.zeros(2, 3, dtype=torch.long), mask).item() == 0.0


def test_lm_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"expected logits \(B, T, V\)"):
        next_token_loss(torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask shape"):
        next_token_loss(
            torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3).bool()
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        NextTokenLoss(label_smoothing=1.0)


def test_next_token_sum_of_bf16_logits_sums_in_fp32() -> None:
    from mmssl.objectives.lm import next_token_sum

    torch.manual_seed(0)
    logits = (torch.randn(4, 256, 1000) * 3).bfloat16()
    tokens = torch.randint(0, 1000, (4, 256))
    got, _ = next_token_sum(logits, tokens)
    want, _ = next_token_sum(logits.float(), tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
