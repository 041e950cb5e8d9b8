"""Peer weights as they arrive: older GPT-2 files with causal-mask buffers, DDP `module.`
prefixes, bf16 peers, and open_clip configs that leave keys at open_clip's defaults.  Each
converted model is compared with the peer library (tiny, seeded models; nothing downloads),
and never shares storage with it."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from mmssl.interop import (  # noqa: E402
    load_hf_gpt2,
    load_open_clip,
    load_timm_vit,
    open_clip_model_config,
    read_state_dict,
)

TINY_VISION = dict(image_size=32, patch_size=8, width=128, layers=1)  # no head_width
TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)


def test_gpt2_causal_mask_buffers_of_older_transformers_are_dropped():
    """Older transformers versions saved `attn.bias` (the causal tril) and `attn.masked_bias` in
    every block: such a state dict converts and gives the peer's logits."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    peer = transformers.GPT2LMHeadModel(config).eval()
    state = dict(peer.state_dict())
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16, dtype=torch.bool))[
            None, None
        ]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model = load_hf_gpt2(state, config=config)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_logits(ids), peer(ids).logits, atol=1e-5, rtol=0)


def test_module_prefix_is_stripped_only_when_every_key_has_it():
    """A DDP `module.` prefix on every key is removed; a state dict where only some keys
    start with `module.` (a submodule of that name) is kept as it is."""
    t = torch.zeros(2)
    assert read_state_dict({"module.a": t, "module.b": t}).keys() == {"a", "b"}
    assert read_state_dict({"module.a": t, "b": t}).keys() == {"module.a", "b"}


def _tiny_timm_vit() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=0
    ).eval()


def test_converted_weights_are_fp32_copies_of_the_peers():
    """Editing the converted model leaves the peer alone (it shared the peer's storage), and
    a bf16 peer gives an fp32 model (it kept bf16) computing the peer's features."""
    peer = _tiny_timm_vit()
    model = load_timm_vit(peer)
    before = {k: v.clone() for k, v in peer.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in peer.state_dict().items():
        assert torch.equal(v, before[k]), k

    peer16 = _tiny_timm_vit().to(torch.bfloat16)
    model = load_timm_vit(peer16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = peer16.float().forward_features(images)[:, 0]
        torch.testing.assert_close(model.forward_pooled(images), want, atol=1e-5, rtol=1e-5)


def test_open_clip_defaults_of_a_config_that_leaves_them_out():
    """A config without norm_kwargs or head_width takes open_clip's defaults (LayerNorm eps
    1e-5, 64-wide heads), read here from the peer built from the same dict."""
    cfg_dict = {"embed_dim": 24, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
    cfg = open_clip_model_config(cfg_dict)
    torch.manual_seed(0)
    peer = open_clip.model.CLIP(**cfg_dict).eval()
    v_block = peer.visual.transformer.resblocks[0]
    t_block = peer.transformer.resblocks[0]
    assert cfg.vision.num_heads == v_block.attn.num_heads == 2  # 128 / 64
    assert cfg.vision.block.norm_eps == v_block.ln_1.eps == peer.visual.ln_post.eps == 1e-5
    assert cfg.text.block.norm_eps == t_block.ln_1.eps == peer.ln_final.eps == 1e-5


def test_open_clip_logit_scale_converts_exactly():
    """The logit scale is copied bit for bit (it is a log: any round trip moves exp of it)."""
    torch.manual_seed(0)
    peer = open_clip.model.CLIP(24, TINY_VISION, TINY_TEXT).eval()
    with torch.no_grad():
        peer.logit_scale.fill_(3.1)  # off its init of log(1 / 0.07)
    model = load_open_clip(peer)
    assert torch.equal(model.logit_scale.reshape(()), peer.logit_scale.reshape(()))
