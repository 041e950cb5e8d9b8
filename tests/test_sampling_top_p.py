"""Nucleus (top-p) sampling against Hugging Face's logits processors on the same logits:
temperature, then top-k, then top-p (the order of their `generate`), the same tokens kept and
the same renormalised distribution; sampled frequencies follow it; bad values are refused."""

from __future__ import annotations

import pytest
import torch

from mmssl.models import TextConfig
from mmssl.models.config import BlockConfig
from mmssl.models.text import TextTransformer, nucleus, sample_tokens

transformers = pytest.importorskip("transformers")


def _hf_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float):
    """softmax of the logits after HF's temperature, top-k and top-p warpers, in that order."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores).softmax(dim=-1)


def _ours(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float):
    """sample_tokens' distribution: its tempered, top-k cut softmax through `nucleus`."""
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = nucleus((logits / temperature).softmax(dim=-1), top_p)
    return p / p.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, None), (1.5, 20)])
def test_the_nucleus_is_hugging_faces(top_p, temperature, top_k):
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * 3
    ours, theirs = (
        _ours(logits, temperature, top_k, top_p),
        _hf_probs(logits, temperature, top_k, top_p),
    )
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens kept, row by row
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    if top_p < 0.9:  # the cut does something
        assert (ours > 0).sum(dim=-1).float().mean() < 100


def test_a_tiny_top_p_keeps_the_most_likely_token_only():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    assert torch.equal(nucleus(logits.softmax(-1), 1e-9) > 0, torch.tensor([[0, 1, 0, 0]]).bool())


def test_sampled_frequencies_follow_the_nucleus():
    """sample_tokens with top_p draws from HF's distribution (20k draws, TV < 0.02); without
    the cut the dropped tokens carry 0.19 of the mass."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -0.5, -1.0])
    n = 20_000
    stub = lambda text: logits.expand(text.shape[0], -1)  # noqa: E731
    prompt = torch.zeros(n, 1, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    draws = sample_tokens(stub, prompt, 1, 0.8, 5, None, gen, top_p=0.75)[:, 1]
    freq = torch.bincount(draws, minlength=len(logits)) / n
    ref = _hf_probs(logits[None], 0.8, 5, 0.75)[0]
    assert 0.5 * float((freq - ref).abs().sum()) < 0.02, (freq.tolist(), ref.tolist())
    assert set(draws.unique().tolist()) == set(torch.nonzero(ref).flatten().tolist())


def _tiny() -> TextTransformer:
    torch.manual_seed(0)
    cfg = TextConfig(
        vocab_size=11, context_length=8, dim=16, depth=1, num_heads=2, block=BlockConfig()
    )
    return TextTransformer(cfg)


@pytest.mark.parametrize("top_p", [0, -0.1, 1.5, float("nan"), True, "0.9"])
def test_bad_top_p_is_refused(top_p):
    with pytest.raises(ValueError, match="top_p must be a number in"):
        _tiny().generate(torch.zeros(1, 2, dtype=torch.int64), 3, top_p=top_p)


def test_top_p_with_beams_is_refused():
    with pytest.raises(ValueError, match="top_p=0.9"):
        _tiny().generate(torch.zeros(1, 2, dtype=torch.int64), 3, num_beams=2, top_p=0.9)


def test_generate_samples_within_the_nucleus():
    """Through the model: every sampled token is in its step's nucleus (a top_p of 0.3 keeps
    1-2 of 11 ids here), checked against the model's own logits for the sequence so far."""
    model = _tiny().eval()
    prompt = torch.zeros(32, 1, dtype=torch.int64)
    out = model.generate(prompt, 5, generator=torch.Generator().manual_seed(1), top_p=0.3)
    with torch.no_grad():
        logits = model.head(model.forward_tokens(out[:, :-1]))  # (B, T - 1, V)
    for t in range(1, out.shape[1]):
        keep = _hf_probs(logits[:, t - 1], 1.0, None, 0.3) > 0
        assert keep.gather(1, out[:, t : t + 1]).all(), t


@pytest.mark.parametrize("name", ["test_tiny_coca", "test_tiny_coca_prefix"])
def test_a_top_p_below_every_top_token_samples_greedy_captions_and_text(name):
    """A nucleus of the single most likely token makes sampling greedy, through both
    generators (the caption decoder passed top_p on; a dropped argument would sample)."""
    from test_caption_generate import BOS, captioner

    model = captioner(name)
    imgs = torch.rand(3, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    g = torch.Generator().manual_seed(0)
    greedy = model.generate_captions(imgs, 6, bos_id=BOS, temperature=0)
    assert torch.equal(
        model.generate_captions(imgs, 6, bos_id=BOS, generator=g, top_p=1e-6), greedy
    )
    with pytest.raises(ValueError, match="top_p must be"):
        model.generate_captions(imgs, 6, bos_id=BOS, top_p=2.0)
    prompt = torch.tensor([[BOS, 4], [BOS, 7]])
    greedy = model.text.generate(prompt, 5, temperature=0)
    assert torch.equal(model.text.generate(prompt, 5, generator=g, top_p=1e-6), greedy)


def _hf_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # Hugging Face's TopPLogitsWarper on log-probabilities, written out
    sorted_p, idx = probs.sort(dim=-1, descending=False)
    cum = sorted_p.cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, idx, remove)
    return probs.masked_fill(remove, 0.0)


def test_mass_exactly_reaching_top_p_stops_the_nucleus():
    """Dyadic probabilities sum exactly: a token whose higher-ranked mass equals top_p is
    cut, as HF's rule (ascending cumsum <= 1 - top_p removed)."""
    probs = torch.tensor([[0.125, 0.5, 0.25, 0.125]])
    got = nucleus(probs, 0.5)
    assert got.tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert torch.equal(got, _hf_top_p(probs, 0.5))
    got = nucleus(probs, 0.75)
    assert got.tolist() == [[0.0, 0.5, 0.25, 0.0]]
    assert torch.equal(got, _hf_top_p(probs, 0.75))
