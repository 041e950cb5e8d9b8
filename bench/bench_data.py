"""Data pipeline throughput: decode + two augmented views + descriptors, vs two baselines.

    python bench/bench_data.py [--demo DIR] [--samples N] [--size 224] [--torch-ref]

Measured in one process with one thread (a DataLoader worker's budget) as samples per
CPU-second of this process (`time.process_time`), so other jobs on a shared machine do
not skew the ratios; on an idle core that equals samples/s.  Each method is timed over
--samples samples (the 224 px set: 1/16 of it; webdataset, 16x slower: 1/16 of each) in each
of --rounds interleaved rounds (the order rotated every round, as `common.alternate`), and
reported as the median of the rounds, as the other benches report steps: the ratios are
medians over medians, with the range of the rounds' own ratios beside them.  Runs of
0.1-0.2 s moved the 32 px ratio by +-0.2 on this shared VM, runs of ~1 s much less; the
best of the rounds, reported before, put the 32 px ratio at 0.80, 0.87 and 0.93 in three
runs of the same code (a single fast round of the ceiling set it).  Methods:
- decode only (the ceiling): the same tar reader (`iter_shard`) and image decoder
  (`decode_image`) as mmssl, then stacking the batch to float in [0, 1]; no shuffle
  buffer, no caption decode, no augmentation.  A faster reader or decoder speeds up both
  sides, so it lowers the ratio; the ratio prices the views + descriptors + streaming;
- decode only, huge pages: the same, with the float batch in memory from
  `mmssl.data.buffers` as mmssl's views are (the "huge" ratio).  It is the stricter
  ceiling: at 224 px page faults are most of the plain ceiling's stacking cost;
- mmssl: decode + 2 views + v1 descriptors (`build_pipeline` with its defaults, e.g. the
  1000-sample shuffle window; hue_mode hsv and yiq), views rendered by the compiled
  renderer (`mmssl.data.fastviews`) when numba is installed;
  `--torch-ref` adds the torch reference path (`AugmentConfig(backend="torch")`);
- webdataset + torchvision: `wds.WebDataset(...).decode("pil")` with the SimCLR/BYOL
  torchvision transforms (RandomResizedCrop, flip, ColorJitter p=0.8, grayscale p=0.2,
  GaussianBlur p=0.5) applied twice per sample, then `.batched`.
Datasets: the demo digits (32 x 32 PNG) and synthetic 224 x 224 JPEGs.
At 224 px a batch's float tensors are 38 MB (the ceiling's one image) and 77 MB (two
views): above glibc's 32 MB mmap threshold, so every batch page-faults them in afresh.
With 4 KiB pages that costs about as much as the decode itself; mmssl's views and the
second ceiling take transparent huge pages through numpy (`mmssl.data.buffers`).
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from statistics import median

import numpy as np
import torch

from mmssl.cliargs import summary
from mmssl.data import buffers
from mmssl.data.augment import AugmentConfig
from mmssl.data.decode import decode_image, find_image
from mmssl.data.errors import SkipCounter
from mmssl.data.pipeline import build_pipeline
from mmssl.data.shards import ShardWriter
from mmssl.data.tario import iter_shard
from mmssl.data.urls import expand_urls

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

BATCH = 64


def synthetic_jpegs(out: str, n: int, size: int) -> str:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    w = ShardWriter(out, "syn", max_count=max(1, n // 4))
    for i in range(n):
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = rng.integers(0, size, 2)
            d.ellipse(
                [int(x0), int(y0), int(x0) + 40, int(y0) + 30],
                fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
            )
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        w.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": "x"})
    w.close()
    return os.path.join(out, w.pattern)


def decode_only(pattern: str, n: int, huge_pages: bool = False) -> float:
    urls = expand_urls(pattern)
    counter = SkipCounter()
    t = time.process_time()
    done, imgs = 0, []
    for url in itertools.cycle(urls):
        for _, files in iter_shard(url, counter):
            imgs.append(decode_image(find_image(files)))
            if len(imgs) == BATCH:
                if huge_pages:  # the float batch in memory from mmssl.data.buffers
                    x = torch.stack(imgs)
                    buffers.empty(*x.shape).copy_(x).div_(255.0)
                else:
                    torch.stack(imgs).float().div_(255.0)
                imgs, done = [], done + BATCH
            if done >= n:
                return done / (time.process_time() - t)
    return 0.0


def mmssl_views(pattern: str, n: int, size: int, hue_mode: str, backend: str = "auto") -> float:
    pl = build_pipeline(
        pattern,
        batch_size=BATCH,
        rank=0,
        world_size=1,
        num_workers=0,
        image_size=size,
        num_views=2,
        return_image=False,
        augment=AugmentConfig(hue_mode=hue_mode, backend=backend),
    )
    it = iter(pl)
    next(it)  # warm-up: opens shards, first-call allocations
    t = time.process_time()
    done = 0
    for b in it:
        assert len(b["views"]) == 2 and b["aug"][0].shape == (BATCH, 13)
        done += BATCH
        if done >= n:
            break
    return done / (time.process_time() - t)


def webdataset_views(pattern: str, n: int, size: int) -> float:
    import webdataset as wds
    from torchvision import transforms as T

    k = max(3, int(0.1 * size) // 2 * 2 + 1)
    view = T.Compose(
        [
            T.RandomResizedCrop(size, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.5),
            T.ToTensor(),
        ]
    )

    def two(sample):
        img = sample["png"] if "png" in sample else sample["jpg"]
        return view(img), view(img)

    ds = (
        wds.WebDataset(pattern, shardshuffle=False, repeat=True, empty_check=False)
        .decode("pil")
        .map(two)
        .batched(BATCH)
    )
    it = iter(ds)
    next(it)
    t = time.process_time()
    done = 0
    for _ in it:
        done += BATCH
        if done >= n:
            break
    return done / (time.process_time() - t)


def run(name: str, pattern: str, n: int, size: int, rounds: int, torch_ref: bool) -> None:
    """The median of `rounds` interleaved rounds: the machine may be shared, so alternate."""
    methods = {
        "decode": lambda: decode_only(pattern, n),
        "decode huge": lambda: decode_only(pattern, n, huge_pages=True),
        "hsv": lambda: mmssl_views(pattern, n, size, "hsv"),
        "yiq": lambda: mmssl_views(pattern, n, size, "yiq"),
        "wds": lambda: webdataset_views(pattern, max(4 * BATCH, n // 16), size),
    }
    if torch_ref:
        methods["hsv torch"] = lambda: mmssl_views(pattern, n, size, "hsv", "torch")
        methods["yiq torch"] = lambda: mmssl_views(pattern, n, size, "yiq", "torch")
    decode_only(pattern, BATCH)  # warm-up: imports and first-call allocations
    rates = measure(methods, rounds)
    dec, huge, wd = rates["decode"], rates["decode huge"], rates["wds"]
    print(
        f"\n{name}: {n} samples (webdataset {max(4 * BATCH, n // 16)}) x median of {rounds} "
        f"rounds, batch {BATCH}, 1 thread, samples per CPU-second"
    )
    print(f"{_rate('decode only (ceiling)', median(dec))}  (same reader + decoder, no views)")
    print(f"{_rate('decode only, huge pages', median(huge))}  (its float batch as mmssl's views)")
    renderer = "numba" if _has_numba() else "torch: numba not installed"
    for label in [k for k in rates if k not in ("decode", "decode huge", "wds")]:
        path = "torch" if label.endswith("torch") else renderer
        print(row(label, rates[label], dec, huge, wd, path))
    print(_rate("webdataset + torchvision", median(wd)))
    sys.stdout.flush()


def measure(methods: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each method's rate in every round, the order rotated every round (so that no method
    always runs first, or always after the same one)."""
    names = list(methods)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            rates[name].append(methods[name]())
    return rates


