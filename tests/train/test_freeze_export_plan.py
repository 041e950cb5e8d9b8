"""train.freeze in export and plan.

- export of a ZeRO-1 bf16 checkpoint from a real DeepSpeed engine with a frozen layer: the
  trained weights are DeepSpeed's own zero_to_fp32 fp32 masters (not the bf16 module copy,
  which `_with_frozen` must not put over them), and the frozen one is the module's weight.
- `mmssl plan` holds frozen weights as weights: the "parameters" memory line of a LiT
  recipe equals the same recipe's without the freeze (the same tensors are held), at ZeRO 3
  partitioned like the rest; gradients and optimizer states shrink.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_process_group")
REPO = Path(__file__).resolve().parents[2]


def test_zero1_bf16_export_keeps_fp32_masters_and_adds_the_frozen_weight(tmp_path):
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mmssl.train.engine import init_distributed
    from mmssl.train.export import _read_state

    init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    model[0].weight.requires_grad_(False)  # frozen
    start0 = model[0].weight.detach().clone()
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=config, dist_init_required=False
    )
    for _ in range(3):
        x = torch.randn(2, 16, dtype=torch.bfloat16)
        engine.backward(engine(x).float().square().mean())
        engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="t")
    assert "0.weight" not in theirs and "1.weight" in theirs  # DeepSpeed leaves it out
    master = theirs["1.weight"].float()
    # the test can see the difference: the fp32 master is not its bf16 rounding
    assert not torch.equal(master, master.bfloat16().float())
    ours = _read_state(tmp_path, "t")
    assert set(ours) == {"0.weight", "1.weight"}
    assert torch.equal(ours["1.weight"], master)
    assert torch.equal(ours["0.weight"], start0.bfloat16().float())  # held in bf16


def _memory(lines: list[str]) -> dict[str, float]:
    out = {}
    for line in lines:
        m = re.match(r"  (parameters|gradients|optimizer states)\s+([\d.]+) GB$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.mark.parametrize(("zero", "gpus"), [("zero3", 2), ("zero2", 2)])
def test_plan_holds_frozen_weights_as_the_unfrozen_run_does(zero, gpus):
    from mmssl.train.plan import plan
    from mmssl.train.recipe import load_recipe

    recipe = str(REPO / "recipes" / "clip_vit_b16.yaml")
    free = load_recipe(recipe, [f"train.deepspeed={zero}"])
    lit = load_recipe(recipe, [f"train.deepspeed={zero}", "train.freeze=[visual]"])
    a = _memory(plan(free, gpus, 80, 300, 0.4, 100))
    b = _memory(plan(lit, gpus, 80, 300, 0.4, 100))
    assert len(a) == len(b) == 3
    assert b["parameters"] == a["parameters"] > 0.1, (a, b)  # every weight, partitioned alike
    assert b["gradients"] < a["gradients"] and b["optimizer states"] < a["optimizer states"]
