"""Fixtures for the data tests (helpers live in data_helpers.py next to this file)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from data_helpers import write_image_shards  # noqa: E402


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_image_shards(str(tmp_path_factory.mktemp("img")))


@pytest.fixture(scope="session")
def tokenizer():
    from mmssl.tokenizer import get_tokenizer

    return get_tokenizer()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # torchvision 0.29 deprecates its decoders on every call; pytest re-enables the warning
    # that mmssl.data.decode silences once per process
    for item in items:
        if "tests/data/" in str(item.fspath):
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io"))
