"""MultimodalModel.generate_captions against argmax decoding by hand over the full captioning
forward (no kv cache), for both caption modes; its checks; the config refusing a caption
decoder without an LM head."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import mmssl
from mmssl.models import resolve_model_config

BOS = 1
CASES = [
    ("test_tiny_coca", "learned"),
    ("test_tiny_coca", "rope"),  # the cached decoder blocks rotate from the cache's position
    ("test_tiny_coca_prefix", "learned"),
    ("test_tiny_coca_prefix", "rope"),
]


def captioner(
    name: str, pos_embed: str = "learned", seed: int = 0, **overrides: dict
) -> mmssl.MultimodalModel:
    """A registry captioner whose outputs depend on the image and on positions: at its init
    (std 0.02, tied head, zero-ish position table) greedy captions repeat one token for
    every image, which would hide a decoder that ignores either."""
    torch.manual_seed(seed)
    text = {"tie_embeddings": False, "pos_embed": pos_embed}
    model = mmssl.create_model(name, text=text, **overrides)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 1 / math.sqrt(module.in_features))
        if model.text.pos_embed is not None:
            model.text.pos_embed.normal_(0, 0.5)
    return model.eval()


def images(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_reference(model, imgs, prompt, max_new_tokens, eos_id=None):
    """Argmax of the full captioning forward (`caption_logits`) over the growing caption."""
    image_tokens = model.forward_features(imgs)["tokens"]
    text, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = model.caption_logits(image_tokens, text)[:, -1].argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        text = torch.cat([text, nxt[:, None]], 1)
    return text


@pytest.mark.parametrize("name, pos_embed", CASES)
def test_greedy_captions_equal_argmax_of_the_full_forward(name, pos_embed):
    model = captioner(name, pos_embed)
    imgs = images()
    ctx = model.cfg.text.context_length
    bos = torch.full((3, 1), BOS)
    ref = greedy_reference(model, imgs, bos, ctx - 1)
    # the image matters: not every row is the same caption
    assert not (ref == ref[:1]).all()
    out = model.generate_captions(imgs, ctx - 1, bos_id=BOS, temperature=0)
    assert torch.equal(out, ref)
    # a caller's (B, T0) prompt, different per row
    prompt = torch.tensor([[BOS, 7], [BOS, 300], [BOS, 42]])
    ref = greedy_reference(model, imgs, prompt, 10)
    assert torch.equal(model.generate_captions(imgs, 10, prompt=prompt, temperature=0), ref)


@pytest.mark.parametrize("name, pos_embed", CASES)
def test_eos_stops_each_row_and_fills_the_rest(name, pos_embed):
    model = captioner(name, pos_embed)
    imgs = images()
    ref = greedy_reference(model, imgs, torch.full((3, 1), BOS), 12)
    eos = int(ref[0, 3])  # the token row 0 emits 3rd: rows end at different steps, or never
    expected = greedy_reference(model, imgs, torch.full((3, 1), BOS), 12, eos_id=eos)
    out = model.generate_captions(imgs, 12, bos_id=BOS, temperature=0, eos_id=eos)
    assert out.shape == (3, 13)
    assert torch.equal(out, expected)
    assert (out[0, 3:] == eos).all()


def test_the_image_is_encoded_once_and_ended_rows_stop_the_model(monkeypatch):
    model = captioner("test_tiny_coca")
    imgs = images(1)
    calls = {"image": 0, "text": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        model.visual, "forward_features", counted(model.visual.forward_features, "image")
    )
    monkeypatch.setattr(model.text, "forward_tokens", counted(model.text.forward_tokens, "text"))
    out = model.generate_captions(imgs, 20, bos_id=BOS, temperature=0)
    # one text tower call per token (the kv cache), one image encoding
    assert calls == {"image": 1, "text": 20}
    eos = int(out[0, 1])  # the first token: the only row ends at once
    out = model.generate_captions(imgs, 20, bos_id=BOS, temperature=0, eos_id=eos)
    assert calls == {"image": 2, "text": 21}
    assert out.shape == (1, 21) and (out[0, 1:] == eos).all()


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_cross_mode_kv_cache_hidden_equals_the_full_forward(pos_embed):
    model = captioner("test_tiny_coca", pos_embed)
    tokens = model.forward_features(images())["tokens"]
    text = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.caption.hidden(model.text, tokens, text)
        cache = model.caption.new_kv_cache(model.text)
        # a 5-token prompt, a 3-token chunk (bottom-right causal mask), then one at a time
        chunks = [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 16)]
        pieces = [
            model.caption.hidden(model.text, tokens, text[:, a:b], kv_cache=cache)
            for a, b in chunks
        ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache[0].length == cache[1].length == 16


def test_sampling_options_and_modes():
    model = captioner("test_tiny_coca")
    imgs = images()
    greedy = model.generate_captions(imgs, 10, bos_id=BOS, temperature=0)
    # top_k 1 keeps only the argmax, at any temperature
    assert torch.equal(model.generate_captions(imgs, 10, bos_id=BOS, top_k=1), greedy)
    # the generator makes sampling reproducible
    a, b = (
        model.generate_captions(
            imgs, 10, bos_id=BOS, temperature=2.0, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    )
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    # eval mode inside, each module's own mode restored afterwards
    model.train()
    model.visual.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    assert torch.equal(model.generate_captions(imgs, 10, bos_id=BOS, temperature=0), greedy)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_clear_errors():
    model = captioner("test_tiny_coca")
    imgs = images(2)
    ctx = model.cfg.text.context_length
    with pytest.raises(RuntimeError, match="no caption decoder"):
        mmssl.create_model("test_tiny_clip").generate_captions(imgs, 5, bos_id=BOS)
    with pytest.raises(ValueError, match="context_length 32"):
        model.generate_captions(imgs, ctx, bos_id=BOS)
    assert model.generate_captions(imgs, ctx - 1, bos_id=BOS).shape == (2, ctx)
    with pytest.raises(ValueError, match="either prompt"):
        model.generate_captions(imgs, 5)
    with pytest.raises(ValueError, match="either prompt"):
        model.generate_captions(imgs, 5, prompt=torch.ones(2, 1, dtype=torch.long), bos_id=BOS)
    with pytest.raises(ValueError, match="B = 2 images"):
        model.generate_captions(imgs, 5, prompt=torch.ones(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate_captions(imgs, 5, bos_id=BOS, temperature=-1.0)
    for bos in (2.7, True, -1):  # 2.7 and True started every caption with token 2 and 1
        with pytest.raises(ValueError, match=r"bos_id must be a token id in \[0, "):
            model.generate_captions(imgs, 5, bos_id=bos)
    with pytest.raises(ValueError, match="top_k"):
        model.generate_captions(imgs, 5, bos_id=BOS, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate_captions(imgs, -1, bos_id=BOS)


def test_a_caption_decoder_needs_the_lm_head():
    with pytest.raises(ValueError, match=r"text.lm_head=true"):
        resolve_model_config("test_tiny_coca_prefix", text={"lm_head": False})
    with pytest.raises(ValueError, match=r"text.lm_head=true"):
        resolve_model_config("test_tiny_coca", text={"lm_head": False})
    # without a caption decoder an LM-head-free text tower is fine (CLIP)
    assert not resolve_model_config("test_tiny_clip", text={"lm_head": False}).text.lm_head


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cross_mode_projects_the_image_keys_and_values_once_per_caption(num_beams):
    """Each decoder Block's cross-attention kv projection runs at the first step of a caption
    only (the decoder's kv cache keeps its output), and again for the next caption."""
    model = captioner("test_tiny_coca", caption={"depth": 2})
    kvs = [block.cross.attn.kv for block in model.caption.decoder.blocks]
    calls: Counter[torch.nn.Module] = Counter()
    for kv in kvs:
        kv.register_forward_hook(lambda module, args, out: calls.update([module]))
    options = {"temperature": 0} if num_beams == 1 else {"num_beams": num_beams}
    model.generate_captions(images(2), 5, bos_id=BOS, **options)
    assert [calls[kv] for kv in kvs] == [1, 1]
    model.generate_captions(images(2, seed=4), 5, bos_id=BOS, **options)
    assert [calls[kv] for kv in kvs] == [2, 2]


@pytest.mark.parametrize("name", ["test_tiny_coca", "test_tiny_coca_prefix"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_captions_with_a_vocab_limit_draw_only_ids_below_it(name, num_beams):
    """Greedy: the argmax over the first `limit` logits of the full captioning forward; beam
    search and sampling never pass the limit either."""
    model = captioner(name)
    imgs = images()
    bos = torch.full((3, 1), BOS)
    greedy = {"temperature": 0} if num_beams == 1 else {"num_beams": num_beams}
    got = model.generate_captions(imgs, 8, bos_id=BOS, vocab_limit=40, **greedy)
    assert int(got[:, 1:].max()) < 40
    if num_beams == 1:
        with torch.no_grad():
            image_tokens, want = model.forward_features(imgs)["tokens"], bos
            for _ in range(8):
                nxt = model.caption_logits(image_tokens, want)[:, -1, :40].argmax(-1)
                want = torch.cat([want, nxt[:, None]], 1)
        assert torch.equal(got, want)
        sampled = model.generate_captions(imgs, 8, bos_id=BOS, vocab_limit=40)
        assert int(sampled[:, 1:].max()) < 40
    with pytest.raises(ValueError, match="vocab_limit must be an integer in 1..512"):
        model.generate_captions(imgs, 2, bos_id=BOS, vocab_limit=513)
