"""TextTransformer.generate: the kv cache against a full forward, eval mode, early stop at eos."""

from __future__ import annotations

import pytest
import torch

from mmssl.models import TextConfig
from mmssl.models.config import BlockConfig
from mmssl.models.text import TextTransformer
from mmssl.nn import KVCache
from mmssl.nn.attention import set_attention_kernel

CTX = 12


def tiny(pos_embed: str = "learned", causal: bool = True, drop_path: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TextConfig(
        vocab_size=64,
        context_length=CTX,
        dim=32,
        depth=2,
        num_heads=2,
        pos_embed=pos_embed,  # type: ignore[arg-type]
        causal=causal,
        tie_embeddings=False,  # a tied head mostly repeats the last token
        block=BlockConfig(norm_eps=1e-5, qk_norm=True, drop_path=drop_path),
    )
    model = TextTransformer(cfg)
    if model.pos_embed is not None:  # zeros at init: positions would not matter
        torch.nn.init.normal_(model.pos_embed, std=0.5)
    return model.eval()


def greedy_reference(model, prompt, max_new_tokens, eos_id=None):
    """The whole window rerun for every token, as generate ran before its kv cache."""
    text, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = model.logits(text[:, -CTX:])[:, -1].argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        text = torch.cat([text, nxt[:, None]], 1)
    return text


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_kv_cache_logits_equal_the_full_forward(pos_embed, kernel):
    model = tiny(pos_embed)
    set_attention_kernel(model, kernel)
    text = torch.randint(0, 64, (2, CTX))
    full = model.logits(text)  # (B, T, V)
    cache = KVCache(len(model.trunk.blocks), CTX)
    # a 5-token prompt, a 3-token chunk (bottom-right causal mask), then one token at a time
    step = lambda t: model.head(model.forward_tokens(t, kv_cache=cache))  # noqa: E731
    pieces = [step(text[:, :5]), step(text[:, 5:8])]
    pieces += [step(text[:, t : t + 1]) for t in range(8, CTX)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds context_length"):
        step(text[:, :1])


@pytest.mark.parametrize(
    "pos_embed, causal, prompt_len",
    [
        ("learned", True, 4),  # cached up to the context, then the window slides
        ("rope", True, 4),
        ("learned", True, CTX + 2),  # a prompt longer than the context
        ("learned", False, 4),  # bidirectional: rerun every token
    ],
)
def test_cached_greedy_generate_equals_rerunning_the_window(pos_embed, causal, prompt_len):
    model = tiny(pos_embed, causal)
    prompt = torch.randint(0, 64, (3, prompt_len), generator=torch.Generator().manual_seed(1))
    ref = greedy_reference(model, prompt, 20)
    assert torch.equal(model.generate(prompt, 20, temperature=0), ref)
    # eos: the token row 0 emits 3rd, so rows end at different steps (or never)
    eos = int(ref[0, prompt_len + 2])
    assert torch.equal(
        model.generate(prompt, 20, temperature=0, eos_id=eos),
        greedy_reference(model, prompt, 20, eos_id=eos),
    )


def test_generate_stops_running_the_model_once_every_row_emitted_eos():
    model = tiny()
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    free = greedy_reference(model, prompt, 20)[:, 4:]
    common = set(free[0].tolist()) & set(free[1].tolist())
    eos = min(common, key=lambda tok: max(int((row == tok).nonzero()[0]) for row in free))
    last_step = max(int((row == eos).nonzero()[0]) for row in free)
    assert last_step < 19  # else nothing to skip
    calls = []
    model.trunk.register_forward_hook(lambda *_: calls.append(1))
    out = model.generate(prompt, 20, temperature=0, eos_id=eos)
    assert len(calls) == last_step + 1
    assert out.shape == (2, 24)  # the documented shape, the tail filled with eos
    assert torch.equal(out, greedy_reference(model, prompt, 20, eos_id=eos))


def test_generate_runs_in_eval_mode_and_restores_each_modules_mode():
    model = tiny(drop_path=0.5)  # train-mode drop path would change every step's logits
    prompt = torch.randint(0, 64, (4, 4), generator=torch.Generator().manual_seed(1))
    ref = greedy_reference(model, prompt, 10)
    model.train()
    model.norm.eval()  # a module the caller froze stays frozen
    modes = {name: m.training for name, m in model.named_modules()}
    assert torch.equal(model.generate(prompt, 10, temperature=0), ref)
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("budget", [-2, 2.5, True, "3"])
def test_generate_refuses_a_token_budget_that_is_not_a_count(budget):
    # a negative budget returned the prompt unchanged, without an error
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        tiny().generate(torch.tensor([[1, 2]]), budget, temperature=0)


@pytest.mark.parametrize("eos_id", [64, -1, 1.5, True])
def test_generate_refuses_an_eos_id_that_is_no_token(eos_id):
    # taken without a word: no row ever stopped (64 is outside the tiny model's 64 ids)
    with pytest.raises(ValueError, match=r"eos_id must be a token id in \[0, 64\) or None"):
        tiny().generate(torch.tensor([[1, 2]]), 3, temperature=0, eos_id=eos_id)
    assert tiny().generate(torch.tensor([[1, 2]]), 3, temperature=0, eos_id=63).shape == (1, 5)


def test_generate_refuses_a_temperature_that_is_no_number():
    # a raw TypeError ("'>=' not supported between 'str' and 'int'") before
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got '1'"):
        tiny().generate(torch.tensor([[1, 2]]), 3, temperature="1")


@pytest.mark.parametrize("shape", [(3,), (2, 0)])
def test_generate_refuses_a_prompt_that_is_not_b_by_t0_tokens(shape):
    # an IndexError from deep inside the loop before
    with pytest.raises(ValueError, match=r"\(B, T0\) prompt with T0 >= 1"):
        tiny().generate(torch.ones(shape, dtype=torch.int64), 3, temperature=0)


def test_generate_takes_a_numpy_integer_budget():
    import numpy as np

    out = tiny().generate(torch.tensor([[1, 2]]), np.int64(3), temperature=0)
    assert out.shape == (1, 5)


def test_text_features_refuse_an_empty_sequence():
    with pytest.raises(ValueError, match=r"no tokens: shape \(2, 0\)"):
        tiny().forward_features(torch.zeros(2, 0, dtype=torch.int64))


def _top_k_refusals():
    import numpy as np

    return [2.5, 2.0, 0, -1, True, "2", np.float64(2.0), torch.tensor(2.0), torch.tensor(True)]


@pytest.mark.parametrize("top_k", _top_k_refusals(), ids=repr)
def test_generate_refuses_a_top_k_that_is_not_an_integer(top_k):
    # a float top_k passed the check and failed in torch.topk with a TypeError
    import mmssl

    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="top_k must be an integer >= 1 or None"):
        tiny().generate(prompt, 3, top_k=top_k)
    torch.manual_seed(0)
    coca = mmssl.create_model("test_tiny_coca")
    with pytest.raises(ValueError, match="top_k must be an integer >= 1 or None"):
        coca.generate_captions(torch.rand(1, 3, 32, 32), 3, bos_id=1, top_k=top_k)


def test_generate_takes_numpy_and_torch_integer_top_k():
    import numpy as np

    model, prompt = tiny(), torch.tensor([[1, 2], [3, 4]])

    def sample(top_k):
        return model.generate(prompt, 6, top_k=top_k, generator=torch.Generator().manual_seed(0))

    want = sample(2)
    for top_k in (np.int64(2), np.int32(2), torch.tensor(2)):
        assert torch.equal(sample(top_k), want), top_k


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_positive_temperature_samples_the_greedy_tokens(temperature):
    """logits / 1e-40 overflowed to inf (a NaN softmax, a RuntimeError in multinomial); in the
    limit sampling at temperature T -> 0 is greedy decoding."""
    model = tiny()
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(1))
    got = model.generate(prompt, 6, temperature=temperature, generator=torch.Generator())
    assert torch.equal(got, greedy_reference(model, prompt, 6))


