"""Fixtures for the eval tests (helpers live in eval_helpers.py next to this file)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from eval_helpers import make_tiny_model_dir, write_labelled_shards, write_text_shards  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from mmssl.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> str:
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("model")), tokenizer)


@pytest.fixture(scope="session")
def unprojected_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> str:
    """test_tiny_clip without projections (embed_dim null): encode_* give pooled features."""
    return make_tiny_model_dir(
        str(tmp_path_factory.mktemp("unprojected")), tokenizer, embed_dim=None
    )


@pytest.fixture(scope="session")
def test_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_labelled_shards(str(tmp_path_factory.mktemp("test")), n=12, split="test")


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_labelled_shards(str(tmp_path_factory.mktemp("train")), n=30, split="train")


@pytest.fixture(scope="session")
def unlabelled_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_labelled_shards(str(tmp_path_factory.mktemp("nolab")), n=4, labels=False)


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    docs = [
        "The quick brown fox jumps over the lazy dog.",
        "A red seven is a digit drawn in red ink.",
        "def f(x):\n    return x + 1\n",
        "Lists are mutable sequences, typically used to store collections.",
    ]
    return write_text_shards(str(tmp_path_factory.mktemp("text")), docs)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # torchvision 0.29 deprecates its decoders on every call
    for item in items:
        if "tests/eval/" in str(item.fspath):
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io"))
