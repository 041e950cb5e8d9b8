"""Training's wiring, against independent values: the total loss is the weighted sum of the
objectives' losses, `train.grad_clip` reaches DeepSpeed's config, a constant schedule stays
flat after warmup, label smoothing reaches both LM head paths (a naive smoothed cross-entropy
of the head's logits), and a smoothing of 1 is refused by name.  (A third mutation audit found
each of these unchecked: the accumulation tests build their reference from the same Task.)"""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_clip_batch


def _recipe(**over):
    from mmssl.train.recipe import recipe_from_dict

    d = {
        "name": "x",
        "out_dir": "runs",
        "model": {"name": "test_tiny_clip"},
        "data": {"sources": {"train": {"urls": "synthetic"}}},
        "train": {"steps": 10, "global_batch_size": 4, "micro_batch_size": 4},
        "logging": {"every": 1, "tensorboard": False, "progress": False},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v}
    return recipe_from_dict(d)


def test_total_loss_is_the_weighted_sum_of_the_objectives():
    from mmssl import create_model
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    batch = {"train": tiny_clip_batch()}
    task = Task(
        create_model("test_tiny_clip"),
        {
            "c": ObjectiveConfig(type="clip", weight=0.5),
            "s": ObjectiveConfig(type="siglip", weight=2.0),
        },
    )
    loss, m = task(batch)
    assert float(loss) == pytest.approx(
        0.5 * float(m["loss/c"]) + 2.0 * float(m["loss/s"]), rel=1e-6
    )


def test_grad_clip_reaches_the_deepspeed_config():
    from mmssl.train.ds_config import deepspeed_config

    assert deepspeed_config(_recipe(train={"grad_clip": 0.3}), 1)["gradient_clipping"] == 0.3
    assert deepspeed_config(_recipe(train={"grad_clip": None}), 1)["gradient_clipping"] == 0.0


def test_constant_schedule_is_flat_after_warmup():
    from mmssl.train.engine import lr_schedule

    f = lr_schedule(_recipe(schedule={"kind": "constant", "warmup_steps": 2}))
    assert [f(s) for s in range(10)] == pytest.approx([0.5, 1.0] + [1.0] * 8)
    f = lr_schedule(_recipe(schedule={"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.0}))
    assert f(9) < 0.1


def test_next_token_label_smoothing_reaches_both_head_paths():
    """fused_head true/false are documented as the same loss; with smoothing 0.1 both must
    equal a naive smoothed cross-entropy over the head's logits."""
    import torch.nn.functional as F

    from mmssl import create_model
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    torch.manual_seed(0)
    model = create_model("test_tiny_coca")
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 500, (2, 8), generator=g)
    batch = {"train": {"text": text, "text_mask": torch.ones(2, 8, dtype=torch.bool)}}
    hidden = model.text.forward_tokens(text, torch.ones(2, 8, dtype=torch.bool))
    logits = model.text.head(hidden).float()
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1), label_smoothing=0.1
    )
    for fused in (True, False):
        task = Task(model, {"next_token": ObjectiveConfig(label_smoothing=0.1, fused_head=fused)})
        loss, _ = task(batch)
        assert float(loss) == pytest.approx(float(want), rel=1e-4), fused


def test_label_smoothing_of_one_is_refused_by_name():
    from mmssl.schema import ConfigError
    from mmssl.train.values import check_values

    r = _recipe(
        objectives={"clip": {}},
    )
    r.objectives["clip"].label_smoothing = 1.0
    with pytest.raises(ConfigError, match=r"objectives.clip.label_smoothing must be in \[0, 1\)"):
        check_values(r)
