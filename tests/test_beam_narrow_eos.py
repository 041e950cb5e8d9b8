"""Beam search narrower than the vocabulary, with eos likely at many steps, against a plain
written-out reference of Hugging Face's rule (`num_beams > 1, do_sample=False`).

The other beam tests use beams that keep every continuation, or one eos step: they cannot
tell which eos candidates become finished hypotheses, nor whether enough live beams remain
when several candidates of a step end in eos.  Here, each step:
- the candidates (beam, token) are ranked by summed log-probability;
- one ending in eos becomes a finished hypothesis only if it ranks among the `num_beams`
  best of the step (an eos at a lower rank is dropped, not kept);
- the live beams are the `num_beams` best candidates not ending in eos, however many eos
  candidates rank above them;
- a finished hypothesis that ties the worst kept one exactly does not replace it.
A dropped eos candidate is always beaten by a kept eos of the same step, so counting it
would change only when a row stops (the model calls), not the answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmssl.models.beam import beam_search

V, EOS = 6, 0


def logits_of(seq: tuple[int, ...]) -> torch.Tensor:
    """A fixed random "model": the logits (V,) after a sequence, a function of the whole
    sequence, with eos raised so that it ranks high at many steps."""
    seed = 0
    for t in seq:
        seed = (seed * 1000003 + t + 1) % (2**31 - 1)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g) * 1.5
    logits[EOS] += 1.0
    return logits


def batched(logits_fn):
    """beam_search's next-token function, (R, T) -> (R, V), from a function of one sequence."""
    return lambda text: torch.stack([logits_fn(tuple(row)) for row in text.tolist()])


def scripted(prompt_len: int, table: dict, default: dict):
    """A model given by next-token probabilities: table[generated tokens] -> {token: p}, else
    default; tokens not named get 1e-4."""

    def logits_fn(seq: tuple[int, ...]) -> torch.Tensor:
        probs = table.get(seq[prompt_len:], default)
        return torch.tensor([probs.get(t, 1e-4) for t in range(V)]).log()

    return logits_fn


def reference(logits_fn, prompt: list[int], steps: int, k: int, length_penalty: float) -> list[int]:
    """Hugging Face's beam search written out for one prompt (logits_fn: a sequence tuple ->
    logits (V,)), run to `steps` without early stopping (beam_search's documented stopping
    never changes the result).  Summed log-probs in fp32 as beam_search adds them; a
    hypothesis scores sum / generated_len ** length_penalty, eos included."""
    beams: list[tuple[tuple[int, ...], np.float32]] = [((), np.float32(0.0))]
    hyps: list[tuple[float, tuple[int, ...]]] = []
    for step in range(1, steps + 1):
        cands = []
        for gen, s in beams:
            logp = logits_fn(tuple(prompt) + gen).float().log_softmax(-1).numpy()
            cands += [(np.float32(s + logp[tok]), gen + (tok,)) for tok in range(len(logp))]
        cands.sort(key=lambda c: -c[0])
        beams = []
        for rank, (s, gen) in enumerate(cands):
            if gen[-1] == EOS:
                if rank < k:  # among the step's k best: finished; else dropped
                    hyps.append((float(s) / step**length_penalty, gen))
            elif len(beams) < k:
                beams.append((gen, s))
    hyps += [(float(s) / steps**length_penalty, gen) for gen, s in beams]
    best = max(hyps, key=lambda h: h[0])[1]
    return list(best) + [EOS] * (steps - len(best))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -1.0])
@pytest.mark.parametrize("num_beams", [2, 3])
def test_narrow_beams_with_eos_equal_the_hugging_face_rule(num_beams, length_penalty):
    """B rows at once, each its own prompt (so its own distributions), against the reference
    row by row."""
    steps, b = 5, 24
    prompt = torch.randint(1, V, (b, 2), generator=torch.Generator().manual_seed(num_beams))
    out = beam_search(
        batched(logits_of), lambda index: None, prompt, steps, num_beams, EOS, length_penalty
    )
    want = [reference(logits_of, p, steps, num_beams, length_penalty) for p in prompt.tolist()]
    assert out[:, 2:].tolist() == want


