"""Batch assembly in the worker (`mmssl.data.producer`): json field columns, source mixing."""

from __future__ import annotations

import numpy as np
import torch
from data_helpers import png_bytes

from mmssl.data.pipeline import build_pipeline
from mmssl.data.shards import ShardWriter


def test_json_field_whole_numbers_stay_exact_int64(tmp_path):
    # a class id above 2**24 written as a float (pandas does) or next to a float: float32
    # rounded 16777217 onto 16777216, merging two classes
    labels = [16777217.0, 16777216, 3.0, 2**40 + 1]
    w = ShardWriter(str(tmp_path), "f", max_count=10)
    for i, lab in enumerate(labels):
        w.write(
            {
                "__key__": f"f{i}",
                "png": png_bytes(np.zeros((8, 8, 3), np.uint8)),
                "json": {"label": lab, "score": 0.5 + i, "ok": i % 2 == 0},
            }
        )
    w.close()
    pl = build_pipeline(
        str(tmp_path / w.pattern),
        kind="image",
        batch_size=4,
        mode="epoch",
        image_size=8,
        num_views=0,
        shuffle=1,
        json_fields=("label", "score", "ok"),
    )
    b = next(iter(pl))
    order = [int(k[1:]) for k in b["__key__"]]
    assert b["label"].dtype == torch.int64
    assert b["label"].tolist() == [int(labels[i]) for i in order]
    assert b["score"].dtype == torch.float32
    assert b["score"].tolist() == [0.5 + i for i in order]
    assert b["ok"].dtype == torch.bool and b["ok"].tolist() == [i % 2 == 0 for i in order]
