"""The versioned augmentation descriptor layout."""

from __future__ import annotations

import pytest
import torch

from mmssl.descriptor import DESCRIPTOR_V1, check_descriptor, get_layout


def test_v1_layout_is_the_cassle_layout() -> None:
    layout = get_layout("v1")
    assert layout is DESCRIPTOR_V1 and layout.version == "v1" and layout.dim == 13
    assert layout.names == ("blur", "color", "color_diff", "crop", "grayscale")
    assert list(layout.names) == sorted(layout.names)
    spans = {g.name: (g.slice.start, g.slice.stop) for g in layout.groups}
    assert spans == {
        "blur": (0, 1),
        "color": (1, 5),
        "color_diff": (5, 8),
        "crop": (8, 12),
        "grayscale": (12, 13),
    }
    assert layout.binary_groups == ("grayscale",)


def test_neutral_descriptor_is_a_full_image_crop() -> None:
    t = DESCRIPTOR_V1.neutral_tensor()
    expected = torch.zeros(13)
    expected[8:12] = torch.tensor([0.5, 0.5, 1.0, 1.0])
    assert t.equal(expected)
    batch = DESCRIPTOR_V1.neutral_tensor(3)
    assert batch.shape == (3, 13) and batch[2].equal(expected)
    batch[0, 0] = 1.0  # a copy, not a view of shared storage
    assert batch[1, 0] == 0.0


def test_layout_serialises_and_describes() -> None:
    d = DESCRIPTOR_V1.to_dict()
    assert d["version"] == "v1" and d["dim"] == 13 and len(d["groups"]) == 5
    assert d["groups"][4] == {"name": "grayscale", "start": 12, "dim": 1, "binary": True}
    assert DESCRIPTOR_V1.describe().startswith("v1[13]: blur 0:1, color 1:5")
    assert DESCRIPTOR_V1.group("crop").dim == 4
    with pytest.raises(KeyError, match="no group 'flip'"):
        DESCRIPTOR_V1.group("flip")


def test_check_descriptor_accepts_v1() -> None:
    check_descriptor(torch.zeros(13))
    check_descriptor(torch.zeros(4, 13), "v1")
    check_descriptor(torch.zeros(2, 4, 13, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "t, version, match",
    [
        (torch.zeros(4, 12), "v1", r"shape \(4, 12\), expected \(\.\.\., 13\) for layout v1\[13\]"),
        (torch.zeros(4, 14), "v1", "blur 0:1"),
        (torch.zeros(()), "v1", "expected"),
        (torch.zeros(4, 13), "v2", "unknown augmentation descriptor version 'v2'"),
        (torch.zeros(4, 13, dtype=torch.long), "v1", "must be floating point"),
        ([0.0] * 13, "v1", "must be a tensor"),
    ],
)
def test_check_descriptor_rejects(t, version: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_descriptor(t, version)
