"""Every objective, and a conditioned encoder, trains at `precision: bf16` through the real
engine, with the losses of the fp32 run on the same weights and batches to bf16's precision.
DeepSpeed's bf16 casts the whole Task (heads included) to bf16; an objective that fed its
head fp32 features stopped at step 0 (AugSelf: "mat1 and mat2 must have the same dtype")."""

from __future__ import annotations

import pytest
import torch

from mmssl.train.recipe import recipe_from_dict, validate

pytestmark = pytest.mark.usefixtures("one_process_group")
STEPS = 2

OBJECTIVES = {
    "clip": {"source": "train", "positives": "caption"},
    "siglip": {"source": "train", "weight": 0.5},
    "simclr": {"source": "train", "projector_dim": 16},
    "augself": {"source": "train", "hidden": 16, "weight": 0.5},
    "hssl": {"source": "train", "weight": 0.3},
    "next_token": {"source": "train", "weight": 0.25},
    "captioning": {"source": "train", "weight": 0.25, "label_smoothing": 0.1},
}


TINY_COCA = {
    "name": "test_tiny_coca",
    "overrides": {"vision": {"pos_embed": "rope", "class_token": False, "pool": "mean"}},
}
# conditioned on each view's descriptor: adaLN-Zero blocks and a hypernetwork projector
CONDITIONED = {
    "name": "test_tiny_simclr",
    "overrides": {
        "vision": {"cond_dim": 16},
        "condition": {"dim": 16},
        "projector": {"cond": "hyper", "hyper_rank": 4},
    },
}


def _losses(precision: str, objectives: dict, model: dict) -> list[dict[str, float]]:
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.engine import init_distributed, initialize
    from mmssl.train.loop import to_device
    from mmssl.train.streams import build_streams
    from mmssl.train.tasks import Task

    recipe = recipe_from_dict(
        {
            "model": model,  # (it was always test_tiny_coca: the conditioned case was not)
            "data": {"sources": {"train": {"urls": "synthetic", "kind": "image_text"}}, "views": 2},
            "objectives": objectives,
            "precision": precision,
            "optim": {"impl": "torch", "lr": 1e-3},
            "schedule": {"kind": "constant"},
            "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 4},
        }
    )
    resolved = validate(recipe, world_size=1)
    init_distributed()
    torch.manual_seed(0)
    task = Task(MultimodalModel(resolved.model), recipe.objectives)
    engine = initialize(task, recipe, resolved.ds_config)
    stream = build_streams(recipe, resolved.model, 0, 1)["train"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = []
    for _ in range(STEPS):
        torch.manual_seed(1)  # the same fibers (hssl) in both runs
        loss, metrics = engine({"train": to_device(stream.next(), torch.device("cpu"), dtype)})
        engine.backward(loss)
        engine.step()
        out.append({k: float(v) for k, v in metrics.items() if k.startswith("loss/")})
    return out


def test_descriptors_stay_fp32_on_the_device() -> None:
    """The views go to the training dtype, the descriptors do not: AugSelf regresses their
    differences in fp32, which bf16 had rounded (0.02 apart by up to 0.005)."""
    from mmssl.train.loop import to_device

    aug = [torch.full((2, 13), 0.51), torch.full((2, 13), 0.53)]
    batch = {"views": [torch.rand(2, 3, 8, 8)] * 2, "aug": aug, "label": torch.arange(2)}
    moved = to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert [v.dtype for v in moved["views"]] == [torch.bfloat16] * 2
    assert [a.dtype for a in moved["aug"]] == [torch.float32] * 2
    assert torch.equal(moved["aug"][1] - moved["aug"][0], aug[1] - aug[0])
    assert moved["label"].dtype == torch.int64


@pytest.mark.parametrize(
    "model, objectives",
    [
        (TINY_COCA, OBJECTIVES),
        # the model's conditioned projector: simclr without a head of its own (augself is
        # refused with a descriptor-conditioned backbone, which would read its targets)
        (CONDITIONED, {"simclr": {"source": "train"}}),
    ],
    ids=["every objective", "conditioned encoder"],
)
def test_objectives_train_in_bf16_as_in_fp32(model: dict, objectives: dict) -> None:
    fp32 = _losses("fp32", objectives, model)
    bf16 = _losses("bf16", objectives, model)
    assert set(bf16[0]) == {f"loss/{k}" for k in objectives}
    for step32, step16 in zip(fp32, bf16):
        for key, value in step32.items():
            assert step16[key] == pytest.approx(value, rel=0.02, abs=0.01), key
