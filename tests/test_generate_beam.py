"""Beam search (`num_beams > 1`) in TextTransformer.generate and generate_captions, against
independent references over full forwards (no kv cache): every continuation enumerated on a
tiny vocabulary, and a plain beam search written out for longer runs; KVCache.reorder; the
refused option combinations."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_caption_generate import BOS, captioner, images
from test_text_generate import CTX, greedy_reference, tiny
from test_text_generate_padded import left_pad, prompts

from mmssl.nn import KVCache

V = 8  # the tiny vocabulary of the exhaustive references


def small_vocab(head: torch.nn.Linear, v: int = V) -> None:
    """Keep the first v rows of an untied LM head: the model then scores v tokens only."""
    head.weight = torch.nn.Parameter(head.weight[:v].detach().clone())


@torch.no_grad()
def exhaustive(logits_fn, prompt, steps, eos_id=None, length_penalty=1.0):
    """prompt (1, T0) -> the best continuation (steps,) and its score, every sequence scored
    by its summed log-probs from one full forward, cut at its first eos (the rest filled with
    eos), divided by its generated length (eos included) ** length_penalty."""
    v = logits_fn(prompt)[:, -1].shape[-1]
    seqs = torch.tensor(list(itertools.product(range(v), repeat=steps)))  # (v^steps, steps)
    text = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    t0 = prompt.shape[1]
    logp = logits_fn(text)[:, t0 - 1 : -1].float().log_softmax(-1)
    tok_logp = logp.gather(-1, seqs[..., None])[..., 0]  # (N, steps)
    length = torch.full((len(seqs),), steps)
    if eos_id is not None:
        is_eos = seqs == eos_id
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, steps)
        length = first
        after = torch.arange(steps)[None] >= first[:, None]
        tok_logp = tok_logp.masked_fill(after, 0.0)
        seqs = seqs.masked_fill(after, eos_id)
    score = tok_logp.sum(1) / length.float() ** length_penalty
    best = int(score.argmax())
    return seqs[best], float(score[best])


@torch.no_grad()
def seq_logprob(logits_fn, prompt, gen):
    """Summed log-probs of gen (B, n) after prompt (B, T0), from one full forward."""
    t0 = prompt.shape[1]
    logp = logits_fn(torch.cat([prompt, gen], 1))[:, t0 - 1 : -1].float().log_softmax(-1)
    return logp.gather(-1, gen[..., None])[..., 0].sum(1)


@torch.no_grad()
def beam_reference(logits_fn, prompt, steps, k):
    """Plain beam search without eos over full forwards: prompt (1, T0) -> (steps,)."""
    seqs, scores = prompt, torch.zeros(1)
    for _ in range(steps):
        logp = logits_fn(seqs)[:, -1].float().log_softmax(-1)  # (n, V)
        v = logp.shape[-1]
        top = (scores[:, None] + logp).flatten().topk(min(k, logp.numel()))
        seqs = torch.cat([seqs[top.indices // v], (top.indices % v)[:, None]], 1)
        scores = top.values
    return seqs[0, prompt.shape[1] :]


def text_fn(model):
    return lambda t: model.logits(t[:, -CTX:])


# ------------------------------------------------------------------ KVCache.reorder


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_kv_cache_reorder_equals_the_cache_of_the_reordered_rows(pos_embed):
    model = tiny(pos_embed)
    text = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([2, 0, 0, 1, 2])  # picks, repeats and expands rows
    depth = len(model.trunk.blocks)
    cache, ref = KVCache(depth, CTX), KVCache(depth, CTX)
    with torch.no_grad():
        model.forward_tokens(text, kv_cache=cache)
        cache.reorder(index)
        model.forward_tokens(text[index], kv_cache=ref)
        assert cache.length == ref.length == 6
        for a, b in zip(cache.layers, ref.layers):
            torch.testing.assert_close(a.k[:, :, :6], b.k[:, :, :6])
            torch.testing.assert_close(a.v[:, :, :6], b.v[:, :, :6])
        # and the next tokens run on from it as on the reordered rows' own cache
        nxt = torch.randint(0, 64, (5, 2), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(
            model.forward_tokens(nxt, kv_cache=cache), model.forward_tokens(nxt, kv_cache=ref)
        )
    empty = KVCache(depth, CTX)
    empty.reorder(index)  # nothing cached yet: nothing to do
    assert empty.length == 0


# ------------------------------------------------------------------ text generation


def test_one_beam_is_the_greedy_path():
    model = tiny()
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(1))
    ref = greedy_reference(model, prompt, 10)
    assert torch.equal(model.generate(prompt, 10, temperature=0, num_beams=1), ref)


def greedy_suboptimal_seed(steps=3):
    """A (seed, prompt) where greedy decoding of the V-token tiny model is not the best
    sequence: the case beam search is for."""
    for seed in range(50):
        model = tiny(seed=seed)
        small_vocab(model.lm_head)
        prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(seed))
        best, best_score = exhaustive(text_fn(model), prompt, steps)
        greedy = model.generate(prompt, steps, temperature=0)[:, 2:]
        if not torch.equal(greedy[0], best):
            return model, prompt, best, best_score
    raise AssertionError("no seed where greedy is not optimal")


def test_beam_beats_greedy_and_a_wide_beam_is_exact():
    model, prompt, best, best_score = greedy_suboptimal_seed()
    fn = text_fn(model)
    greedy = model.generate(prompt, 3, temperature=0)
    # V**2 beams keep every 2-token prefix: the 3rd step sees every sequence
    wide = model.generate(prompt, 3, num_beams=V**2)
    assert wide.shape == (1, 5) and torch.equal(wide[:, :2], prompt)
    assert torch.equal(wide[0, 2:], best)
    assert not torch.equal(wide, greedy)  # fails without beam search
    # without eos every sequence has 3 tokens: score = summed log-probs / 3
    assert float(seq_logprob(fn, prompt, wide[:, 2:])) == pytest.approx(3 * best_score, abs=1e-5)
    for k in (2, 3):
        beam = model.generate(prompt, 3, num_beams=k)
        assert torch.equal(beam[0, 2:], beam_reference(fn, prompt, 3, k))
        assert seq_logprob(fn, prompt, beam[:, 2:]) >= seq_logprob(fn, prompt, greedy[:, 2:])


@pytest.mark.parametrize(
    "pos_embed, causal, prompt_len",
    [
        ("learned", True, 4),  # kv cache expanded and reordered
        ("rope", True, 4),
        ("learned", True, 9),  # past the context: the window slides, rerun each token
        ("learned", False, 4),  # bidirectional: rerun each token
    ],
)
def test_beam_search_equals_a_plain_beam_search_over_full_forwards(pos_embed, causal, prompt_len):
    model = tiny(pos_embed, causal)
    prompt = torch.randint(0, 64, (3, prompt_len), generator=torch.Generator().manual_seed(1))
    fn = text_fn(model)
    out = model.generate(prompt, 7, num_beams=3)
    assert out.shape == (3, prompt_len + 7) and torch.equal(out[:, :prompt_len], prompt)
    for i in range(3):
        assert torch.equal(out[i, prompt_len:], beam_reference(fn, prompt[i : i + 1], 7, 3)), i
    greedy = model.generate(prompt, 7, temperature=0)
    new = slice(prompt_len, None)
    # per row the beam's sequence scores at least greedy's (the window's logits, as generated)
    if causal and prompt_len + 7 <= CTX:
        assert (
            seq_logprob(fn, prompt, out[:, new]) >= seq_logprob(fn, prompt, greedy[:, new]) - 1e-5
        ).all()


@pytest.mark.parametrize("pos_embed, causal", [("learned", True), ("rope", True), ("rope", False)])
def test_beam_search_with_left_padded_prompts_equals_each_row_alone(pos_embed, causal):
    model = tiny(pos_embed, causal)
    rows = prompts()
    text, mask = left_pad(rows)
    t0 = text.shape[1]
    out = model.generate(text, 6, num_beams=3, prompt_mask=mask)
    assert torch.equal(out[:, :t0], text)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], 6, num_beams=3)[0, len(r) :]
        assert torch.equal(out[i, t0:], alone), i
        assert torch.equal(alone, beam_reference(text_fn(model), r[None], 6, 3)), i


def eos_model(seed: int = 0):
    """The V-token tiny model with the eos row of its head scaled up: eos is likely, so
    finished hypotheses of every length compete."""
    model = tiny(seed=seed)
    small_vocab(model.lm_head)
    eos = V - 1
    with torch.no_grad():
        model.lm_head.weight[eos] *= 3
    return model, eos


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0, -1.0])
def test_eos_and_length_penalty_equal_the_exhaustive_best(length_penalty):
    model, eos = eos_model()
    fn = text_fn(model)
    prompt = torch.randint(0, V - 1, (3, 2), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 3, num_beams=V**2, eos_id=eos, length_penalty=length_penalty)
    for i in range(3):
        best, _ = exhaustive(fn, prompt[i : i + 1], 3, eos, length_penalty)
        assert torch.equal(out[i, 2:], best), (i, out[i], best)


def test_the_length_penalty_changes_the_answer_and_eos_fills_the_rest():
    model, eos = eos_model()
    prompt = torch.randint(0, V - 1, (3, 2), generator=torch.Generator().manual_seed(5))
    short = model.generate(prompt, 3, num_beams=V**2, eos_id=eos, length_penalty=0.0)
    long = model.generate(prompt, 3, num_beams=V**2, eos_id=eos, length_penalty=3.0)
    # the test means something: a sum favours ending early, a strong penalty going on
    assert not torch.equal(short, long)
    ended = (short[:, 2:] == eos).any(1)
    assert ended.any()
    for i in ended.nonzero().flatten().tolist():
        first = int((short[i, 2:] == eos).nonzero()[0])
        assert (short[i, 2 + first :] == eos).all()


def test_rows_that_finish_stop_the_model(monkeypatch):
    model, eos = eos_model()
    with torch.no_grad():
        model.lm_head.weight[eos] *= 10  # eos nearly certain at once
    calls = {"n": 0}
    run = model.forward_tokens

    def counted(*args, **kwargs):
        calls["n"] += 1
        return run(*args, **kwargs)

    monkeypatch.setattr(model, "forward_tokens", counted)
    prompt = torch.randint(0, V - 1, (2, 2), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 8, num_beams=2, eos_id=eos, length_penalty=0.0)
    assert out.shape == (2, 10)
    assert (out[:, 4:] == eos).all(), out  # ended within two tokens, then filled with eos
    # stopped once no live beam could beat the finished ones, well before 8 tokens
    assert calls["n"] <= 3, calls


def test_zero_new_tokens_and_narrower_than_the_beam():
    model = tiny()
    small_vocab(model.lm_head, 3)
    prompt = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(prompt, 0, num_beams=4), prompt)
    # 3 tokens, 20 beams: the first steps have fewer candidates than beams
    out = model.generate(prompt, 3, num_beams=20)
    for i in range(2):
        best, _ = exhaustive(text_fn(model), prompt[i : i + 1], 3)
        assert torch.equal(out[i, 2:], best)


# ------------------------------------------------------------------ captions

MODES = [
    ("test_tiny_coca", "learned"),
    ("test_tiny_coca", "rope"),
    ("test_tiny_coca_prefix", "learned"),
    ("test_tiny_coca_prefix", "rope"),
]


def caption_fn(model, image_tokens):
    def fn(text):
        tokens = image_tokens.expand(text.shape[0], -1, -1)
        return model.caption_logits(tokens, text)

    return fn


@pytest.mark.parametrize("name, pos_embed", MODES)
def test_caption_beam_search_equals_the_references(name, pos_embed):
    model = captioner(name, pos_embed)
    imgs = images()
    with torch.no_grad():
        tokens = model.forward_features(imgs)["tokens"]
    greedy = model.generate_captions(imgs, 6, bos_id=BOS, temperature=0)
    assert torch.equal(
        model.generate_captions(imgs, 6, bos_id=BOS, num_beams=1, temperature=0), greedy
    )
    out = model.generate_captions(imgs, 6, bos_id=BOS, num_beams=3)
    assert out.shape == (3, 7)
    # the images' captions differ: cached image keys/values given to the wrong rows would show
    assert not (out == out[:1]).all(1)[1:].any()
    bos = torch.full((1, 1), BOS)
    for i in range(3):
        fn = caption_fn(model, tokens[i : i + 1])
        assert torch.equal(out[i, 1:], beam_reference(fn, bos, 6, 3)), i
        assert (
            seq_logprob(fn, bos, out[i : i + 1, 1:])
            >= seq_logprob(fn, bos, greedy[i : i + 1, 1:]) - 1e-5
        )
    # exhaustive on a V-token head: V**2 beams are exact for 3 tokens, with an eos too
    small_vocab(model.text.lm_head)
    for eos, penalty in [(None, 1.0), (V - 1, 0.0), (V - 1, 2.0)]:
        out = model.generate_captions(
            imgs, 3, bos_id=BOS, num_beams=V**2, eos_id=eos, length_penalty=penalty
        )
        for i in range(3):
            best, _ = exhaustive(caption_fn(model, tokens[i : i + 1]), bos, 3, eos, penalty)
            assert torch.equal(out[i, 1:], best), (i, eos, penalty)


def test_some_caption_beam_beats_greedy():
    """The comparison means something: on this model beam search and greedy differ."""
    model = captioner("test_tiny_coca")
    imgs = images()
    greedy = model.generate_captions(imgs, 8, bos_id=BOS, temperature=0)
    beam = model.generate_captions(imgs, 8, bos_id=BOS, num_beams=4)
    assert not torch.equal(beam, greedy)


# ------------------------------------------------------------------ refusals


def test_refused_combinations():
    model = tiny()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    cases = [
        (dict(num_beams=2, temperature=0.0), "temperature=0.0"),
        (dict(num_beams=2, temperature=0.7), "no sampling"),
        (dict(num_beams=2, top_k=5), "top_k=5"),
        (dict(num_beams=2, generator=torch.Generator()), "generator"),
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(num_beams=True), "num_beams must be an integer >= 1"),
        (dict(num_beams=2.0), "num_beams must be an integer >= 1"),
        (dict(length_penalty=2.0), "needs num_beams > 1"),
        (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite"),
        (dict(num_beams=2, length_penalty=True), "length_penalty must be a finite"),
    ]
    cap = captioner("test_tiny_coca")
    imgs = images(1)
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, 3, **kwargs)
        with pytest.raises(ValueError, match=match):
            cap.generate_captions(imgs, 3, bos_id=BOS, **kwargs)


def test_a_numpy_length_penalty_is_a_number() -> None:
    """np.float32(2.0) was refused as "not a finite number" while np.float64 passed."""
    import numpy as np

    model, prompt = tiny(), torch.zeros(1, 2, dtype=torch.long)
    want = model.generate(prompt, 3, num_beams=2, length_penalty=2.0)
    assert torch.equal(model.generate(prompt, 3, num_beams=2, length_penalty=np.float32(2.0)), want)


@pytest.mark.parametrize("eos_id", [None, 5])
def test_an_empty_batch_gives_the_shape_greedy_gives(eos_id):
    # greedy and sampling return (0, T0 + max_new_tokens) for no prompts: beams must too
    import mmssl

    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_gpt")
    prompt = torch.zeros(0, 3, dtype=torch.long)
    mask = torch.ones(0, 3, dtype=torch.bool)
    for kw in ({}, {"prompt_mask": mask}):
        greedy = model.text.generate(prompt, 4, temperature=0, eos_id=eos_id, **kw)
        beams = model.text.generate(prompt, 4, eos_id=eos_id, num_beams=2, **kw)
        assert greedy.shape == beams.shape == (0, 7) and beams.dtype == greedy.dtype
    assert model.text.generate(prompt, 0, num_beams=2).shape == (0, 3)
    coca = captioner("test_tiny_coca")
    imgs = torch.rand(0, 3, 32, 32)
    greedy = coca.generate_captions(imgs, 5, bos_id=BOS, temperature=0, eos_id=eos_id)
    beams = coca.generate_captions(imgs, 5, bos_id=BOS, eos_id=eos_id, num_beams=2)
    assert greedy.shape == beams.shape == (0, 6) and beams.dtype == greedy.dtype


def _scripted(table, vocab: int):  # type: ignore[no-untyped-def]
    """A beam_search next-token function whose distribution depends only on the step:
    table(generated so far) -> probabilities over the vocabulary (a one-token prompt)."""
    import math

    def next_logits(text: torch.Tensor) -> torch.Tensor:
        probs = table(text.shape[1] - 1)
        return torch.tensor([math.log(p) for p in probs]).expand(text.shape[0], vocab).clone()

    return next_logits


def test_early_stopping_does_not_change_the_result() -> None:
    """A finished row stops only when no live beam can beat it: the bound on a live beam
    takes the length the penalty favours most (max_new_tokens for length_penalty > 0), not
    the next step's.  At step 2 both eos candidates finish with (ln .5 + ln .37) / 2 = -0.85;
    the live beam (ln .5 + ln .12 = -2.81) goes on with probability ~1 to 4 tokens,
    -2.81 / 4 = -0.70, and must win."""
    from mmssl.models.beam import beam_search

    vocab, eos = 13, 12

    def probs(d: dict[int, float]) -> list[float]:
        return [d.get(i, 1e-6) for i in range(vocab)]

    def table(gen: int) -> list[float]:
        if gen == 0:
            return probs({0: 0.5, 1: 0.5})
        if gen == 1:
            return probs({eos: 0.37, 0: 0.12, **{i: 0.051 for i in range(2, 12)}})
        return probs({0: 1.0})

    prompt = torch.zeros(1, 1, dtype=torch.long)
    out = beam_search(_scripted(table, vocab), lambda i: None, prompt, 4, 2, eos, 1.0)
    assert eos not in out[0].tolist(), out
    assert out[0, 2:].tolist() == [0, 0, 0]
