"""Sampling against analytic references: the temperature-scaled softmax (with and without
top_k), the greedy limit of a tiny temperature, and vocab_limit's cut against a naive loop."""

from __future__ import annotations

import pytest
import torch

from mmssl.models import TextConfig
from mmssl.models.config import BlockConfig
from mmssl.models.text import TextTransformer, sample_tokens

# one fixed next-token distribution: every row of a batch samples from it independently
LOGITS = torch.tensor([2.5, 1.0, 0.0, -1.0, 0.5])
N = 20_000  # rows, one draw each: the frequencies are ~0.003 off in TV (< 0.01 over 40 seeds)
TV_MAX = 0.02  # a wrong temperature law is off by 0.06..0.25 in TV for these logits


def _draw(logits: torch.Tensor, n: int, temperature: float, top_k: int | None, seed: int = 0):
    """n independent draws of sample_tokens' first token from the fixed `logits` (V,)."""
    stub = lambda text: logits.expand(text.shape[0], -1)  # noqa: E731
    prompt = torch.zeros(n, 1, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    return sample_tokens(stub, prompt, 1, temperature, top_k, None, gen)[:, 1]


def _reference(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """softmax(logits / T), renormalised over the top_k largest logits when top_k is set."""
    p = torch.exp((logits - logits.max()) / temperature)
    if top_k is not None:
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:top_k]] = True
        p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum()


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_frequencies_equal_the_tempered_softmax(temperature, top_k):
    """The temperature divides the logits: logits / sqrt(T) or logits / max(T, 1) (no
    sharpening below 1) sampled from another distribution and no test compared the
    frequencies with softmax(logits / T); with top_k the softmax is over the k best only."""
    draws = _draw(LOGITS, N, temperature, top_k)
    freq = torch.bincount(draws, minlength=len(LOGITS)) / N
    ref = _reference(LOGITS, temperature, top_k)
    tv = 0.5 * float((freq - ref).abs().sum())
    assert tv < TV_MAX, (temperature, top_k, freq.tolist(), ref.tolist())
    if top_k is not None:  # only the two best ids, 2.5 and 1.0
        assert set(draws.unique().tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [1e-38, 1e-37])
def test_a_temperature_just_above_the_greedy_cutoff_is_greedy(temperature):
    """Just above the greedy cutoff (~2.9e-39) sampling still runs: a logit of 50 times
    1 / 1e-37 is inf in float32 unless the max is taken out first (inf - inf is a NaN
    softmax, an error in multinomial), and -50 times it is -inf for every id of a row.
    Each row is then its argmax, as sampling tends to as T -> 0."""
    logits = torch.tensor(
        [
            [50.0, 10.0, 49.0, -3.0, 0.0],
            [-50.0, -60.0, -51.0, -55.0, -49.5],
            [0.1, 0.3, 0.2, -0.1, 0.0],
            [-20.0, 40.0, 39.0, 41.0, 0.0],
        ]
    )
    stub = lambda text: logits  # noqa: E731
    prompt = torch.zeros(4, 1, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    got = sample_tokens(stub, prompt, 3, temperature, None, None, gen)
    assert got[:, 1:].tolist() == [[0] * 3, [4] * 3, [1] * 3, [3] * 3]
    assert torch.equal(got[:, 1], logits.argmax(-1))
    got = sample_tokens(stub, prompt, 3, temperature, 2, None, gen)  # and with a top_k
    assert torch.equal(got[:, 1], logits.argmax(-1))


def _tiny_lm() -> TextTransformer:
    torch.manual_seed(0)
    cfg = TextConfig(
        vocab_size=64,
        context_length=12,
        dim=32,
        depth=2,
        num_heads=2,
        tie_embeddings=False,
        block=BlockConfig(norm_eps=1e-5, qk_norm=True),
    )
    model = TextTransformer(cfg)
    torch.nn.init.normal_(model.pos_embed, std=0.5)
    return model.eval()


def test_greedy_with_a_vocab_limit_equals_the_argmax_over_the_first_ids():
    """vocab_limit keeps ids 0..limit-1: a cut one id short (logits[:, :limit - 1]) never
    generated id limit - 1, and no test made that id the best one.  Every 3rd limit 1..64 is
    checked against a naive loop (full forward, argmax over logits[:, :limit]); for many
    limits some row's greedy path takes the limit's last id, as asserted."""
    model = _tiny_lm()
    prompt = torch.randint(0, 64, (6, 4), generator=torch.Generator().manual_seed(1))
    last_id_taken = 0
    with torch.no_grad():
        for limit in range(1, 65, 3):  # 1, 4, .., 64
            want = prompt
            for _ in range(3):
                nxt = model.logits(want)[:, -1, :limit].argmax(-1, keepdim=True)
                want = torch.cat([want, nxt], dim=1)
            got = model.generate(prompt, 3, temperature=0, vocab_limit=limit)
            assert torch.equal(got, want), limit
            last_id_taken += int((want[:, 4:] == limit - 1).any())
    assert last_id_taken >= 8  # the test's power: limit - 1 is often the argmax
