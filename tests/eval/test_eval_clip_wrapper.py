"""The CLIP-style wrapper, driven the way CLIP_benchmark drives an open_clip model."""

from __future__ import annotations

import io
import tarfile

import braceexpand
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmssl.eval.cli import run_task
from mmssl.eval.clip_wrapper import load_clip, mask_from_ids


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
