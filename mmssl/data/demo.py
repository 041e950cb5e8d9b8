"""`mmssl demo-data OUT`: the built-in demo datasets, deterministic from a seed.

Writes:
- `OUT/digits/{train,test}-NNNNNN.tar` + `OUT/digits/manifest.json`: scikit-learn's 1,797
  real 8x8 digits upscaled to SIZE x SIZE PNGs, strokes tinted with one of the 8 hues of
  `captions.COLORS` on black; `txt` from `captions.CAPTION_TEMPLATES` (digit-only,
  colour-only and both, a third each); `json` {digit, color (index into COLORS), index,
  label (= digit)}.  Split 80/20 stratified by (digit, colour).
- `OUT/text/{train,validation}-NNNNNN.tar` + manifest: the `pydoc_data.topics` help
  texts, one document per topic, 90/10 split.
- `OUT/classes_digit.json`, `OUT/classes_color.json`: zero-shot class names and fully
  rendered prompts per class, the built-in `--classes digit` / `color` sets (colour also
  with its templates, `{}` = class name).
- `OUT/demo.json`: the shard patterns and counts of everything above.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import sys
from typing import Any

import numpy as np

from mmssl.cliargs import ArgumentParser, summary
from mmssl.data.captions import (
    BOTH_TEMPLATES,
    COLOR_TEMPLATES,
    COLORS,
    DIGIT_TEMPLATES,
    class_prompts,
    render_caption,
)
from mmssl.data.shards import ShardWriter

DIGIT_SHARD, TEXT_SHARD, VALID_SHARD = 100, 8, 2


def tint(digit8x8: np.ndarray, hue_deg: float, size: int) -> np.ndarray:
    """(8, 8) intensities 0..16 -> (size, size, 3) uint8: stroke = hue at full saturation."""
    from PIL import Image

    gray = Image.fromarray((digit8x8 * (255.0 / 16.0)).round().astype(np.uint8))
    big = np.asarray(gray.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    rgb = np.array(colorsys.hsv_to_rgb(hue_deg / 360.0, 1.0, 1.0))
    return (np.clip(big, 0, 1)[..., None] * rgb * 255.0).round().astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _stratified_test(cells: np.ndarray, rng: np.random.Generator, frac: float) -> np.ndarray:
    """Boolean test mask taking round(frac * n) of every cell (digit, colour)."""
    test = np.zeros(len(cells), bool)
    for cell in np.unique(cells):
        idx = np.flatnonzero(cells == cell)
        rng.shuffle(idx)
        test[idx[: int(round(frac * len(idx)))]] = True
    return test


def write_digits(out: str, seed: int, size: int) -> dict[str, Any]:
    """Write the coloured-digit shards (train/test) under `out`; returns each split's manifest
    entry (pattern, count)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, digits = data.images, data.target.astype(int)
    rng = np.random.default_rng([seed, 0xD161])
    names = list(COLORS)
    colors = rng.integers(0, len(names), len(digits))
    groups = [DIGIT_TEMPLATES, COLOR_TEMPLATES, BOTH_TEMPLATES]
    group = rng.integers(0, 3, len(digits))
    pick = rng.random(len(digits))
    test = _stratified_test(digits * 10 + colors, rng, 0.2)
    counts = {}
    for split, mask in (("train", ~test), ("test", test)):
        with ShardWriter(out, split, max_count=DIGIT_SHARD) as writer:
            for i in np.flatnonzero(mask):
                templates = groups[group[i]]
                template = templates[int(pick[i] * len(templates))]
                color = names[colors[i]]
                writer.write(
                    {
                        "__key__": f"{i:06d}",
                        "png": _png(tint(images[i], COLORS[color], size)),
                        "txt": render_caption(template, int(digits[i]), color),
                        "json": {
                            "digit": int(digits[i]),
                            "color": int(colors[i]),
                            "index": int(i),
                            "label": int(digits[i]),
                        },
                    }
                )
        manifest = writer.close()
        counts[split] = manifest["splits"][split]
    return counts


def write_text(out: str, seed: int) -> dict[str, Any]:
    """Write the help-text shards (train/validation) under `out`; returns each split's manifest
    entry (pattern, count)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    rng = np.random.default_rng([seed, 0x7E87])
    valid = set(rng.permutation(len(keys))[: max(1, len(keys) // 10)].tolist())
    counts = {}
    for split, max_count in (("train", TEXT_SHARD), ("validation", VALID_SHARD)):
        with ShardWriter(out, split, max_count=max_count) as writer:
            for i, key in enumerate(keys):
                if (i in valid) == (split == "validation"):
                    doc = {"__key__": f"{i:04d}", "txt": topics[key], "json": {"topic": key}}
                    writer.write(doc)
        counts[split] = writer.close()["splits"][split]
    return counts


def class_files(out: str) -> None:
    """Zero-shot classes, the prompts of `mmssl eval zeroshot --classes digit` / `color`:
    colour names with templates and rendered prompts; digit words with rendered prompts
    only, as two of the digit templates name the numeral ("the number 7."), which a `{}`
    template filled with the class name cannot say (a file of the other three scored
    another zero-shot top-1 than `--classes digit` on the same model)."""
    names, prompts = class_prompts("digit")
    digits = {"field": "digit", "classnames": names, "prompts": prompts}
    names, prompts = class_prompts("color")
    templates = [t.replace("{color}", "{}") for t in COLOR_TEMPLATES]
    colors = {"field": "color", "classnames": names, "templates": templates, "prompts": prompts}
    for name, obj in (("classes_digit.json", digits), ("classes_color.json", colors)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")


def write_demo(out: str, seed: int = 0, size: int = 32) -> dict[str, Any]:
    """Write everything; returns the contents of OUT/demo.json."""
    os.makedirs(out, exist_ok=True)
    for sub in ("digits", "text"):  # stale shards of another run would join the manifest
        d = os.path.join(out, sub)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.endswith(".tar") or name == "manifest.json":
                    os.remove(os.path.join(d, name))
    info = {
        "seed": seed,
        "size": size,
        "digits": write_digits(os.path.join(out, "digits"), seed, size),
        "text": write_text(os.path.join(out, "text"), seed),
        "colors": list(COLORS),
    }
    class_files(out)
    with open(os.path.join(out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    return info


def main(argv: list[str] | None = None) -> int:
    """`mmssl demo-data OUT`: exit code 0, or 2 on bad input."""
    parser = ArgumentParser(prog="mmssl demo-data", description=summary(__doc__))
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (8..512)")
    args = parser.parse_args(argv)
    if not 8 <= args.size <= 512:
        print(f"mmssl demo-data: error: --size must be in 8..512, got {args.size}", file=sys.stderr)
        return 2
    if not 0 <= args.seed < 2**63:  # numpy seeds are non-negative
        print(
            f"mmssl demo-data: error: --seed must be in 0..2**63-1, got {args.seed}",
            file=sys.stderr,
        )
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"mmssl demo-data: error: {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        info = write_demo(args.out, args.seed, args.size)
    except OSError as err:
        print(f"mmssl demo-data: error: {err}", file=sys.stderr)
        return 2
    d, t = info["digits"], info["text"]
    print(
        f"wrote {d['train']['count']} + {d['test']['count']} digit images and "
        f"{t['train']['count']} + {t['validation']['count']} text documents to {args.out}"
    )
    return 0
