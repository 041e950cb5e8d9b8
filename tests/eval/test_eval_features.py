"""Feature extraction: order by sample index, no duplicated rows, 2 gloo ranks == 1 process."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from distributed_utils import run_distributed

from mmssl.eval.data import shard_urls
from mmssl.eval.features import assemble_by_index, extract_features, main
from mmssl.eval.features_file import load_features
from mmssl.eval.loading import load_model


def test_assemble_by_index_drops_padding_duplicates():
    # rank 0 holds samples 0, 2, 4; rank 1 holds 1, 3 and a padded repeat of 1
    index = torch.tensor([0, 2, 4, 1, 3, 1])
    rows = {"x": torch.tensor([[0.0], [2.0], [4.0], [1.0], [3.0], [99.0]])}
    idx, out = assemble_by_index(index, rows)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    assert out["x"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.slow
def test_features_file(tmp_path, tiny_model_dir, test_shards):
    out = tmp_path / "f.safetensors"
    assert (
        main(
            [
                "--model",
                tiny_model_dir,
                "--data",
                test_shards,
                "--out",
                str(out),
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    f = load_features(out)
    assert f["features"].shape == (12, 32) and f["embeddings"].shape == (12, 16)
    assert f["label"].tolist() == [i % 3 for i in range(12)]
    assert f["sample_index"].tolist() == list(range(12))
    assert f["__key__"] == [f"k{i:04d}" for i in range(12)]
    # the pooled features are the model's, image by image
    model = load_model(tiny_model_dir)
    single = extract_features(model.model, shard_urls(test_shards), model.preprocess, batch_size=1)
    torch.testing.assert_close(f["features"], single["features"])
    assert f["metadata"]["fields"] == "color,index,label"


def test_features_cli_errors(tmp_path, capsys, tiny_model_dir, unlabelled_shards):
    assert (
        main(
            [
                "--model",
                tiny_model_dir,
                "--data",
                unlabelled_shards,
                "--out",
                str(tmp_path / "x.safetensors"),
                "--fields",
                "label",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no 'label' field" in err and "--fields for mmssl features" in err  # its own option
    args = ["--model", tiny_model_dir, "--data", unlabelled_shards, "--out", str(tmp_path)]
    assert main(args) == 2
    assert "is a directory" in capsys.readouterr().err


def _extract_two_ranks(model_dir: str, pattern: str, out: str) -> dict:
    from mmssl import distributed

    loaded = load_model(model_dir)
    feats = extract_features(
        loaded.model,
        shard_urls(pattern),
        loaded.preprocess,
        batch_size=4,
        fields=("label", "w"),
        limit=7,
    )
    assert (
        main(
            [
                "--model",
                model_dir,
                "--data",
                pattern,
                "--out",
                out,
                "--batch-size",
                "3",
                "--limit",
                "7",
                "--fields",
                "label,w",
            ]
        )
        == 0
    )
    return {"rank": distributed.rank(), "feats": feats}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, tiny_model_dir):
    # 7 samples over 2 ranks: rank 0 gets 4, rank 1 gets 3 (uneven, where a sampler would pad).
    # Field w is fractional at even samples (rank 0's: float64) and whole at odd ones (rank
    # 1's: int64): rank 1's int64 bytes were gathered as float64 (1 -> 5e-324)
    import numpy as np
    from eval_helpers import png_bytes

    from mmssl.data.shards import ShardWriter

    writer = ShardWriter(str(tmp_path / "s"), "test", max_count=5)
    rng = np.random.default_rng(0)
    for i in range(12):
        image = png_bytes((rng.random((32, 32, 3)) * 255).astype(np.uint8))
        meta = {"label": i % 3, "w": i + 0.5 if i % 2 == 0 else i}
        writer.write({"__key__": f"k{i:04d}", "png": image, "json": meta})
    writer.close()
    pattern = str(tmp_path / "s" / writer.pattern)
    out = str(tmp_path / "two.safetensors")
    results = run_distributed(_extract_two_ranks, 2, tiny_model_dir, pattern, out)
    loaded = load_model(tiny_model_dir)
    single = extract_features(
        loaded.model,
        shard_urls(pattern),
        loaded.preprocess,
        batch_size=12,
        fields=("label", "w"),
        limit=7,
    )
    assert single["w"].tolist() == [0.5, 1, 2.5, 3, 4.5, 5, 6.5]
    assert len(single["__key__"]) == 7
    for r in results:
        feats = r["feats"]
        assert feats["sample_index"].tolist() == list(range(7))
        assert feats["__key__"] == single["__key__"]
        torch.testing.assert_close(feats["features"], single["features"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats["embeddings"], single["embeddings"], rtol=1e-5, atol=1e-6)
        assert torch.equal(feats["label"], single["label"])
        assert torch.equal(feats["w"], single["w"])
    written = load_features(out)
    torch.testing.assert_close(written["features"], single["features"], rtol=1e-5, atol=1e-6)
    assert written["__key__"] == single["__key__"]
    assert torch.equal(written["w"], single["w"])


def _labelled_file(path, metadata: dict) -> str:
    """Six rows with an int `label`, a float `score` (2.5 at k2) and every non-label tensor."""
    from mmssl.eval.features_file import save_features

    g = torch.Generator().manual_seed(0)
    feats = {
        "features": torch.randn(6, 4, generator=g),
        "embeddings": torch.randn(6, 3, generator=g),
        "sample_index": torch.arange(6),
        "label": torch.tensor([0, 1, 0, 1, 0, 1]),
        "score": torch.tensor([0.0, 1.0, 2.5, 1.0, 0.0, 1.0]),
        "__key__": [f"k{i}" for i in range(6)],
    }
    save_features(path, feats, metadata)
    return str(path)


def _file_labels_both_tasks(path: str, field: str, limit: int | None = None) -> list:
    """The labels the few-shot/linear and the zero-shot readers take from the file."""
    from mmssl.eval.fewshot import split_features
    from mmssl.eval.zeroshot import _features_file

    # no vision digest in these files, so neither reader needs a model; zero-shot reads only
    # the width of its text embeddings (3, as the file's)
    _, a = split_features(path, field, None, 64, limit)
    text = SimpleNamespace(proj=torch.nn.Linear(1, 3, bias=False))
    loaded = SimpleNamespace(model=SimpleNamespace(text=text))
    b = _features_file(path, field, limit, loaded, "embeddings")[field]
    assert a.dtype == b.dtype == torch.int64
    return [a.tolist(), b.tolist()]


def test_features_file_labels_only_from_listed_fields(tmp_path):
    from mmssl.eval.loading import EvalError

    path = _labelled_file(tmp_path / "f.safetensors", {"fields": "label,score"})
    assert _file_labels_both_tasks(path, "label") == [[0, 1, 0, 1, 0, 1]] * 2
    # every sample its own class used to pass without a word (shards refuse the field)
    for field in ("sample_index", "features", "embeddings", "nope"):
        with pytest.raises(
            EvalError, match=rf"no '{field}' labels \(its label fields: label, score\)"
        ):
            _file_labels_both_tasks(path, field)
    # 2.5 used to become class 2 through .long()
    with pytest.raises(EvalError, match=r"f\.safetensors: 'score' is 2\.5 at sample 'k2'"):
        _file_labels_both_tasks(path, "score")
    assert _file_labels_both_tasks(path, "score", limit=2) == [[0, 1]] * 2  # as shards: N read
    # a file without the `fields` record (hand-written, older): any tensor but the features
    old = _labelled_file(tmp_path / "old.safetensors", {})
    assert _file_labels_both_tasks(old, "label") == [[0, 1, 0, 1, 0, 1]] * 2
    with pytest.raises(
        EvalError, match=r"no 'sample_index' labels \(its label fields: label, score\)"
    ):
        _file_labels_both_tasks(old, "sample_index")
    with pytest.raises(EvalError, match=r"'score' is 2\.5 at sample 'k2'"):
        _file_labels_both_tasks(old, "score")


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_large_integer_labels_stay_exact_in_mixed_batches(tmp_path, batch_size):
    # a batch mixing JSON ints and floats became float32: 2**24 + 1 read as 2**24 and still
    # passed as a whole class index
    import numpy as np
    from eval_helpers import png_bytes

    from mmssl.data.shards import ShardWriter
    from mmssl.eval.data import Preprocess, iter_image_batches
    from mmssl.eval.features_file import integer_labels
    from mmssl.eval.loading import EvalError

    def read(labels: list) -> torch.Tensor:
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        writer = ShardWriter(str(out), "test", max_count=10)
        image = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
        for i, label in enumerate(labels):
            writer.write({"__key__": f"k{i}", "png": image, "json": {"label": label}})
        writer.close()
        urls = shard_urls(str(out / writer.pattern))
        batches = iter_image_batches(urls, Preprocess(8), batch_size, fields=("label",))
        column = torch.cat([b["label"] for b in batches])  # as extract_features joins them
        return integer_labels(column, "shards", "label", [f"k{i}" for i in range(len(labels))])

    labels = [2**24 + 1, 1.0, 0, 2**53 + 1, 3.0, 2**62 + 1, -(2**63), 2**63 - 1]
    assert read(labels).tolist() == [int(v) for v in labels]
    assert read(labels).dtype == torch.int64
    for bad in (2.5, 1e30):
        with pytest.raises(EvalError, match=re.escape(f"'label' is {bad} at sample 'k2';")):
            read([2**24 + 1, 1.0, bad, 3])


def _shards_with_reserved_fields(out) -> str:
    """4 labelled samples whose json also holds numbers named like the output's columns."""
    import numpy as np
    from eval_helpers import png_bytes

    from mmssl.data.shards import ShardWriter

    writer = ShardWriter(str(out), "test", max_count=10)
    for i in range(4):
        image = png_bytes(np.full((32, 32, 3), 60 * i, dtype=np.uint8))
        meta = {"label": i % 2, "features": 7, "embeddings": 1.5, "sample_index": 9 - i, "_pos": 3}
        writer.write({"__key__": f"k{i:04d}", "png": image, "json": {**meta, "image": 0}})
    writer.close()
    return str(out / writer.pattern)


