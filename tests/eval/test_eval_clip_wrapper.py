"""The CLIP-style wrapper, driven the way CLIP_benchmark drives an open_clip model."""

from __future__ import annotations

import io
import math
import tarfile

import braceexpand
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmssl
from mmssl.eval.cli import run_task
from mmssl.eval.clip_wrapper import load_clip, mask_from_ids
from mmssl.models.io import save_pretrained


def clip_benchmark_zeroshot(model, transform, tokenizer, pil_images, labels, classnames, templates):
    """CLIP_benchmark's zero_shot_classifier + run_classification, reduced to their calls."""
    with torch.no_grad():
        weights = []
        for name in classnames:
            texts = tokenizer([t.format(c=name) for t in templates])
            emb = F.normalize(model.encode_text(texts), dim=-1).mean(dim=0)
            weights.append(emb / emb.norm())
        classifier = torch.stack(weights, dim=1)
        images = torch.stack([transform(im) for im in pil_images])
        feats = F.normalize(model.encode_image(images), dim=-1)
        logits = 100.0 * feats @ classifier
    return float((logits.argmax(1) == torch.tensor(labels)).float().mean())


def test_mask_from_ids(tokenizer):
    ids, mask = tokenizer.batch_encode(["a red seven.", "hello there, a much longer caption"], 16)
    assert torch.equal(mask_from_ids(ids, tokenizer.eos_id), mask)


