"""Bad bench arguments exit 2 with one line, before any model is built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("value", ["9,5", "0,20", "5", "a,b"])
def test_clip_caption_tokens_must_be_an_increasing_pair(value: str, capsys) -> None:
    import bench_clip

    assert bench_clip.main(["--caption-tokens", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --caption-tokens must be LO,HI with 1 <= LO < HI"]
