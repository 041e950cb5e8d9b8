"""`mmssl eval sensitivity` on tiny exported models, against figures computed by hand."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import torch
from PIL import Image

import mmssl
from mmssl.eval.cli import main
from mmssl.models.io import load_pretrained, save_pretrained

pytestmark = pytest.mark.slow

NEUTRAL = [0.0] * 8 + [0.5, 0.5, 1.0, 1.0] + [0.0]  # v1: blur, color, color_diff, crop, gray


def read_pngs(pattern: str) -> list[torch.Tensor]:
    """uint8 (3, H, W) images of the shards, in order, read with tarfile + PIL."""
    out = []
    for url in braceexpand.braceexpand(pattern):
        with tarfile.open(url) as tf:
            pngs = {
                m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".png")
            }
        for name in sorted(pngs):
            arr = np.asarray(Image.open(io.BytesIO(pngs[name])).convert("RGB"))
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return out


def naive_info_nce(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR loss one anchor at a time: -log softmax of the positive over the 2N-1 others."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, total = len(z1), 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = {k: float(z[i] @ z[k]) / t for k in range(2 * n) if k != i}
        total -= sims[pos] - math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


@pytest.fixture(scope="module", params=[False, True], ids=["unnormalised", "normalised"])
def cond_model_dir(request, tmp_path_factory):
    """Backbone (adaLN + prefix tokens) and hypernetwork-projector conditioning, made non-zero
    so that the neutral condition and the descriptors matter; with and without a training
    normalisation in its config."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_vit_cond")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hyper_weight" in name or "modulation" in name or "gate" in name:
                p.normal_(0, 0.05)
    extra = {"preprocess": {"mean": MEAN, "std": STD}} if request.param else None
    return str(save_pretrained(model, tmp_path_factory.mktemp("cond"), extra))