def test_wrapper_text_of_a_tokenizer_whose_bos_is_its_eos(tmp_path):
    """A GPT-2-style tokenizer.json has one `<|endoftext|>` for bos, eos and pad.  The mask the
    wrapper rebuilds used to end at the leading bos (taken for the eos), so every text got
    the same embedding; it now equals the model's own encode_text with batch_encode's mask."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import mmssl
    from mmssl.models.io import save_pretrained

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(["a photo of a cat", "a photo of a dog", "something red"] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = mmssl.get_tokenizer(str(path))
    assert tok.bos_id == tok.eos_id == tok.pad_id

    save_pretrained(mmssl.create_model("test_tiny_clip"), tmp_path / "model")
    model, _, tokenizer = load_clip(tmp_path / "model", tokenizer=str(path))
    texts = ["a photo of a cat", "something red and a dog", ""]
    ids, mask = tok.batch_encode(texts, 32)
    with torch.no_grad():
        got = model.encode_text(tokenizer(texts))
        want = model.model.encode_text(ids, mask)
    torch.testing.assert_close(got, want)
    assert torch.equal(mask_from_ids(ids, tok.eos_id, tok.bos_id), mask)


@pytest.mark.slow
def test_duck_typed_harness_matches_zeroshot(tmp_path, tiny_model_dir, test_shards):
    model, transform, tokenizer = load_clip(tiny_model_dir)
    assert tokenizer("a photo").shape == (1, 32) and tokenizer(["a", "b"]).dtype == torch.int64
    pil, labels = [], []
    for url in braceexpand.braceexpand(test_shards):
        with tarfile.open(url) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".png")):
            pil.append(Image.open(io.BytesIO(files[name])))
            labels.append(int(name[1:5]) % 3)
    names = ["red", "green", "blue"]
    acc = clip_benchmark_zeroshot(
        model, transform, tokenizer, pil, labels, names, ["a photo of a {c} square.", "{c} things"]
    )
    classes = tmp_path / "c.json"
    classes.write_text(
        '{"classnames": ["red", "green", "blue"], "templates": ["a photo of a {} square.", "{} things"]}'
    )
    ours = run_task(
        [
            "zeroshot",
            "--model",
            tiny_model_dir,
            "--data",
            test_shards,
            "--classes",
            str(classes),
            "--out",
            str(tmp_path / "out"),  # a directory of its own
        ]
    )
    assert acc == pytest.approx(ours["top1"])
    img, txt, scale = model(torch.stack([transform(p) for p in pil[:2]]), tokenizer(["x", "y"]))
    assert img.shape == txt.shape == (2, 16) and scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_a_model_saved_without_a_tokenizer_of_another_vocabulary_is_not_given_the_default(
    tmp_path,
):
    """An open_clip import saved with save_pretrained (no tokenizer record, 49408 ids) was
    evaluated with the default tokenizer's 8192 ids, which fit its table: every prompt was
    encoded into other tokens (encode_text off by up to 2.5), without a word."""
    import dataclasses

    import mmssl
    from mmssl.eval.loading import EvalError
    from mmssl.models.io import save_pretrained
    from mmssl.models.multimodal import MultimodalModel

    cfg = mmssl.create_model("test_tiny_clip").cfg
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=9000))
    save_pretrained(MultimodalModel(cfg), tmp_path / "model")
    with pytest.raises(
        EvalError, match="records no tokenizer and its text tower has vocab_size 9000"
    ):
        load_clip(tmp_path / "model")
    # named on the command line (an older export trained with the default, vocab padded)
    assert load_clip(tmp_path / "model", tokenizer="default")[2]("a photo").shape[0] == 1
    save_pretrained(
        MultimodalModel(cfg), tmp_path / "named", extra={"tokenizer": {"name": "default"}}
    )
    assert load_clip(tmp_path / "named")[2]("a photo").shape[0] == 1  # named: taken as asked


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "L", "RGBA", "P"])
def test_transform_reads_an_image_as_the_shard_decoder_does(mode: str) -> None:
    """load_clip's transform took PIL's convert("RGB"), which clips 16-bit and float
    greyscale at 255: a 16-bit ramp came out 99.8% white (embedding cosine 0.006 with the
    same file through `mmssl features`)."""
    import numpy as np

    from mmssl.data.decode import decode_image
    from mmssl.eval.clip_wrapper import ImageTransform
    from mmssl.eval.data import Preprocess

    ramp = np.linspace(0, 1, 20 * 24).reshape(20, 24)
    image = {
        "I;16": lambda: Image.fromarray((ramp * 65535).astype(np.uint16)),
        "I": lambda: Image.fromarray((ramp * 65535).astype(np.int32)),
        "F": lambda: Image.fromarray(ramp.astype(np.float32)),
        "L": lambda: Image.fromarray((ramp * 255).astype(np.uint8)),
        "RGBA": lambda: Image.fromarray((ramp * 255).astype(np.uint8)).convert("RGBA"),
        "P": lambda: Image.fromarray((ramp * 255).astype(np.uint8)).convert("P"),
    }[mode]()
    assert image.mode == mode
    pre = Preprocess(16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    transform = ImageTransform(pre)
    got = transform(image)
    if mode == "F":  # PNG holds no float pixels: the reference is the [0, 1] values as 8 bits
        want = pre([torch.from_numpy(np.round(ramp * 255).astype(np.uint8)).expand(3, -1, -1)])
    elif mode == "I":  # 32-bit integers do not fit a PNG: the same values as a 16-bit one
        want = pre([decode_image(_png(Image.fromarray((ramp * 65535).astype(np.uint16))))])
    else:
        want = pre([decode_image(_png(image))])
    torch.testing.assert_close(got, want[0], atol=1e-6, rtol=0)
    assert got.std() > 0.5  # a ramp, not a white page


def test_transform_takes_float_tensors_in_unit_range_and_refuses_the_rest() -> None:
    from mmssl.eval.clip_wrapper import ImageTransform
    from mmssl.eval.data import Preprocess

    transform = ImageTransform(Preprocess(16))
    u8 = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    # a float tensor in [0, 1] was divided by 255 again (cosine -0.99 with its uint8 twin)
    torch.testing.assert_close(transform(u8.float() / 255), transform(u8), atol=0, rtol=0)
    for bad, match in [
        (u8.float(), r"values in \[0, 1\]"),
        (u8.to(torch.int32), "uint8 or float"),
        (u8.permute(1, 2, 0), r"\(3, H, W\) image tensor, got shape \(20, 24, 3\)"),
        (torch.zeros(4, 8, 8, dtype=torch.uint8), r"got shape \(4, 8, 8\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            transform(bad)
    with pytest.raises(TypeError, match="PIL image or a"):
        transform(u8.numpy())


def test_logit_scale_is_the_trained_objectives_and_siglip_gives_its_bias(tmp_path, tokenizer):
    # the wrapper returned exp of the model's parameter (14.3 at init), while the loss had
    # used it clamped at max_logit_scale 10 and the export recorded log 10
    model = mmssl.create_model("test_tiny_clip", text={"vocab_size": tokenizer.vocab_size})
    images, ids = torch.rand(2, 3, 32, 32), torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])

    def wrapper_out(name: str, logits: dict | None) -> tuple:
        extra = {"tokenizer": tokenizer.metadata, **({"logits": logits} if logits else {})}
        save_pretrained(model, tmp_path / name, extra=extra)
        with torch.no_grad():
            return load_clip(tmp_path / name)[0](images, ids)

    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    clip = {"clip": {"type": "clip", "logit_scale": math.log(10.0), "logit_bias": None}}
    out = wrapper_out("clip", clip)
    assert len(out) == 3 and out[2].item() == pytest.approx(10.0, rel=1e-6)
    sig = {"sig": {"type": "siglip", "logit_scale": math.log(8.0), "logit_bias": -3.5}}
    out = wrapper_out("sig", sig)
    assert len(out) == 4 and out[2].item() == pytest.approx(8.0, rel=1e-6)
    assert out[3].item() == -3.5
    out = wrapper_out("bare", None)  # no record: the model's parameter, no bias
    assert len(out) == 3 and out[2].item() == pytest.approx(1 / 0.07, rel=1e-5)
