"""`mmssl demo-data`: counts match the manifest under plain webdataset, split, determinism."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import webdataset as wds

from mmssl.data.captions import COLORS, DIGITS
from mmssl.data.demo import main


def _tree_digest(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo(demo_data: str) -> str:
    """The session's `mmssl demo-data` output (tests/conftest.py), seed 0."""
    return demo_data


def test_counts_match_manifest_with_plain_webdataset(demo):
    for sub, splits in (("digits", ("train", "test")), ("text", ("train", "validation"))):
        manifest = json.load(open(os.path.join(demo, sub, "manifest.json")))
        for shard in manifest["shards"]:
            n = sum(
                1 for _ in wds.WebDataset(os.path.join(demo, sub, shard["url"]), shardshuffle=False)
            )
            assert n == shard["count"]
        for split in splits:
            info = manifest["splits"][split]
            pattern = os.path.join(demo, sub, info["pattern"])
            assert sum(1 for _ in wds.WebDataset(pattern, shardshuffle=False)) == info["count"]
    info = json.load(open(os.path.join(demo, "demo.json")))
    assert info["digits"]["train"]["count"] + info["digits"]["test"]["count"] == 1797


def test_digit_samples_and_stratified_split(demo):
    meta = {}
    for split in ("train", "test"):
        pattern = json.load(open(os.path.join(demo, "digits", "manifest.json")))["splits"][split]
        for s in wds.WebDataset(
            os.path.join(demo, "digits", pattern["pattern"]), shardshuffle=False
        ).decode("rgb8"):
            m = s["json"]  # decode() parses json
            img = s["png"]
            assert img.shape == (32, 32, 3)
            caption = s["txt"]
            names = list(COLORS)
            assert (
                DIGITS[m["digit"]] in caption
                or str(m["digit"]) in caption
                or names[m["color"]] in caption
            )
            meta.setdefault(split, []).append((m["digit"], m["color"], m["index"]))
    test = meta["test"]
    assert 0.18 < len(test) / 1797 < 0.22
    assert {d for d, _, _ in test} == set(range(10)) and {c for _, c, _ in test} == set(range(8))
    assert not {i for *_, i in test} & {i for *_, i in meta["train"]}


def test_classes_files(demo):
    digit = json.load(open(os.path.join(demo, "classes_digit.json")))
    color = json.load(open(os.path.join(demo, "classes_color.json")))
    assert digit["classnames"] == DIGITS and color["classnames"] == list(COLORS)
    assert len(digit["prompts"]) == 10 and "seven" in digit["prompts"][7][0]
    assert all("{}" in t for t in color["templates"])
    # the files hold the built-in sets' prompts, written out here by hand: a file of the
    # digit templates without the numerals' scored another top-1 than `--classes digit`
    assert digit["prompts"][7] == [
        "a photo of the digit seven.",
        "a handwritten seven.",
        "the number 7.",
        "a picture of a seven.",
        "a drawing of the digit 7.",
    ]
    assert "templates" not in digit  # "{}" is the class name: it cannot say "7"
    assert color["prompts"][1] == [
        "something orange.",
        "a orange image.",
        "a drawing in orange ink.",
        "a picture that is orange.",
    ]
    from mmssl.eval.zeroshot import builtin_classes, load_classes

    for name in ("digit", "color"):
        spec = load_classes(os.path.join(demo, f"classes_{name}.json"))
        assert spec == builtin_classes(name) and spec.field == name


@pytest.mark.slow
def test_deterministic_from_seed(demo, tmp_path):
    assert main([str(tmp_path / "again"), "--seed", "0"]) == 0
    assert _tree_digest(demo) == _tree_digest(str(tmp_path / "again"))


def test_bad_arguments(tmp_path, capsys):
    assert main([str(tmp_path / "x"), "--size", "4"]) == 2
    (tmp_path / "file").write_text("x")
    assert main([str(tmp_path / "file")]) == 2
    assert main([str(tmp_path / "file" / "below")]) == 2  # OSError: a file in the path
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("mmssl demo-data: error:") for line in err)
