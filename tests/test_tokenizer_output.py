"""What a tokenizer training leaves in its output folder (mmssl.tokenizer.output): another
kind's file replaced with --overwrite, fewer ids than asked said aloud, and sentencepiece's
too-small vocabulary said in mmssl's terms."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mmssl.tokenizer import META_FILE, get_tokenizer
from mmssl.tokenizer.train import Corpus, train_bpe, train_sentencepiece

TEXTS = ["the digit seven in red ink.", "a blue three.", "café, naïve; 日本語"] * 30


def _rich() -> Corpus:
    from pydoc_data.topics import topics

    return Corpus([topics[k] for k in sorted(topics)[:12]], "pydoc")


def test_overwriting_with_another_kind_leaves_one_tokenizer_file(tmp_path: Path) -> None:
    """sentencepiece, then BPE with overwrite: the .model stayed beside tokenizer.json, and
    without the meta (a kill between the renames) the folder loaded as neither."""
    out = tmp_path / "tok"
    train_sentencepiece(_rich(), out, vocab_size=600)
    train_bpe(_rich(), out, vocab_size=600, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", META_FILE]
    (out / META_FILE).unlink()
    assert get_tokenizer(str(out)).kind == "bpe"


@pytest.mark.parametrize("train", [train_bpe, train_sentencepiece])
def test_fewer_ids_than_asked_is_a_warning(tmp_path: Path, train) -> None:
    with pytest.warns(UserWarning, match=r"ids, fewer than the 5000 asked for") as said:
        meta = train(Corpus(TEXTS, "t"), tmp_path / "small", vocab_size=5000)
    assert meta["vocab_size"] < 5000 and str(meta["vocab_size"]) in str(said[0].message)
    assert said[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough text for the size asked: silent
        train(_rich(), tmp_path / "enough", vocab_size=600)


def test_a_sentencepiece_vocabulary_below_the_corpus_needs_names_the_floor(tmp_path) -> None:
    """sentencepiece's own message advised --character_coverage, which mmssl does not have."""
    out = tmp_path / "tok"
    with pytest.raises(ValueError) as err:
        train_sentencepiece(Corpus(TEXTS, "t"), out, vocab_size=262)
    distinct = len(set("".join(TEXTS)) - set(" "))  # sentencepiece's whitespace is a piece
    assert str(err.value).startswith(
        "sentencepiece training failed: vocab_size 262 is below the "
    ) and str(err.value).endswith(
        " pieces this corpus needs (256 bytes, the special tokens and each distinct "
        "character): raise it"
    )
    assert "character_coverage" not in str(err.value) and distinct > 0
    assert not out.exists()


def test_sentencepiece_too_small_names_the_smallest_vocabulary_that_trains(tmp_path) -> None:
    """The floor the error names: 256 byte pieces + 4 specials (pad, bos, eos, unk) + each
    distinct character (whitespace included: sentencepiece's U+2581 is a piece), and
    sentencepiece itself trains at that size and refuses one below it."""
    texts = ["the digit seven in red ink.", "a blue three.", "café, naïve; 日本語"] * 30
    floor = 256 + 4 + len(set("".join(texts)))  # analytic
    with pytest.raises(ValueError) as err:
        train_sentencepiece(Corpus(texts, "t"), tmp_path / "a", vocab_size=262)
    assert f"vocab_size 262 is below the {floor} pieces" in str(err.value), str(err.value)
    with pytest.raises(ValueError, match=f"below the {floor} pieces"):
        train_sentencepiece(Corpus(texts, "t"), tmp_path / "b", vocab_size=floor - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer ids than asked is fine here
        meta = train_sentencepiece(Corpus(texts, "t"), tmp_path / "c", vocab_size=floor)
    assert meta["vocab_size"] >= floor