def _rate(name: str, v: float) -> str:
    """A printout line's method name, padded to the longest, and its samples/s."""
    return f"  {name:<33}{v:9.0f} samples/s"


def row(
    label: str, v: list[float], dec: list[float], huge: list[float], wd: list[float], path: str
) -> str:
    """The printout line of mmssl's pipeline with hue mode `label` ("hsv", "hsv torch",
    ...): the median of its per-round samples/s `v`, that over the medians of the
    decode-only ceiling `dec`, the ceiling with huge pages `huge` and webdataset `wd`, the
    range of its ratio to the ceiling within each round, and the renderer `path` that drew
    the views."""
    m = median(v)
    per_round = [a / b for a, b in zip(v, dec)]
    return (
        f"{_rate(f'mmssl 2 views + desc ({label})', m)}  {m / median(dec):5.2f}x decode  "
        f"{m / median(huge):5.2f}x huge  {m / median(wd):5.2f}x webdataset  [{path}]  "
        f"(rounds {min(per_round):.2f}-{max(per_round):.2f}x decode)"
    )


def _has_numba() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--demo", default=None, help="demo-data dir (written if missing)")
    parser.add_argument("--samples", type=int, default=16384)
    # 2 px at least: torchvision's GaussianBlur (kernel 3) reflect-pads 1 px on each side
    parser.add_argument("--size", type=int, default=224, help="JPEG side in px, >= 2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["demo", "jpeg"], default=None)
    parser.add_argument(
        "--torch-ref", action="store_true", help="also time the torch reference renderer"
    )
    args = parser.parse_args(argv)
    problem = common.args_problem(args, {"samples": 1, "size": 2, "rounds": 1})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo or os.path.join(tmp, "demo")
        if not os.path.isfile(os.path.join(demo, "digits", "manifest.json")):
            from mmssl.data.demo import write_demo

            write_demo(demo)
        if args.only in (None, "demo"):
            digits = os.path.join(demo, "digits", "train-{000000..000014}.tar")
            run("demo digits 32 px PNG", digits, args.samples, 32, args.rounds, args.torch_ref)
        if args.only in (None, "jpeg"):
            pattern = synthetic_jpegs(os.path.join(tmp, "syn"), 256, args.size)
            n = max(256, args.samples // 16)
            run(
                f"synthetic {args.size} px JPEG", pattern, n, args.size, args.rounds, args.torch_ref
            )
    print(f"load average at end: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