@pytest.mark.parametrize("temperature", [1e30, 1e45, 1e300])
def test_top_k_keeps_filtering_at_a_huge_temperature(temperature):
    """The temperature scaled the logits before the k-th was taken: at 1e45 they rounded to
    one value in float32 and top_k=1 sampled any of the 64 ids; top_k=1 is greedy at any T,
    and top_k=4 samples only among each step's 4 most likely ids."""
    model = tiny()
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    got = model.generate(prompt, 6, temperature=temperature, top_k=1, generator=gen)
    assert torch.equal(got, greedy_reference(model, prompt, 6))
    out = model.generate(prompt, 6, temperature=temperature, top_k=4, generator=gen)
    with torch.no_grad():
        for t in range(4, 10):  # each sampled id among the 4 best logits after its prefix
            best4 = model.logits(out[:, :t][:, -CTX:])[:, -1].topk(4, dim=-1).indices
            assert (best4 == out[:, t : t + 1]).any(dim=1).all(), t


def test_generate_takes_a_numpy_integer_beam_count():
    import numpy as np

    model, prompt = tiny(), torch.tensor([[1, 2], [3, 4]])
    want = model.generate(prompt, 5, num_beams=3)
    assert torch.equal(model.generate(prompt, 5, num_beams=np.int64(3)), want)


def test_a_boolean_temperature_and_an_eos_cut_off_by_vocab_limit_are_refused():
    # temperature=True sampled at 1; an eos_id at or above vocab_limit was never generated,
    # so no row stopped and the budget always ran out
    model, prompt = tiny(), torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got True"):
        model.generate(prompt, 3, temperature=True)
    with pytest.raises(ValueError, match="eos_id 20 is not below vocab_limit 20"):
        model.generate(prompt, 3, eos_id=20, vocab_limit=20)
    assert model.generate(prompt, 3, eos_id=19, vocab_limit=20, temperature=0).shape == (1, 5)
