"""Weight import from open_clip, timm and Hugging Face GPT-2: parity with the peer library.

Each peer is built with a seeded random init (nothing downloads), its 1-D parameters (norms,
biases, logit scale) are perturbed so a swapped norm or a dropped bias cannot hide behind
init values of 1 and 0, the weights are converted, and both models run the same random
inputs in fp32 eval mode: max abs diff <= 1e-4.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmssl.interop import (
    convert_open_clip_state_dict,
    gpt2_model_config,
    load_hf_gpt2,
    load_open_clip,
    load_timm_vit,
    open_clip_model_config,
    read_state_dict,
    timm_vit_config,
)
from mmssl.models import resolve_model_config

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32 max abs difference to the peer on the same weights (measured <= 3.4e-6)
SENTENCES = [
    "a photo of a cat",
    "a diagram of two dogs playing in the snow next to a red car",
    "x",
]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every 1-D (and scalar) parameter: norm weights/biases, biases, scales."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim <= 1:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------- open_clip ViT-B-32


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


# ---------------------------------------------------------------- open_clip, other sizes

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


# ---------------------------------------------------------------- timm ViT-S/16


@pytest.fixture(scope="module")
def vit_s16():
    torch.manual_seed(0)
    peer = perturb_(timm.create_model("vit_small_patch16_224", pretrained=False), seed=1)
    return peer, load_timm_vit(peer)


@pytest.mark.slow  # builds the full-size peer (module fixture)
def test_timm_vit_s16_config_is_the_registry_config(vit_s16):
    peer, model = vit_s16
    expected = resolve_model_config("vit_s16")
    assert model.cfg == expected
    assert timm_vit_config("vit_small_patch16_224") == expected  # built on meta, no weights


@pytest.mark.slow
def test_timm_vit_s16_features_parity(vit_s16):
    peer, model = vit_s16
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peer.forward_features(images)  # (B, 1 + N, D), final norm included
        ref_pre_logits = peer.forward_head(ref, pre_logits=True)
        feats = model.forward_features(images)
    err_tokens = max_diff(feats["tokens"], ref[:, 1:])
    err_cls = max_diff(feats["pooled"], ref[:, 0])
    err_pre = max_diff(feats["pooled"], ref_pre_logits)
    print(
        f"timm vit_small_patch16_224: tokens {err_tokens:.3g}, cls {err_cls:.3g}, "
        f"pre-logits {err_pre:.3g}"
    )
    assert max(err_tokens, err_cls, err_pre) <= TOL


TINY_VITS = {
    "quickgelu_ls_prenorm_avg_nobias": dict(
        init_values=1e-5,
        qkv_bias=False,
        global_pool="avg",
        fc_norm=False,
        pre_norm=True,
        act_layer="quick_gelu",
        mlp_ratio=2.0,
    ),
    "no_class_token_avg": dict(class_token=False, global_pool="avg", fc_norm=False),
    # timm.layers.GELU, exact, no `approximate`: refused as "activation GELU" before
    "gelu_by_name": dict(act_layer="gelu"),
    # an nn.GELU module with the tanh approximation (a string act_layer makes another class)
    "gelu_tanh_module": dict(act_layer=functools.partial(torch.nn.GELU, approximate="tanh")),
}


@pytest.mark.parametrize("name", sorted(TINY_VITS))
def test_timm_tiny_variants_parity(name):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    peer = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        **TINY_VITS[name],
    )
    perturb_(peer, seed=1)
    model = load_timm_vit(peer)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = peer.forward_features(images)
        pre_logits = peer.forward_head(ref, pre_logits=True)
        feats = model.forward_features(images)
    err = max(
        max_diff(feats["tokens"], ref[:, peer.num_prefix_tokens :]),
        max_diff(feats["pooled"], pre_logits),
    )
    print(f"timm tiny {name}: {err:.3g}")
    assert err <= TOL


def test_timm_from_state_dict_needs_config_and_drops_only_the_head(tmp_path):
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    sd = peer.state_dict()
    with pytest.raises(ValueError, match="needs config="):
        load_timm_vit(sd)
    cfg = timm_vit_config(peer)
    model = load_timm_vit(sd, config=cfg)
    assert torch.equal(model.visual.trunk.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    sd["reg_token"] = torch.zeros(1, 4, 192)
    with pytest.raises(ValueError, match=r"1 timm keys have no mmssl counterpart: \['reg_token'\]"):
        load_timm_vit(sd, config=cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reg_tokens=4), "register tokens"),
        (dict(global_pool="avg"), "fc_norm"),
        (dict(global_pool="map"), "attention pooling"),
        (dict(qk_norm=True), "q/k norm"),
        (dict(no_embed_class=True), "no_embed_class"),
    ],
)
def test_timm_unsupported_options_are_named(kwargs, match):
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        peer = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, **kwargs
        )
    with pytest.raises(ValueError, match=match):
        timm_vit_config(peer)


def test_timm_not_a_vit():
    with pytest.raises(ValueError, match="is not a timm VisionTransformer"):
        timm_vit_config(torch.nn.Linear(2, 2))
    with torch.device("meta"):
        hybrid = timm.create_model("vit_small_r26_s32_224", pretrained=False)
    with pytest.raises(ValueError, match="HybridEmbed stem"):
        timm_vit_config(hybrid)


@pytest.mark.parametrize("size", [32, 96])
def test_timm_parity_at_another_resolution(size):
    # both resample the position table (antialiased bicubic) for a grid it was not built for
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    peer = VisionTransformer(
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=0,
        dynamic_img_size=True,
    )
    peer = perturb_(peer, seed=1).eval()
    model = load_timm_vit(peer)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peer.forward_head(peer.forward_features(x), pre_logits=True)
        assert max_diff(model.visual.forward_features(x)["pooled"], ref) <= TOL


# ---------------------------------------------------------------- Hugging Face GPT-2


def small_gpt2_config(**kw):
    base = dict(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=999,
        eos_token_id=999,
    )
    return transformers.GPT2Config(**{**base, **kw})


def gpt2_pair(seed: int = 0, **kw):
    torch.manual_seed(seed)
    peer = perturb_(transformers.GPT2LMHeadModel(small_gpt2_config(**kw)), seed=seed + 1)
    return peer, load_hf_gpt2(peer)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_word_embeddings": False, "activation_function": "gelu", "n_inner": 200},
        {"n_embd": 88, "n_head": 4, "n_inner": 120},  # 88 * (120 / 88) is 119.999... in floats
    ],
    ids=["tied_gelu_new", "untied_gelu", "inner_width_from_a_ratio"],
)
def test_gpt2_logits_parity(kw):
    peer, model = gpt2_pair(**kw)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peer(ids).logits
        out = model.lm_logits(ids)
    err = max_diff(out, ref)
    print(f"GPT-2 small config {kw}: logits max abs diff {err:.3g}")
    assert err <= TOL
    assert model.cfg.text.tie_embeddings == kw.get("tie_word_embeddings", True)


def test_gpt2_from_saved_directory(tmp_path):
    peer, _ = gpt2_pair()
    peer.save_pretrained(tmp_path)  # config.json + model.safetensors (tied head stored once)
    model = load_hf_gpt2(tmp_path)
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        assert max_diff(model.lm_logits(ids), peer(ids).logits) <= TOL


@pytest.mark.slow
def test_gpt2_124m_is_the_registry_gpt_124m():
    cfg = transformers.GPT2Config()
    assert gpt2_model_config(cfg) == resolve_model_config("gpt_124m")
    torch.manual_seed(0)
    peer = transformers.GPT2LMHeadModel(cfg).eval()
    model = load_hf_gpt2(peer)
    assert model.num_params() == sum(p.numel() for p in peer.parameters())  # tied head once
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = max_diff(model.lm_logits(ids), peer(ids).logits)
    print(f"GPT-2 124M logits max abs diff {err:.3g}")
    assert err <= TOL


# ---------------------------------------------------------------- import hygiene


def test_interop_modules_import_the_peers_only_inside_functions():
    """The peers are optional: no module-level import of them anywhere in mmssl.interop (a
    static check, as the test process has them loaded already)."""
    import ast

    import mmssl.interop

    peers = {"open_clip", "timm", "transformers"}
    for path in Path(mmssl.interop.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not {n.split(".")[0] for n in names} & peers, (path.name, names)


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
