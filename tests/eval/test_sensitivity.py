"""`mmssl eval sensitivity` on tiny exported models, against figures computed by hand."""

from __future__ import annotations

import dataclasses
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
    # an export (no recipe.yaml): the note on the default augmentations, then the error
    note, err = capsys.readouterr().err.strip().splitlines()
    assert note.startswith("mmssl eval: note:") and "temperature" not in note  # unused
    assert "has no conditioner" in err and "--cosines-only" in err
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


def _zero_cond_model(path: Path) -> str:
    """An exported SimCLR model with a descriptor conditioner (zero-initialised)."""
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_simclr", condition={"dim": 8}, projector={"cond": "hyper", "hyper_rank": 4}
    )
    return str(save_pretrained(model, path))


def test_a_run_directory_given_with_a_tilde_uses_its_recipe(
    tmp_path, test_shards, monkeypatch, capsys
):
    """`--model '~/run'` loaded the model (expanded) but looked for ~/run/recipe.yaml
    literally: the default temperature and augmentations were used, without a word."""
    home = tmp_path / "home"
    # an export with a recipe.yaml beside it: loads as a model, reads as a run directory
    _zero_cond_model(home / "run")
    (home / "run" / "recipe.yaml").write_text(
        "objectives:\n  simclr: {temperature: 0.3}\ndata:\n  augment: {hue: 0.25, blur_p: 0.0}\n"
    )
    monkeypatch.setenv("HOME", str(home))
    out = tmp_path / "out"
    argv = ["sensitivity", "--model", "~/run", "--data", test_shards, "--out", str(out)]
    assert main([*argv, "--batches", "1"]) == 0
    assert "note" not in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["temperature"] == 0.3 and res["augment"]["hue"] == 0.25
    assert "blur" not in res["centred_cosine"]


def test_an_export_says_which_defaults_stand_in_for_the_runs(tmp_path, test_shards, capsys):
    """An exported model keeps no recipe: its temperature and augmentations are the built-in
    defaults, and one note on stderr says so, unless the options set them."""
    from mmssl.data.augment import AugmentConfig

    model = _zero_cond_model(tmp_path / "model")
    argv = ["sensitivity", "--model", model, "--data", test_shards, "--batches", "1"]
    argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip()
    res = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert len(err.splitlines()) == 1 and err.startswith("mmssl eval: note:") and model in err
    assert "no recipe.yaml" in err and f"temperature {res['temperature']}" in err
    assert res["augment"] == json.loads(json.dumps(dataclasses.asdict(AugmentConfig())))
    assert f"hue={AugmentConfig().hue}" in err and f"blur_p={AugmentConfig().blur_p}" in err
    for extra in (["--temperature", "0.2"], ["--cosines-only"]):
        assert main([*argv, *extra, "--augment", "hue=0.2"]) == 0
        assert capsys.readouterr().err == ""  # set, or unused (--cosines-only: no temperature)


@pytest.mark.parametrize("shapes", [[(24, 40)] * 6, [(24, 40), (40, 24), (30, 48)] * 2])
def test_the_identity_view_of_a_non_square_image_is_x(tmp_path, shapes, monkeypatch):
    """x came from the eval preprocessing (resize, then centre crop) and t(x) from the views
    (crop, then resize): with every augmentation off they differed on non-square images, and
    the identity scored below 1.  Shapes of one size can take the compiled renderer."""
    from eval_helpers import png_bytes

    from mmssl.data.augment import AugmentConfig
    from mmssl.data.shards import ShardWriter
    from mmssl.eval import sensitivity

    rng = np.random.default_rng(0)
    writer = ShardWriter(str(tmp_path), "test", max_count=10)
    for i, (h, w) in enumerate(shapes):  # smooth images, as photographs are
        small = torch.from_numpy(rng.random((1, 3, 4, 4)) * 255)
        img = torch.nn.functional.interpolate(small, (h, w), mode="bicubic", align_corners=False)
        arr = img[0].clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
        writer.write({"__key__": f"k{i:04d}", "png": png_bytes(arr)})
    writer.close()
    off = AugmentConfig(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
    )
    monkeypatch.setattr(sensitivity, "view_augmentations", lambda _: {"identity": off})
    seen = {}

    def spy(model, images, transforms, mean):
        seen["x"], seen["t(x)"] = images, transforms["identity"](images)
        return real(model, images, transforms, mean)

    real = sensitivity.centred_cosines
    monkeypatch.setattr(sensitivity, "centred_cosines", spy)
    out = tmp_path / "out"
    data = str(tmp_path / writer.pattern)
    argv = ["sensitivity", "--model", _zero_cond_model(tmp_path / "m"), "--data", data]
    assert main([*argv, "--cosines-only", "--out", str(out)]) == 0
    assert seen["x"].shape == (len(shapes), 3, 32, 32)
    assert torch.equal(seen["t(x)"], seen["x"])
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["centred_cosine"]["identity"] == pytest.approx(1.0, abs=1e-6)
