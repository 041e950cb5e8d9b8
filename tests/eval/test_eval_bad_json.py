"""A test shard whose json metadata is damaged is an error naming the sample, in every task
that reads the metadata (an eval that skipped or ignored it would score another test set)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmssl.eval.cli import run_task
from mmssl.eval.features import main as features_main
from mmssl.eval.loading import EvalError


def _shard(path, samples: list[dict[str, bytes]]) -> str:
    """A tar of samples 0000, 0001, ...: each a random 32 px png and the given members."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for k, members in enumerate(samples):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            for ext, data in {"png": buf.getvalue(), **members}.items():
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture()
def bad_json_shard(tmp_path) -> str:
    """4 samples (png, txt, json); sample 0000's json is cut short, the others are labelled."""
    return _shard(
        tmp_path / "badjson.tar",
        [
            {
                "txt": b"caption %d" % k,
                "json": b'{"label": 0,' if k == 0 else b'{"label": %d}' % (k % 2),
            }
            for k in range(4)
        ],
    )


def test_retrieval_names_the_sample_with_damaged_json(tmp_path, tiny_model_dir, bad_json_shard):
    # a JSONDecodeError traceback before
    argv = ["retrieval", "--model", tiny_model_dir, "--data", bad_json_shard]
    with pytest.raises(EvalError, match=r"sample '0000' of .*badjson\.tar: bad_json"):
        run_task([*argv, "--out", str(tmp_path / "ret")])


@pytest.mark.parametrize("fields", [None, "label"])
def test_features_name_the_sample_with_damaged_json(
    tmp_path, capsys, tiny_model_dir, bad_json_shard, fields
):
    # without --fields it wrote a file with no labels at all, and said nothing
    out = tmp_path / "f.safetensors"
    argv = ["--model", tiny_model_dir, "--data", bad_json_shard, "--out", str(out)]
    assert features_main(argv + (["--fields", fields] if fields else [])) == 2
    err = capsys.readouterr().err
    assert "sample '0000' of " in err and "badjson.tar: bad_json" in err
    assert "--fields" not in err  # naming the fields does not get past a damaged sample
    assert not out.exists()


def test_retrieval_reads_captions_json_after_a_byte_order_mark(tmp_path):
    # training and the other tasks dropped the mark; retrieval raised "Unexpected UTF-8 BOM"
    from mmssl.eval.retrieval import _captions_of

    path = tmp_path / "bom.tar"
    with tarfile.open(path, "w") as tar:
        for k in range(2):
            meta = b'\xef\xbb\xbf{"captions": ["a %d", "b %d"]}' % (k, k)
            info = tarfile.TarInfo(f"{k:04d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    assert _captions_of([str(path)], None) == [["a 0", "b 0"], ["a 1", "b 1"]]


def test_features_say_the_fields_were_detected_when_one_is_unreadable(
    tmp_path, capsys, tiny_model_dir
):
    """LAION's json holds fields no one asked for (punsafe NaN): with the fields taken from
    the first sample, the error now says --fields picks those to read."""
    path = _shard(
        tmp_path / "laion.tar",
        [
            {"json": b'{"label": 1, "punsafe": %s}' % (b"NaN" if k == 2 else b"0.1")}
            for k in range(3)
        ],
    )
    argv = [
        "--model",
        tiny_model_dir,
        "--data",
        str(path),
        "--out",
        str(tmp_path / "f.safetensors"),
    ]
    assert features_main(argv) == 2
    err = capsys.readouterr().err
    assert "field 'punsafe' is nan" in err and "--fields picks those to read" in err
    assert features_main([*argv, "--fields", "label"]) == 0


@pytest.mark.parametrize("without", [0, 2])
def test_retrieval_refuses_captions_lists_on_some_samples_only(tmp_path, without):
    """A sample without a `captions` list among samples with one: an error wherever it is.
    First in the shard, it made retrieval score every image on its `txt` alone, silently
    (an easier problem, reported as the normal one)."""
    from mmssl.eval.retrieval import _captions_of

    samples = [
        {"txt": b"t %d" % k, "json": b"{}" if k == without else b'{"captions": ["a", "b"]}'}
        for k in range(4)
    ]
    path = _shard(tmp_path / "mixed.tar", samples)
    with pytest.raises(EvalError, match=f"'000{without}'"):
        _captions_of([path], None)
    # none with a list: the txt captions; all with one: the lists
    assert _captions_of([_shard(tmp_path / "none.tar", [{"json": b"{}"}] * 3)], None) is None
    lists = [{"json": b'{"captions": ["x"]}'}] * 2
    assert _captions_of([_shard(tmp_path / "all.tar", lists)], None) == [["x"], ["x"]]