@pytest.mark.slow
def test_json_fields_named_like_the_output_columns(tmp_path, capsys, tiny_model_dir):
    """A json field named features, embeddings or sample_index replaced the column of that
    name and extraction failed with a RuntimeError or IndexError."""
    from mmssl.eval.cli import run_task
    from mmssl.eval.loading import EvalError

    shards = _shards_with_reserved_fields(tmp_path / "s")
    out = tmp_path / "f.safetensors"
    # detected: left out, and said so; the columns are the model's
    assert main(["--model", tiny_model_dir, "--data", shards, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    for name in ("embeddings", "features", "image", "sample_index", "_pos"):
        assert repr(name) in said
    assert "left out" in said
    f = load_features(out)
    assert f["metadata"]["fields"] == "label" and f["label"].tolist() == [0, 1, 0, 1]
    assert f["sample_index"].tolist() == [0, 1, 2, 3]
    assert f["features"].shape == (4, 32) and f["embeddings"].shape == (4, 16)
    # requested: refused, one line naming it, no file
    for name in ("features", "embeddings", "sample_index", "image", "_pos"):
        out2 = tmp_path / f"{name}.safetensors"
        argv = ["--model", tiny_model_dir, "--data", shards, "--out", str(out2)]
        assert main([*argv, "--fields", f"label,{name}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmssl features: error:") and "\n" not in err
        assert f"field {name!r}" in err and "reserved" in err and not out2.exists()
    # a task's --label-field too
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", shards, "--classes", "color"]
    with pytest.raises(EvalError, match="field 'sample_index' .*reserved"):
        run_task([*argv, "--label-field", "sample_index", "--out", str(tmp_path / "z")])


def test_text_shards_are_said_to_have_no_image_not_no_label(text_shards: str) -> None:
    """Zero-shot on text shards blamed a missing 'digit' field ("needs labelled shards"),
    where `mmssl features` said what is wrong: the samples have no image."""
    from mmssl.data.errors import DataError
    from mmssl.eval.data import iter_image_batches
    from mmssl.eval.loading import Preprocess

    with pytest.raises(DataError, match="missing_image no .* member; it has: txt"):
        next(iter_image_batches(shard_urls(text_shards), Preprocess(8), 2, fields=("digit",)))