def test_reported_figures_match_a_hand_computation(
    tmp_path, cond_model_dir, train_shards, test_shards
):
    config = json.loads((Path(cond_model_dir) / "config.json").read_text())

    def norm(x: torch.Tensor) -> torch.Tensor:  # what the model was trained on
        if "preprocess" not in config:
            return x
        return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)

    out = tmp_path / "sens"
    argv = [
        "sensitivity",
        "--model",
        cond_model_dir,
        "--data",
        test_shards,
        "--train",
        train_shards,
    ]
    argv += ["--out", str(out), "--batch-size", "6", "--batches", "2", "--temperature", "0.2"]
    argv += ["--augment", "hue=0.5", "--augment", "blur_p=0.0"]
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    res = doc["results"]
    assert doc["task"] == "sensitivity" and "grayscale" in (out / "summary.md").read_text()
    assert set(res["centred_cosine"]) == {
        "crop",
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "grayscale",
    }  # blur_p=0: no blur entry
    model = load_pretrained(cond_model_dir)
    neutral = torch.tensor(NEUTRAL)

    def feats(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for img in x:  # one image at a time, neutral descriptor written out
            c = model.condition(neutral[None])
            rows.append(model.forward_features(img[None], c)["pooled"][0])
        return torch.stack(rows)

    with torch.no_grad():
        test = torch.stack(read_pngs(test_shards)).float() / 255
        mean = feats(norm(torch.stack(read_pngs(train_shards)).float() / 255)).mean(0)
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        gray = (test * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        a, b = feats(norm(test)) - mean, feats(norm(gray)) - mean
        cos = [float(u @ v / (u.norm() * v.norm())) for u, v in zip(a, b)]
    assert res["centred_cosine"]["grayscale"] == pytest.approx(np.mean(cos), abs=2e-3)

    # the unshuffled loss: the two views of each batch of 6, the documented seeds
    from mmssl.data.augment import AugmentConfig, make_views

    cfg = AugmentConfig(hue=0.5, blur_p=0.0)
    images, losses = read_pngs(test_shards), []
    with torch.no_grad():
        for i in range(2):
            views, augs = make_views(
                images[6 * i : 6 * i + 6], 2, 32, cfg, np.random.default_rng([0, i])
            )
            z = []
            for v, d in zip(views, augs):
                c = model.conditioner(d)
                pooled = model.visual.forward_features(norm(v), c)["pooled"]
                z.append(model.projector(pooled, c))
            losses.append(naive_info_nce(z[0], z[1], 0.2))
    assert res["omega_usage"]["loss"] == pytest.approx(np.mean(losses), abs=1e-4)
    assert res["batches"] == 2 and res["batch_size"] == 6


def test_zero_initialised_conditioning_shows_no_rise(tmp_path, test_shards):
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_simclr", condition={"dim": 8}, projector={"cond": "hyper", "hyper_rank": 4}
    )
    path = save_pretrained(model, tmp_path / "model")
    out = tmp_path / "out"
    assert (
        main(["sensitivity", "--model", str(path), "--data", test_shards, "--out", str(out)]) == 0
    )
    omega = json.loads((out / "results.json").read_text())["results"]["omega_usage"]
    # zero-initialised W_k: the descriptors cannot change the loss, shuffled or not
    assert set(omega) == {
        "loss",
        "rise/all",
        "rise/blur",
        "rise/color",
        "rise/color_diff",
        "rise/crop",
        "rise/grayscale",
        "rise/hue",
    }
    assert all(v == 0.0 for k, v in omega.items() if k.startswith("rise/"))
    assert omega["loss"] > 0


def test_model_without_conditioner_still_writes_cosines(
    tmp_path, tiny_model_dir, test_shards, capsys
):
    out = tmp_path / "plain"
    argv = ["sensitivity", "--model", tiny_model_dir, "--data", test_shards, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no conditioner" in err and "--cosines-only" in err
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["omega_usage"] is None and "no conditioner" in res["omega_error"]
    assert -1 <= res["centred_cosine"]["hue"] <= 1
    assert main([*argv, "--cosines-only"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "TEXT"], "hold no images"),
        (["--augment", "hue=0.9"], "hue strength must be in [0, 0.5]"),
        (["--augment", "hux=0.1"], "unknown key 'augment.hux'"),
        (["--augment", "hue"], "--augment expects KEY=VALUE"),
        (["--batches", "0"], "--batches must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path, cond_model_dir, test_shards, text_shards, capsys, extra, message
):
    extra = [text_shards if e == "TEXT" else e for e in extra]
    data = [] if "--data" in extra else ["--data", test_shards]
    argv = ["sensitivity", "--model", cond_model_dir, *data, *extra, "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_single_augmentations_skip_the_crop_of_a_full_unflipped_view():
    """scale [1, 1] without flips is no crop, whether the pair is a tuple (the dataclass) or
    a list (YAML, --augment, the recipe); each other type gets one config with only it on."""
    from mmssl.data.augment import AugmentConfig
    from mmssl.eval.sensitivity import augment_config, single_augmentations

    types = ["brightness", "contrast", "saturation", "hue", "grayscale", "blur"]
    for cfg in (
        AugmentConfig(scale=(1.0, 1.0), flip_p=0.0),
        augment_config({"scale": [1.0, 1.0]}, ["flip_p=0"]),
        augment_config({}, ["scale=[1, 1]", "flip_p=0.0"]),
    ):
        assert list(single_augmentations(cfg)) == types
    flipped = augment_config({}, ["scale=[1.0, 1.0]", "flip_p=0.5"])
    assert list(single_augmentations(flipped)) == ["crop", *types]
    assert list(single_augmentations(augment_config({}, []))) == ["crop", *types]


def test_the_runs_view_augment_is_measured(tmp_path):
    """The quickstart shifts hue and greys only its second view (data.view_augment); the
    task read data.augment alone, so hue and grayscale were never measured."""
    from mmssl.eval.sensitivity import _recipe_defaults, augment_config, view_augmentations

    (tmp_path / "recipe.yaml").write_text(
        "data:\n  augment: {hue: 0.0, grayscale_p: 0.0, blur_p: 0.5}\n"
        "  view_augment: [{}, {hue: 0.5, grayscale_p: 0.2, blur_p: 0.1}]\n"
    )
    augment, per_view, _ = _recipe_defaults(str(tmp_path))
    views = [augment_config({**augment, **v}, []) for v in per_view]
    got = view_augmentations(views)
    assert {"hue", "grayscale", "blur", "crop"} <= set(got)
    assert got["hue"].hue == 0.5  # the second view's strength
    # blur in both views (always applied, sigma range the same): one entry
    assert "blur (view 2)" not in got
    assert set(view_augmentations([views[0]])) == set(got) - {"hue", "grayscale"}


def test_centred_cosine_of_a_feature_equal_to_the_mean_is_undefined_not_zero(monkeypatch):
    """A collapsed encoder (every feature the mean) scored 0.0, read as "fully sensitive"."""
    from mmssl.eval import sensitivity

    # features f(x): the first pixel's value in every dim, so t shifts them or not at all
    monkeypatch.setattr(sensitivity, "features", lambda m, x: x[:, 0, 0, :1].expand(-1, 4))
    x = torch.tensor([0.2, 0.6, 1.0]).view(3, 1, 1, 1).expand(3, 3, 8, 8)
    same = torch.full((4,), 0.6)  # the middle image's feature is the mean: left out
    got = sensitivity.centred_cosines(
        None, x, {"id": lambda y: y, "flat": lambda y: y * 0 + 0.6}, same
    )
    assert got["id"] == pytest.approx(1.0) and got["flat"] is None  # f(t(x)) = mean everywhere
    got = sensitivity.centred_cosines(None, x, {"neg": lambda y: 1.2 - y}, same)
    assert got["neg"] == pytest.approx(-1.0)
