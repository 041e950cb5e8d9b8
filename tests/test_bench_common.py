"""bench/common.py: the helpers behind the benches' printed figures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_bf16_master_decays_what_mmssl_training_decays() -> None:
    """The "bf16 weights + fp32 master" rows group weight decay as mmssl's trainer does: the
    (1, 1, D) class token and the (1, N, D) position table are not decayed."""
    import common

    from mmssl.models import create_model
    from mmssl.train.engine import param_groups

    model = create_model("test_tiny_vit")
    expected = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.05)}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model_ids = [id(p) for p in model.parameters() if p.requires_grad]
    master = common.Bf16Master(model, wd=0.05)
    name_of = {id(m): n for n, m in zip(names, master.master)}
    groups = {
        g["weight_decay"]: {name_of[id(m)] for m in g["params"]}
        for g in master.optimizer.param_groups
    }
    assert {"visual.cls_token", "visual.pos_embed"} <= groups[0.0]
    assert not {"visual.cls_token", "visual.pos_embed"} & groups[0.05]
    id_of = dict(zip(names, model_ids))
    for wd, group in groups.items():
        assert {id_of[n] for n in group} == expected[wd]
