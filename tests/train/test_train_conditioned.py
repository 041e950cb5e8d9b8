"""Conditioned SimCLR through the Task: each view conditioned on its own descriptor."""

from __future__ import annotations

import torch

import mmssl
from mmssl.train.recipe import ObjectiveConfig
from mmssl.train.tasks import Task


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]
    return {"digits": {"views": views, "aug": [torch.rand(6, 13, generator=g) for _ in views]}}


def test_conditioned_task_equals_plain_at_init_and_trains_gamma():
    torch.manual_seed(0)
    objectives = {"simclr": ObjectiveConfig(source="digits")}
    plain = mmssl.create_model("test_tiny_simclr")
    cond = mmssl.create_model(
        "test_tiny_simclr",
        vision={"cond_dim": 16},
        condition={"dim": 16},
        projector={"cond": "hyper", "hyper_rank": 4},
    )
    cond.load_state_dict(plain.state_dict(), strict=False)
    batch = _batch()
    loss_plain, _ = Task(plain, objectives)(batch)
    task = Task(cond, objectives)
    loss_cond, _ = task(batch)
    torch.testing.assert_close(loss_cond, loss_plain, atol=1e-6, rtol=1e-6)
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        task(batch)[0].backward()
        opt.step()
    assert cond.conditioner.net[0].weight.grad.abs().sum() > 0
    # The Task conditions each view on its own descriptor: equal to the loss written out.
    from mmssl.objectives import nt_xent_loss

    views, augs = batch["digits"]["views"], batch["digits"]["aug"]
    z = []
    for v, a in zip(views, augs):
        c = cond.condition(a)
        z.append(cond.project(cond.forward_features(v, c)["pooled"], c))
    torch.testing.assert_close(task(batch)[0], nt_xent_loss(z[0], z[1], 0.1), atol=1e-6, rtol=1e-6)


def test_hssl_objective_through_the_task_equals_the_loss_written_out():
    from mmssl.models.lifting import remove_structure, translation_lift
    from mmssl.objectives.hssl import HSSLLoss

    model = mmssl.create_model("test_tiny_vit_local")
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for structure in (True, False):
        obj = ObjectiveConfig(type="hssl", source="digits", window=2, structure=structure)
        task = Task(model, {"h": obj})
        torch.manual_seed(7)
        loss, _ = task({"digits": {"image": images}})
        torch.manual_seed(7)
        lifted = translation_lift(model.forward_features(images)["tokens"], (4, 4), 2)
        if not structure:
            lifted = remove_structure(lifted)
        ref = HSSLLoss(None, 0.1)
        f1, f2 = ref.sample(lifted)
        torch.testing.assert_close(loss, ref(f1, f2), atol=1e-6, rtol=1e-6)


def test_hssl_recipe_needs_relative_positions(tmp_path):
    import pytest

    from mmssl.schema import ConfigError
    from mmssl.train.recipe import recipe_from_dict, validate

    data = {
        "model": {"name": "test_tiny_vit"},
        "data": {"sources": {"train": {"kind": "image"}}},
        "objectives": {"hssl": {}},
        "train": {"global_batch_size": 4, "micro_batch_size": 4},
    }
    with pytest.raises(ConfigError, match="hssl needs vision.pos_embed rope or none"):
        validate(recipe_from_dict(data), world_size=1, check_files=False)
    data["model"]["name"] = "test_tiny_vit_local"
    validate(recipe_from_dict(data), world_size=1, check_files=False)
