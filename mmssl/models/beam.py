"""Beam search, shared by `TextTransformer.generate` and `MultimodalModel.generate_captions`.

Deterministic (no sampling), as Hugging Face's `num_beams > 1, do_sample=False` and open_clip's
CoCa captions: each row keeps its `num_beams` best partial sequences by summed
log-probability.  A candidate ending in `eos_id` is set aside as a finished hypothesis (when it
ranks among the step's `num_beams` best candidates, as Hugging Face does) and scored
``sum_logprob / len ** length_penalty``, len counting the generated tokens, eos included.
When max_new_tokens is reached, the live beams are finished too (len = max_new_tokens), and
each row returns its best-scored hypothesis.

Stopping: a row stops early once it holds `num_beams` finished hypotheses and no live beam
could still beat the worst of them at any length up to max_new_tokens (log-probabilities only
lower a sum; the bound takes the most favourable length for the penalty's sign).  This is
Hugging Face's `early_stopping="never"` test with the exact length bound: stopping never
changes the result from running every row to max_new_tokens.  Once every row has stopped,
the model is not called again.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F


def check_beam(
    num_beams: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    length_penalty: float,
    top_p: float | None = None,
) -> None:
    """Refuse a beam count that is not an integer >= 1, and sampling options with beams."""
    # numpy's integers too, as max_new_tokens and top_k take them
    if isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    real = isinstance(length_penalty, numbers.Real) and not isinstance(length_penalty, bool)
    if not real or not math.isfinite(length_penalty):  # np.float32 was refused, True taken
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if num_beams == 1:
        if length_penalty != 1.0:
            raise ValueError(
                "length_penalty scores beam search hypotheses: it needs num_beams > 1 "
                f"(got length_penalty={length_penalty!r} with num_beams=1)"
            )
        return
    sampling = {
        "temperature": (temperature, temperature != 1.0),
        "top_k": (top_k, top_k is not None),
        "top_p": (top_p, top_p is not None),
        "generator": (generator, generator is not None),
    }
    given = [f"{name}={value!r}" for name, (value, set_) in sampling.items() if set_]
    if given:
        raise ValueError(
            f"num_beams={num_beams} is deterministic beam search (no sampling): leave "
            f"temperature, top_k, top_p and generator at their defaults, got {', '.join(given)}"
        )


def beam_search(
    next_logits: Callable[[torch.Tensor], torch.Tensor],
    reorder: Callable[[torch.Tensor], None],
    text: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    eos_id: int | None,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """text (B, T0) -> (B, T0 + max_new_tokens): each row's best hypothesis, eos-filled after
    its eos (as the greedy path fills a row that ended).

    next_logits: the sequences so far (R, T) -> logits (R, V) of the token after each; the
    first call has the B prompts, every later one B * num_beams rows, beam j of row b at
    b * num_beams + j.
    reorder: called with an index (R',) int64 before next_logits sees new rows: new row i
    continues old row index[i], so a caller keeping state per row (a kv cache, a mask, image
    tokens) takes `.index_select(0, index)` of it.  The first call expands B rows to
    B * num_beams; an index never crosses from one prompt's beams to another's.
    """
    prompt = text
    b, t0 = text.shape
    k = num_beams
    if max_new_tokens <= 0:
        return text
    if b == 0:  # no prompts: the (0, T0 + max_new_tokens) the greedy path gives
        return text.new_empty((0, t0 + max_new_tokens))
    scores = torch.zeros(b, 1, device=text.device)  # (B, live beams), summed log-probs
    # per row: (penalised score, generated tokens), the num_beams best, unsorted
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]
    done = [False] * b
    eos = None if eos_id is None else torch.tensor([eos_id], device=text.device)
    step = 0
    for step in range(1, max_new_tokens + 1):  # step: generated length after this token
        logp = next_logits(text).float().log_softmax(dim=-1)  # (B * kc, V)
        kc, v = scores.shape[1], logp.shape[-1]
        cand = (scores.unsqueeze(-1) + logp.view(b, kc, v)).view(b, kc * v)
        # 2k candidates: at most kc <= k of them end in eos, so k live ones remain
        top, idx = cand.topk(min(2 * k, kc * v), dim=1)
        top_h, idx_h = top.cpu(), idx.cpu()  # one sync per step
        parent = torch.zeros(b, k, dtype=torch.long)  # within the row's beams
        token = torch.full((b, k), 0 if eos_id is None else eos_id, dtype=torch.long)
        new_scores = torch.full((b, k), float("-inf"))  # a row short of beams pads with -inf
        for r in range(b):
            if done[r]:
                continue
            live = 0
            for rank in range(top_h.shape[1]):
                score = float(top_h[r, rank])
                if score == float("-inf"):
                    break
                p, tok = divmod(int(idx_h[r, rank]), v)
                if tok == eos_id:
                    if rank < k and eos is not None:
                        gen = torch.cat([text[r * kc + p, t0:], eos])
                        _keep(finished[r], score / step**length_penalty, gen, k)
                    continue
                parent[r, live], token[r, live], new_scores[r, live] = p, tok, score
                live += 1
                if live == k:
                    break
            if len(finished[r]) == k and step < max_new_tokens:
                # the best a live beam can still score: its sum only falls, at the length
                # the penalty favours most (the longest when length_penalty > 0)
                best = float(new_scores[r, 0])
                length = max_new_tokens if length_penalty > 0 else step + 1
                worst = min(s for s, _ in finished[r])
                done[r] = live == 0 or best / length**length_penalty <= worst
        rows = torch.arange(b).unsqueeze(1) * kc + parent  # (B, k) rows of `text`
        index = rows.flatten().to(text.device)
        text = torch.cat([text.index_select(0, index), token.flatten().to(text.device)[:, None]], 1)
        scores = new_scores.to(text.device)
        if all(done) or step == max_new_tokens:
            break
        reorder(index)
    live_scores = scores.cpu().tolist()  # the live beams end at max_new_tokens
    for r in range(b):
        for j, score in enumerate(live_scores[r]):
            if not done[r] and score > float("-inf"):
                _keep(finished[r], score / step**length_penalty, text[r * k + j, t0:], k)
    best_rows = []
    for r in range(b):
        gen = max(finished[r], key=lambda h: h[0])[1]
        if gen.shape[0] < max_new_tokens:  # ended by eos (so eos_id is set): fill with it
            gen = F.pad(gen, (0, max_new_tokens - gen.shape[0]), value=eos_id)  # type: ignore[arg-type]
        best_rows.append(gen)
    return torch.cat([prompt, torch.stack(best_rows)], dim=1)


def _keep(hyps: list[tuple[float, torch.Tensor]], score: float, gen: torch.Tensor, k: int) -> None:
    """Add a finished hypothesis to `hyps`, keeping the k best scores (ties: the earlier)."""
    if len(hyps) < k:
        hyps.append((score, gen))
        return
    worst = min(range(k), key=lambda i: hyps[i][0])
    if score > hyps[worst][0]:
        hyps[worst] = (score, gen)
