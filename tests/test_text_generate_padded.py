"""TextTransformer.generate(prompt_mask=): a batch of left-padded prompts of different lengths
generates, row by row, what each prompt generates alone (greedy), and the batched forward's
logits at each row's real positions are those of the row run alone."""

from __future__ import annotations

import pytest
import torch
from test_text_generate import CTX, tiny  # the same tiny text towers as the unpadded tests

from mmssl.models import create_model
from mmssl.nn import KVCache, RotaryEmbedding, apply_rotary
from mmssl.nn.attention import set_attention_kernel

LENGTHS = (1, 4, 7)
PAD_ID = 0


def prompts(lengths=LENGTHS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in lengths]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    t0 = max(len(r) for r in rows)
    text = torch.full((len(rows), t0), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), t0, dtype=torch.bool)
    for i, r in enumerate(rows):
        text[i, t0 - len(r) :] = r
        mask[i, t0 - len(r) :] = True
    return text, mask


CASES = [
    ("learned", True),
    ("rope", True),
    ("learned", False),  # bidirectional: reruns the window every token
    ("rope", False),
]


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("pos_embed, causal", CASES)
def test_left_padded_logits_equal_each_row_alone(pos_embed, causal, kernel):
    model = tiny(pos_embed, causal)
    set_attention_kernel(model, kernel)
    rows = prompts()
    text, mask = left_pad(rows)
    batched = model.logits(text, token_mask=mask)
    assert torch.isfinite(batched).all()  # padded positions too: their values are read as 0
    unmasked = model.logits(text)
    for i, r in enumerate(rows):
        alone = model.logits(r[None])[0]
        torch.testing.assert_close(batched[i, mask[i]], alone, atol=1e-5, rtol=1e-5)
        if len(r) < text.shape[1]:  # without the mask a padded row is something else
            assert not torch.allclose(unmasked[i, mask[i]], alone, atol=1e-3)


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_left_padded_kv_cache_equals_the_full_masked_forward(pos_embed):
    model = tiny(pos_embed)
    rows = prompts((2, 5, 9), seed=2)
    text, mask = left_pad(rows)
    extra = torch.randint(
        1, 64, (3, CTX - text.shape[1]), generator=torch.Generator().manual_seed(3)
    )
    text = torch.cat([text, extra], 1)
    mask = torch.cat([mask, torch.ones_like(extra, dtype=torch.bool)], 1)
    full = model.logits(text, token_mask=mask)
    cache = KVCache(len(model.trunk.blocks), CTX)
    t0 = len(rows[-1])

    def step(a: int, b: int) -> torch.Tensor:
        return model.head(
            model.forward_tokens(text[:, a:b], kv_cache=cache, token_mask=mask[:, :b])
        )

    pieces = [step(0, t0), step(t0, t0 + 2)] + [step(t, t + 1) for t in range(t0 + 2, CTX)]
    real = mask[:, :, None].expand_as(full)
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-5, rtol=1e-5)


def generate_alone(model, rows, max_new_tokens, eos_id=None) -> list[torch.Tensor]:
    return [
        model.generate(r[None], max_new_tokens, temperature=0, eos_id=eos_id)[0, len(r) :]
        for r in rows
    ]


@pytest.mark.parametrize("max_new_tokens", [5, 14])  # within the context; then it slides
@pytest.mark.parametrize("pos_embed, causal", CASES)
def test_left_padded_greedy_generate_equals_each_row_alone(pos_embed, causal, max_new_tokens):
    model = tiny(pos_embed, causal)
    rows = prompts()
    text, mask = left_pad(rows)
    t0 = text.shape[1]
    out = model.generate(text, max_new_tokens, temperature=0, prompt_mask=mask)
    assert out.shape == (3, t0 + max_new_tokens)
    assert torch.equal(out[:, :t0], text)  # the left padding stays in place
    alone = generate_alone(model, rows, max_new_tokens)
    for i in range(3):
        assert torch.equal(out[i, t0:], alone[i]), i
    # the test means something: without the mask the padded rows generate other tokens
    unmasked = model.generate(text, max_new_tokens, temperature=0)
    assert not all(torch.equal(unmasked[i, t0:], alone[i]) for i in range(2))


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_left_padded_generate_with_eos_equals_each_row_alone(pos_embed):
    model = tiny(pos_embed)
    rows = prompts()
    text, mask = left_pad(rows)
    t0 = text.shape[1]
    free = generate_alone(model, rows, 10)
    eos = int(free[1][2])  # the token row 1 emits 3rd: rows end at different steps (or never)
    out = model.generate(text, 10, temperature=0, eos_id=eos, prompt_mask=mask)
    alone = generate_alone(model, rows, 10, eos_id=eos)
    assert int(out[1, t0 + 2]) == eos and (out[1, t0 + 2 :] == eos).all()
    for i in range(3):
        assert torch.equal(out[i, t0:], alone[i]), i


