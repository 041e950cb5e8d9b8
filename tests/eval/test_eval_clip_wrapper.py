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
            str(tmp_path),
        ]
    )
    assert acc == pytest.approx(ours["top1"])
    img, txt, scale = model(torch.stack([transform(p) for p in pil[:2]]), tokenizer(["x", "y"]))
    assert img.shape == txt.shape == (2, 16) and scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
