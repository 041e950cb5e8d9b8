"""The seeds of a recipe's sources (`streams.source_seeds`): two recipe sources over the same
shards draw their own shards, a single source (and the first of several) streams as with the
recipe seed, and a checkpoint saved under the old seeding is refused when it would change."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from train_helpers import RECIPES, tiny_overrides

from mmssl.train.recipe import Recipe, load_recipe, validate
from mmssl.train.streams import build_streams

pytestmark = [
    pytest.mark.usefixtures("one_process_group"),
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
]
BATCHES = 40  # x 8 samples: about three of the demo's ~100-sample shards per source


def _recipe(tmp_path: Path, demo: str, sources: list[str]) -> Recipe:
    """CLIP on the first source and (with two) SimCLR on the second, all over the same
    image-text shards of the demo digits."""
    urls = f"{demo}/digits/train-{{000000..000014}}.tar"
    objectives = {"clip": {"source": sources[0]}}
    if len(sources) > 1:
        objectives["simclr"] = {"source": sources[1]}
    recipe = {
        "name": "seeds",
        "out_dir": str(tmp_path),
        "model": {"name": "test_tiny_clip", "overrides": {"text": {"vocab_size": 8192}}},
        "data": {"views": 2, "workers": 0, "sources": {s: {"urls": urls} for s in sources}},
        "objectives": objectives,
        "train": {"steps": 2, "global_batch_size": 8, "micro_batch_size": 8},
    }
    path = tmp_path / "seeds.yaml"
    path.write_text(json.dumps(recipe))
    return load_recipe(str(path))


def _keys(recipe: Recipe) -> dict[str, list[str]]:
    streams = build_streams(recipe, validate(recipe).model, 0, 1)
    return {n: [k for _ in range(BATCHES) for k in s.next()["__key__"]] for n, s in streams.items()}


def _shard_order(demo: str, keys: list[str]) -> list[int]:
    """The demo shards `keys` came from, in order of first appearance."""
    shard_of = {}
    for i, tar in enumerate(sorted(Path(demo, "digits").glob("train-*.tar"))):
        with tarfile.open(tar) as t:
            shard_of.update({n.split(".")[0]: i for n in t.getnames()})
    order: list[int] = []
    for key in keys:
        if shard_of[key] not in order:
            order.append(shard_of[key])
    return order


def test_two_sources_over_the_same_shards_draw_their_own_shards(
    demo_data: str, tmp_path: Path
) -> None:
    """Two recipe sources over the same shards (CLIP and SimCLR reading them under two names)
    drew the same shard indices in lockstep, seeded alike; now each draws its own."""
    keys = _keys(_recipe(tmp_path, demo_data, ["a", "b"]))
    a, b = (_shard_order(demo_data, keys[n]) for n in ("a", "b"))
    assert len(a) >= 3 and len(b) >= 3
    assert a[:3] != b[:3], (a, b)


def test_one_source_and_the_first_of_two_stream_as_with_the_recipe_seed(
    demo_data: str, tmp_path: Path
) -> None:
    """A single-source run streams as a pipeline seeded with data.seed (as before the
    per-source seeds, so its checkpoints resume), and so does the first source of a
    two-source run."""
    from mmssl.data.pipeline import Source, build_pipeline

    def direct(seed: int) -> list[str]:
        loader = build_pipeline(
            sources=[Source(f"{demo_data}/digits/train-{{000000..000014}}.tar", name="a")],
            batch_size=8,
            seed=seed,
            shuffle=256,  # the recipe's default
            rank=0,
            world_size=1,
            num_workers=0,
            image_size=32,
            num_views=2,
            return_image=False,
        )
        it = iter(loader)
        return [k for _ in range(BATCHES) for k in next(it)["__key__"]]

    one = _recipe(tmp_path, demo_data, ["a"])
    assert _keys(one)["a"] == direct(one.data.seed)
    two = _recipe(tmp_path, demo_data, ["a", "b"])
    assert _keys(two)["a"] == direct(two.data.seed)


def test_source_seeds_of_a_recipe(demo_data: str, tmp_path: Path) -> None:
    """data.seed for a single source and the first of several; the seed of its name (crc32,
    the same in every process, unlike hash) for the others."""
    from mmssl.train.streams import source_seed, source_seeds

    one = _recipe(tmp_path, demo_data, ["a"])
    assert source_seeds(one) == {"a": one.data.seed}
    two = _recipe(tmp_path, demo_data, ["a", "b"])
    assert source_seeds(two) == {"a": two.data.seed, "b": source_seed(two.data.seed, "b")}
    assert source_seed(0, "b") == (0x71BEEFF9 + 1) << 32  # zlib.crc32(b"b")
    assert source_seed(5, "b") == source_seed(0, "b") + 5


def test_synthetic_sources_keep_the_recipe_seed(tmp_path: Path) -> None:
    """A synthetic source's seed defines its data (the class prototypes): not re-seeded, and
    not counted as a first source either."""
    recipe = tmp_path / "s.yaml"
    recipe.write_text(
        json.dumps(
            {
                "data": {
                    "seed": 7,
                    "sources": {
                        "syn": {"urls": "synthetic"},
                        "a": {"urls": "x/{0..3}.tar"},
                        "b": {"urls": "x/{0..3}.tar"},
                    },
                },
                "objectives": {
                    "clip": {"source": "syn"},
                    "simclr": {"source": "a"},
                    "siglip": {"source": "b"},
                },
            }
        )
    )
    from mmssl.train.streams import source_seed, source_seeds

    seeds = source_seeds(load_recipe(str(recipe)))
    assert seeds == {"syn": 7, "a": 7, "b": source_seed(7, "b")}


def test_a_multi_source_checkpoint_of_the_old_seeding_is_refused_on_resume(
    demo_data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint's run record holds the source seeding it was saved under.  One saved with
    several shard sources before the field existed (every source seeded with data.seed) is
    refused before anything is loaded, in one line saying why and what to do; under this
    seeding it resumes."""
    from mmssl.train.checkpoint import write_manifest
    from mmssl.train.cli import main
    from mmssl.train.loop import train

    quick = str(RECIPES / "quickstart.yaml")  # two shard sources: digits and text
    args = [quick, *tiny_overrides(demo_data, str(tmp_path), "q"), "train.steps=2"]
    recipe = load_recipe(quick, [*args[1:], "train.stop_at=1"])
    train(recipe, validate(recipe))
    record_path = tmp_path / "q" / "checkpoints" / "step_00000001" / "mmssl_run.json"
    record = json.loads(record_path.read_text())
    seeding = record.pop("source_seeding", None)  # as the code before per-source seeds wrote it
    record_path.write_text(json.dumps(record))
    write_manifest(record_path.parent, 1)  # the record is hashed: as saved, not damaged
    before = (tmp_path / "q" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mmssl train: error: checkpoint "), last
    assert "seeded every data source with data.seed" in last and "digits, text" in last, last
    assert "start a new run" in last, last
    assert (tmp_path / "q" / "metrics.jsonl").read_text() == before
    assert seeding == 2  # what this version writes: it resumes
    record["source_seeding"] = seeding
    record_path.write_text(json.dumps(record))
    write_manifest(record_path.parent, 1)
    assert main(args) == 0
    assert "- steps: 1 -> 2 of 2" in (tmp_path / "q" / "summary.md").read_text()


def test_held_out_sources_get_their_own_seeds(tmp_path: Path) -> None:
    """The eval streams follow the same rule: two held-out sources over the same shards do
    not draw in lockstep (each eval stream is then offset by 1 from its seed)."""
    recipe = tmp_path / "e.yaml"
    shards = {"urls": "x/{0..3}.tar"}
    recipe.write_text(
        json.dumps(
            {
                "data": {
                    "seed": 3,
                    "sources": {"a": shards, "b": shards, "ta": shards, "tb": shards},
                },
                "objectives": {"clip": {"source": "a"}, "simclr": {"source": "b"}},
                "eval": {"every": 1, "sources": {"a": "ta", "b": "tb"}},
            }
        )
    )
    from mmssl.train.streams import eval_source_seeds, source_seed

    assert eval_source_seeds(load_recipe(str(recipe))) == {"ta": 3, "tb": source_seed(3, "tb")}


def test_a_held_out_synthetic_source_draws_from_the_training_data(tmp_path: Path) -> None:
    """The eval stream's seed offset made a synthetic held-out source from other class
    prototypes (pixels up to 0.99 apart): another dataset, whose eval loss rose above chance
    while training fit.  Now it draws other samples of the training prototypes."""
    import torch

    from mmssl.train.streams import build_stream

    path = tmp_path / "h.yaml"
    path.write_text(
        json.dumps(
            {
                "data": {
                    "sources": {"train": {"urls": "synthetic"}, "held": {"urls": "synthetic"}}
                },
                "objectives": {"clip": {"source": "train"}},
                "eval": {"every": 1, "sources": {"train": "held"}},
                "train": {"global_batch_size": 64, "micro_batch_size": 64},
            }
        )
    )
    recipe = load_recipe(str(path))
    resolved = validate(recipe, world_size=1)
    sources = recipe.data.sources
    train = build_stream("train", sources["train"], recipe, resolved.model, 0, 1)
    held = build_stream("held", sources["held"], recipe, resolved.model, 0, 1, seed_offset=1)
    assert torch.equal(held.protos, train.protos)  # the same dataset
    a, b = train.next(), held.next()
    assert not torch.equal(a["image"], b["image"])  # other samples of it
    # each held-out image is its class prototype plus the training noise (0.2, clamped)
    residual = b["image"] - train.protos[b["label"]]
    assert residual.abs().mean() < 0.2


def _sources_only(**sources: str):  # type: ignore[no-untyped-def]
    """What streams._keyed reads of a recipe: data.seed and each source's urls."""
    from types import SimpleNamespace

    return SimpleNamespace(
        data=SimpleNamespace(
            seed=7, sources={k: SimpleNamespace(urls=v) for k, v in sources.items()}
        )
    )


def test_the_first_shard_source_after_a_synthetic_one_keeps_data_seed() -> None:
    """Synthetic sources and the first shard source keep data.seed (runs with one shard
    source stream and resume as before keyed seeding), also behind a synthetic source."""
    from mmssl.train.streams import _keyed, source_seed

    r = _sources_only(
        syn="synthetic", imgs="/d/a-{000000..000001}.tar", more="/d/b.tar", syn2="synthetic"
    )
    assert _keyed(r, ["syn", "imgs", "more", "syn2"]) == {
        "syn": 7,
        "imgs": 7,
        "more": source_seed(7, "more"),
        "syn2": 7,
    }