@pytest.mark.parametrize("pos_embed, causal", CASES)
def test_an_all_true_prompt_mask_changes_nothing(pos_embed, causal):
    model = tiny(pos_embed, causal)
    text = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    ref = model.generate(text, 10, temperature=0)
    mask = torch.ones_like(text, dtype=torch.bool)
    assert torch.equal(model.generate(text, 10, temperature=0, prompt_mask=mask), ref)
    torch.testing.assert_close(model.logits(text, token_mask=mask), model.logits(text))


def test_per_row_rope_is_the_1d_rope_of_each_row():
    rope = RotaryEmbedding(8)
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    cos, sin = rope(pos)
    assert cos.shape == (2, 5, 8)
    x = torch.randn(2, 3, 5, 8)
    rotated = apply_rotary(x, (cos, sin))
    for b in range(2):
        cb, sb = rope(pos[b])
        assert torch.equal(cos[b], cb) and torch.equal(sin[b], sb)
        assert torch.equal(rotated[b : b + 1], apply_rotary(x[b : b + 1], (cb, sb)))


def test_bad_prompt_masks_are_refused():
    model = tiny()
    text, mask = left_pad(prompts())
    cases = [
        (text, mask.long(), "bool"),
        (text, mask.tolist(), "bool"),
        (text, mask[:, 1:], "shape"),
        (text, mask[:2], "shape"),
        (text, mask.flip(1), "not left-padded"),  # right padding
        (text[:, :3], torch.tensor([[True, False, True]] * 3), "not left-padded"),
        (text, torch.cat([torch.zeros(1, 7, dtype=torch.bool), mask[1:]]), "no real token"),
        (text[:, :0], mask[:, :0], "T0 >= 1"),  # an empty prompt, refused before its mask
    ]
    for t, bad, match in cases:
        with pytest.raises(ValueError, match=match):
            model.generate(t, 3, temperature=0, prompt_mask=bad)
    with pytest.raises(ValueError, match="token_mask"):
        model.forward_tokens(text, text_mask=mask, token_mask=mask)
    with pytest.raises(ValueError, match="token_mask must be"):
        model.forward_tokens(text, token_mask=mask[:, 1:])


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_registry_tiny_gpt_batches_left_padded_prompts(pos_embed):
    torch.manual_seed(0)
    model = create_model("test_tiny_gpt", text={"pos_embed": pos_embed}).text
    assert model is not None
    if model.pos_embed is not None:  # zeros at init: positions would not matter
        torch.nn.init.normal_(model.pos_embed, std=0.5)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 512, (n,), generator=g) for n in LENGTHS]
    text, mask = left_pad(rows)
    out = model.generate(text, 6, temperature=0, prompt_mask=mask)
    alone = generate_alone(model, rows, 6)
    for i in range(3):
        assert torch.equal(out[i, text.shape[1] :], alone[i]), i
    batched = model.logits(text, token_mask=mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(
            batched[i, mask[i]], model.logits(r[None])[0], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("pad", [-1, -100, 64])  # 64 = vocab_size: no embedding row
def test_any_pad_id_may_fill_the_prompt_masks_padding(pad):
    """The pad ids are never read, as generate's docstring says: -1, -100 or vocab_size were
    looked up in the embedding (IndexError), greedy and beam alike."""
    model = tiny()
    rows = prompts()
    text, mask = left_pad(rows)
    want = model.generate(text, 5, temperature=0, prompt_mask=mask)
    filled = text.masked_fill(~mask, pad)
    got = model.generate(filled, 5, temperature=0, prompt_mask=mask)
    assert torch.equal(got[:, text.shape[1] :], want[:, text.shape[1] :])
    beams = model.generate(filled, 4, num_beams=2, prompt_mask=mask)
    assert torch.equal(
        beams,
        model.generate(text, 4, num_beams=2, prompt_mask=mask).masked_fill(
            torch.cat([~mask, torch.zeros(3, 4, dtype=torch.bool)], 1), pad
        ),
    )