def test_two_eos_candidates_still_leave_two_live_beams():
    """num_beams=2, length_penalty=1.  Step 1: tokens 1 (.5) and 2 (.45).  Step 2: [2, eos]
    (ln .315) and [1, eos] (ln .3) rank first and second and finish (-0.58, -0.60); the live
    beams are the next two, [1, 3] (ln .2) and [2, 4] (ln .135).  [2, 4] goes on with 4 at
    probability ~1: [2, 4, 4, 4] scores ln .135 / 4 = -0.50 and wins.  Ranking only 3
    candidates (k + 1) would keep [1, 3] alone, and answer [2, eos, eos, eos]."""
    table = {
        (): {1: 0.5, 2: 0.45},
        (1,): {EOS: 0.6, 3: 0.4},
        (2,): {EOS: 0.7, 4: 0.3},
        (2, 4): {4: 1.0},
        (2, 4, 4): {4: 1.0},
    }
    model = scripted(1, table, {1: 0.3, 2: 0.26, 3: 0.24, 4: 0.2})
    prompt = torch.full((1, 1), 5)
    out = beam_search(batched(model), lambda index: None, prompt, 4, 2, EOS, 1.0)
    assert out[0, 1:].tolist() == [2, 4, 4, 4] == reference(model, [5], 4, 2, 1.0)


def test_a_tie_keeps_the_earlier_hypothesis():
    """An exact tie with the worst kept hypothesis does not replace it (`_keep`: ties, the
    earlier).  num_beams=2, length_penalty=1, ln(1/2) = L exactly in fp32:
    step 1: eos and token 1 both at L: [eos] finishes with score L / 1;
    step 2: after [1], eos and token 2 both at L: [1, eos] finishes with 2L / 2 = L, and the
    live beam [1, 2] ends at max_new_tokens=2 with 2L / 2 = L, a third exact tie, which must
    not displace either of the two kept."""

    def tie_logits(text: torch.Tensor) -> torch.Tensor:
        logits = torch.full((text.shape[0], 5), float("-inf"))
        for r, row in enumerate(text.tolist()):
            logits[r, [EOS, 1] if len(row) == 1 else [EOS, 2]] = 0.0
        return logits

    logp = tie_logits(torch.zeros(1, 1, dtype=torch.long)).log_softmax(-1)[0]
    half = float(logp[EOS])
    assert float(logp[1]) == half and float(torch.tensor(half) * 2) / 2 == half  # exact ties
    out = beam_search(tie_logits, lambda index: None, torch.full((1, 1), 3), 2, 2, EOS, 1.0)
    assert out[0, 1:].tolist() in ([EOS, EOS], [1, EOS]), out  # never the later [1, 2]


def test_an_eos_below_the_steps_best_does_not_stop_the_row():
    """A dropped eos candidate (ranked below the step's num_beams best) is no finished
    hypothesis, so it does not count towards the num_beams a row needs to stop.  An extra one
    never changes the answer (a better eos of the same step is kept), only when the row
    stops: this counts the model calls.  num_beams=2, length_penalty=-1.
    Step 2 ranks [1, eos] (ln .3), [1, 3] (ln .2), [2, eos] (ln .18), [2, 4] (ln .12): one
    finished hypothesis and live beams [1, 3], [2, 4].  Step 3: eos at .9 after both,
    [1, 3, eos] and [2, 4, eos] rank first and second; the row holds two hypotheses,
    [1, eos] (-1.20 * 2) and [1, 3, eos] ((-1.61 - 0.11) * 3), and its best live beam
    [1, 3, 1] can end no better than (-1.61 - 3.22) * 4: the row stops after 3 calls,
    answering [1, eos].  Counting [2, eos] as a hypothesis would stop it after 2."""
    table = {
        (): {1: 0.5, 2: 0.4},
        (1,): {EOS: 0.6, 3: 0.4},
        (2,): {EOS: 0.45, 4: 0.3, 3: 0.25},
    }
    model = batched(scripted(1, table, {EOS: 0.9, 1: 0.04, 2: 0.03, 3: 0.02, 4: 0.01}))
    calls = []

    def counted(text: torch.Tensor) -> torch.Tensor:
        calls.append(text.shape[1])
        return model(text)

    out = beam_search(counted, lambda index: None, torch.full((1, 1), 5), 5, 2, EOS, -1.0)
    assert out[0, 1:].tolist() == [1, EOS, EOS, EOS, EOS]
    assert len(calls) == 3, calls
