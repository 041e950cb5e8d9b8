"""Weight import from open_clip (ViT-B-32 and tiny variants, from modules, dicts and files):
parity with open_clip, and the configs, keys and files it refuses by name.

(Peers seeded, 1-D parameters perturbed, fp32 parity: see interop_helpers.py.)
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from interop_helpers import TOL, max_diff, perturb_

from mmssl.interop import (
    convert_open_clip_state_dict,
    load_open_clip,
    open_clip_model_config,
    read_state_dict,
)
from mmssl.models import resolve_model_config

open_clip = pytest.importorskip("open_clip")

SENTENCES = [
    "a photo of a cat",
    "a diagram of two dogs playing in the snow next to a red car",
    "x",
]


@pytest.fixture(scope="module")
def clip_b32():
    torch.manual_seed(0)
    peer = perturb_(open_clip.create_model("ViT-B-32", pretrained=None), seed=1)
    return peer, load_open_clip(peer)


@pytest.mark.slow  # builds the full-size peer (module fixture)
def test_open_clip_b32_config_is_the_registry_config(clip_b32):
    peer, model = clip_b32
    expected = resolve_model_config("clip_vit_b32")
    assert model.cfg == expected
    assert open_clip_model_config("ViT-B-32") == expected


@pytest.mark.slow
def test_open_clip_b32_image_parity(clip_b32):
    peer, model = clip_b32
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    peer.visual.output_tokens = True  # one forward gives the projected pool and the tokens
    try:
        with torch.no_grad():
            ref_embed, ref_tokens = peer.visual(images)
            feats = model.forward_features(images)
            embed = model.encode_image(images)
    finally:
        peer.visual.output_tokens = False
    err_embed, err_tokens = max_diff(embed, ref_embed), max_diff(feats["tokens"], ref_tokens)
    print(
        f"open_clip ViT-B-32 image embeddings max abs diff {err_embed:.3g}, tokens {err_tokens:.3g}"
    )
    assert err_embed <= TOL and err_tokens <= TOL
    assert ref_embed.abs().max() > 0.1  # a real signal, not two zero vectors


@pytest.mark.slow
def test_open_clip_b32_text_parity(clip_b32):
    peer, model = clip_b32
    text = open_clip.tokenize(SENTENCES)  # (3, 77), zero-padded, end-of-text is the max id
    with torch.no_grad():
        ref = peer.encode_text(text)
        out = model.encode_text(text, text != 0)
    err = max_diff(out, ref)
    print(f"open_clip ViT-B-32 text embeddings max abs diff {err:.3g}")
    assert err <= TOL
    assert ref.abs().max() > 0.1


@pytest.mark.slow  # builds the full-size peer (module fixture)
def test_open_clip_b32_logit_scale(clip_b32):
    peer, model = clip_b32
    err = max_diff(model.logit_scale.exp(), peer.logit_scale.exp())
    print(f"open_clip ViT-B-32 logit scale (exp) abs diff {err:.3g}")
    assert err <= TOL
    assert abs(peer.logit_scale.item() - model.cfg.logit_scale_init) > 1e-3  # perturbed


def test_open_clip_quickgelu_variant_maps_to_quick_gelu():
    cfg = open_clip_model_config("ViT-B-32-quickgelu")
    assert cfg.vision.block.act == "quick_gelu" and cfg.text.block.act == "quick_gelu"
    expected = resolve_model_config("clip_vit_b32")
    # dataclasses.replace, not a `text.block.act` override: an override of one text.block
    # field rebuilds BlockConfig from the class defaults (norm_eps 1e-6, not the text 1e-5).
    expected.vision.block = replace(expected.vision.block, act="quick_gelu")
    expected.text.block = replace(expected.text.block, act="quick_gelu")
    assert cfg == expected


TINY_VISION = dict(image_size=32, patch_size=8, width=64, layers=2)
TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
TINY_CLIPS = {
    "quickgelu_layerscale": dict(
        quick_gelu=True,
        vision_cfg=dict(TINY_VISION, head_width=16, ls_init_value=0.1),
        text_cfg=dict(TINY_TEXT, ls_init_value=0.1),
    ),
    "custom_text_avgpool_noprenorm": dict(
        custom_text=True,
        vision_cfg=dict(TINY_VISION, head_width=32, no_ln_pre=True, pool_type="avg", mlp_ratio=2.0),
        text_cfg=dict(TINY_TEXT, heads=4, layers=1),
    ),
}


def tiny_clip(name: str, seed: int = 0, perturb: bool = True) -> torch.nn.Module:
    kw = dict(TINY_CLIPS[name])
    cls = open_clip.model.CustomTextCLIP if kw.pop("custom_text", False) else open_clip.model.CLIP
    torch.manual_seed(seed)
    model = cls(embed_dim=24, **kw).eval()
    return perturb_(model, seed=seed + 1) if perturb else model


def tiny_text(vocab: int = 100, length: int = 16) -> torch.Tensor:
    """Rows padded with 0 after an end-of-text id (the largest id), as open_clip tokenizes."""
    text = torch.randint(1, vocab - 1, (3, length), generator=torch.Generator().manual_seed(3))
    for row, eot in enumerate((5, length - 1, 1)):
        text[row, eot] = vocab - 1
        text[row, eot + 1 :] = 0
    return text


@pytest.mark.parametrize("name", sorted(TINY_CLIPS))
def test_open_clip_tiny_variants_parity(name):
    # The config read from a fresh module equals the one from the open_clip config dict (the
    # LayerScale init value is read from gamma, so only before training or perturbing).
    cfg_dict = {
        "embed_dim": 24,
        **{k: v for k, v in TINY_CLIPS[name].items() if k != "custom_text"},
    }
    assert open_clip_model_config(tiny_clip(name, perturb=False)) == open_clip_model_config(
        cfg_dict
    )
    peer = tiny_clip(name)
    model = load_open_clip(peer)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    text = tiny_text()
    with torch.no_grad():
        err_i = max_diff(model.encode_image(images), peer.encode_image(images))
        err_t = max_diff(model.encode_text(text, text != 0), peer.encode_text(text))
    print(f"open_clip tiny {name}: image {err_i:.3g}, text {err_t:.3g}")
    assert err_i <= TOL and err_t <= TOL


def test_open_clip_eos_pooling_with_its_own_pad_id_warns_and_matches_with_that_mask():
    # XLM-R style ids (<s> 0, <pad> 1, </s> 2); the tower pools at the first eos.  `text != 0`
    # marked the pads real and pooled one (error 2.4)
    text_cfg = dict(TINY_TEXT, pool_type="eos", eos_id=2, pad_id=1)
    torch.manual_seed(0)
    peer = perturb_(open_clip.model.CLIP(24, TINY_VISION, text_cfg).eval(), seed=1)
    # a built CLIP keeps no pad_id; its config dict does
    with pytest.warns(
        UserWarning, match=r"token \(id 2\): pass .*text != the id its tokenizer pads with"
    ) as seen:
        model = load_open_clip(peer)
    assert seen[0].filename == __file__  # the user's line, not one inside mmssl
    with pytest.warns(UserWarning, match="text_mask = text != 1, "):
        open_clip_model_config({"embed_dim": 24, "vision_cfg": TINY_VISION, "text_cfg": text_cfg})
    with pytest.warns(UserWarning, match=r"tokenizer pads with \(1 for the XLM-R"):
        open_clip_model_config("ViT-H-14-worldwide")  # xlm-v-base pads with 1, unrecorded
    with warnings.catch_warnings():  # a config that says it pads with 0
        warnings.simplefilter("error")
        pad0 = dict(text_cfg, pad_id=0)
        open_clip_model_config({"embed_dim": 24, "vision_cfg": TINY_VISION, "text_cfg": pad0})
    text = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    text[:, 0], text[0, 3], text[0, 4:], text[1, 10], text[1, 11:] = 0, 2, 1, 2, 1
    with torch.no_grad():
        err = max_diff(model.encode_text(text, text != 1), peer.encode_text(text))
    assert err <= TOL


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_from_file(tmp_path, suffix):
    from safetensors.torch import save_file

    peer = tiny_clip("quickgelu_layerscale")
    path = tmp_path / f"weights{suffix}"
    sd = {k: v.contiguous() for k, v in peer.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:  # an open_clip training checkpoint: wrapped, with DDP's `module.` prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    cfg_dict = {"embed_dim": 24, **TINY_CLIPS["quickgelu_layerscale"]}
    model = load_open_clip(path, config=cfg_dict)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model.encode_image(images), peer.encode_image(images)) <= TOL


class _Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_torch_file_with_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_open_clip(path, config="ViT-B-32")
    assert not marker.exists()


def test_open_clip_unknown_and_missing_keys_are_listed():
    peer = tiny_clip("quickgelu_layerscale")
    cfg = open_clip_model_config(peer)
    sd = dict(peer.state_dict())
    sd["visual.extra.weight"] = torch.zeros(1)
    sd["transformer.resblocks.0.attn.weird"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"2 open_clip keys.*transformer\.resblocks\.0\.attn\.weird"
    ):
        convert_open_clip_state_dict(sd, cfg)
    sd = dict(peer.state_dict())
    del sd["visual.ln_post.bias"], sd["ln_final.weight"]
    with pytest.raises(ValueError, match=r"missing \['text\.norm\.weight', 'visual\.norm\.bias'\]"):
        load_open_clip(sd, config=cfg)


def test_open_clip_shape_mismatch_names_the_key():
    peer = tiny_clip("quickgelu_layerscale")
    cfg = open_clip_model_config(peer)
    cfg.text.vocab_size = 101
    with pytest.raises(ValueError, match=r"text\.token_embed\.weight: \(100, 32\) vs \(101, 32\)"):
        load_open_clip(peer.state_dict(), config=cfg)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"vision_cfg": {"attentional_pool": True}}, "vision_cfg.attentional_pool"),
        ({"vision_cfg": {"timm_model_name": "vit_small_patch16_224"}}, "timm_model_name"),
        ({"text_cfg": {"hf_model_name": "bert"}}, "text_cfg.hf_model_name"),
        ({"text_cfg": {"pool_type": "first"}}, "text_cfg.pool_type"),
        ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "ResNet"),
        ({"init_logit_bias": -10}, "init_logit_bias"),
        # accepted before, then "N open_clip keys have no mmssl counterpart" at the load
        ({"text_cfg": {"scaled_cosine_attn": True}}, "text_cfg.scaled_cosine_attn"),
        ({"text_cfg": {"scale_fc": True}}, "text_cfg.scale_fc"),
    ],
)
def test_open_clip_unsupported_options_are_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        open_clip_model_config(cfg)


@pytest.mark.parametrize("tower", ["vision_cfg", "text_cfg"])
def test_open_clip_module_with_an_approximate_gelu_is_refused(tower):
    """A built model's GELU(approximate='tanh') loaded as exact GELU (1e-4 off the peer);
    the same config as a dict is refused by its act_kwargs."""
    kw = dict(TINY_CLIPS[sorted(TINY_CLIPS)[0]])
    kw.pop("custom_text", None)
    kw[tower] = dict(kw[tower], act_kwargs={"approximate": "tanh"})
    peer = open_clip.model.CLIP(embed_dim=24, **kw)
    with pytest.raises(ValueError, match="approximate='tanh'"):
        load_open_clip(peer)


def test_open_clip_bad_sources():
    with pytest.raises(ValueError, match="needs config="):
        load_open_clip({"logit_scale": torch.zeros(())})
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        open_clip_model_config("ViT-Nope")
    with pytest.raises(ValueError, match="does not download"):
        open_clip_model_config("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(TypeError, match="expected a state dict"):
        load_open_clip(42, config="ViT-B-32")  # type: ignore[arg-type]


def test_read_state_dict_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        read_state_dict(tmp_path / "absent.safetensors")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown weights format '.npz'"):
        read_state_dict(odd)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable or damaged"):
        read_state_dict(broken)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"non-tensor entries \['step'\]"):
        read_state_dict({"w": torch.zeros(1), "step": 3})


def test_an_integer_tensor_where_a_float_weight_belongs_is_named():
    # a torch RuntimeError from inside load_state_dict ("Only Tensors of floating point ...
    # can require gradients") instead of the listing of what does not fit
    peer = tiny_clip("quickgelu_layerscale")
    sd = dict(peer.state_dict())
    sd["ln_final.bias"] = sd["ln_final.bias"].long()
    with pytest.raises(
        ValueError,
        match=r"dtype kind mismatch \(peer vs mmssl\) \['text\.norm\.bias: torch\.int64 vs torch\.float32'\]",
    ):
        load_open_clip(sd, config=open_clip_model_config(peer))


def test_open_clip_configs_and_weights_that_differed_without_a_word():
    """A square size written as a list (JSON's tuples) was refused as non-square; OpenAI's
    weights (they carry input_resolution) loaded with GELU into a config without QuickGELU,
    0.02-0.04 off; final_ln_after_pool with token pooling gave tokens open_clip normalises
    not (0.97 off) while the embeddings match."""
    square = {"vision_cfg": dict(TINY_VISION, image_size=[32, 32], patch_size=[8, 8])}
    assert open_clip_model_config({**square, "text_cfg": TINY_TEXT}).vision.image_size == 32
    with pytest.raises(ValueError, match="non-square image_size/patch_size"):
        open_clip_model_config({"vision_cfg": dict(TINY_VISION, image_size=[32, 48])})
    peer = tiny_clip("quickgelu_layerscale")
    state = {**peer.state_dict(), "input_resolution": torch.tensor(32)}
    gelu = open_clip_model_config(dict(TINY_CLIPS["quickgelu_layerscale"], quick_gelu=False))
    with pytest.warns(UserWarning, match="OpenAI CLIP weights .* use QuickGELU"):
        load_open_clip(state, config=replace(gelu, embed_dim=24))
    quick = open_clip_model_config(TINY_CLIPS["quickgelu_layerscale"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_open_clip(state, config=replace(quick, embed_dim=24))
    with pytest.warns(UserWarning, match="tokens carry the final norm"):
        open_clip_model_config({"vision_cfg": dict(TINY_VISION, final_ln_after_pool=True)})
