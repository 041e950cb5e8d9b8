"""`mmssl plan`'s training FLOPs with activation checkpointing against torch's
FlopCounterMode, as the marginal cost of a sample: multi-view, adaLN-conditioned and CoCa
decoder configurations (from a mutation audit: each case failed a mutant of the plan's
formula that the other tests let through)."""

from __future__ import annotations

import pytest
import torch

SMALL_V = [
    "model.overrides.vision.dim=192",
    "model.overrides.vision.depth=2",
    "model.overrides.vision.num_heads=3",
]
COCA = [  # a small image and text tower, so that the caption decoder's share shows
    *SMALL_V,
    "data.image_size=32",
    "model.overrides.text.dim=128",
    "model.overrides.text.num_heads=2",
    "model.overrides.text.vocab_size=1000",
    "model.overrides.embed_dim=64",
    "objectives.captioning.fused_head=false",
]
LAYERSCALE = "model.overrides.text.block.init_values=0.1"


def _counted_and_planned(name: str, extra: list[str]) -> tuple[float, float]:
    """(planned, counted) forward + backward FLOPs per sample.  Counted as the marginal cost
    of a sample, (FLOPs at batch 3 - at batch 1) / 2, so per-step work that does not grow
    with the batch (a conditioning prompt's text encoding) is left out, as the plan does."""
    from torch.utils.flop_counter import FlopCounterMode
    from train_helpers import RECIPES

    from mmssl.models.multimodal import MultimodalModel
    from mmssl.nn.attention import set_attention_kernel
    from mmssl.train.freeze import apply_freeze
    from mmssl.train.plan import training_flops, workload
    from mmssl.train.recipe import load_recipe, model_config
    from mmssl.train.streams import packed_sources
    from mmssl.train.tasks import Task

    path = RECIPES / f"{name}.yaml"
    path = path if path.exists() else RECIPES / "experiments" / f"{name}.yaml"
    recipe = load_recipe(path, ["data.tokenizer=default", *extra])
    cfg = model_config(recipe)
    task = Task(MultimodalModel(cfg), recipe.objectives, None, packed_sources(recipe))
    apply_freeze(task.model, recipe.train.freeze)  # simclr_vit_s16: visual.patch_embed
    set_attention_kernel(task, "matmul")
    (source,) = recipe.data.sources
    kind = recipe.data.sources[source].kind
    side = recipe.data.image_size or (cfg.vision.image_size if cfg.vision else None)

    def count(b: int) -> float:
        g = torch.Generator().manual_seed(0)
        batch: dict = {}
        if kind in ("image", "image_text"):
            if recipe.data.views:
                batch["views"] = [
                    torch.rand(b, 3, side, side, generator=g) for _ in range(recipe.data.views)
                ]
            else:
                batch["image"] = torch.rand(b, 3, side, side, generator=g)
        if kind in ("text", "image_text"):
            n = recipe.data.context_length + (1 if kind == "text" else 0)
            batch["text"] = torch.randint(3, 900, (b, n), generator=g)
            batch["text_mask"] = torch.ones(b, n, dtype=torch.bool)
        with FlopCounterMode(display=False) as counter:
            loss, _ = task({source: batch})
            loss.backward()
        task.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    counted = (count(3) - count(1)) / 2
    planned = training_flops(workload(recipe, cfg), recipe.train.activation_checkpointing)
    return planned, counted


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        # two views per image: every view is embedded and rerun by checkpointing
        ("simclr_vit_s16", [*SMALL_V, "data.image_size=64", "train.activation_checkpointing=true"]),
        # adaLN-Zero vision blocks (vision.cond_dim): the gate multiplies fc2's output, so
        # checkpointing reruns fc2 too
        ("clip_text_conditioned", ["train.activation_checkpointing=true"]),
        # prefix tokens in the vision tower's sequence (the plan left them out: -16%)
        (
            "clip_text_conditioned",
            ["train.activation_checkpointing=true", "model.overrides.vision.cond_tokens=4"],
        ),
        # a small image and a deep caption decoder, so the decoder's rerun is what is measured
        (
            "coca_vit_b16",
            [*COCA, "model.overrides.text.depth=1", "model.overrides.caption.depth=6"],
        ),
        # the same with LayerScale on the text blocks (the decoder's too): fc2 is rerun
        (
            "coca_vit_b16",
            [*COCA, "model.overrides.text.depth=1", "model.overrides.caption.depth=6", LAYERSCALE],
        ),
        # prefix mode: the text tower runs again on image tokens + caption (the plan: -44%)
        (
            "coca_vit_b16",
            [*COCA, "model.overrides.text.depth=2", "model.overrides.caption.mode=prefix"],
        ),
    ],
    ids=[
        "simclr-views",
        "conditioned-adaln",
        "conditioned-prefix-tokens",
        "coca-decoder",
        "coca-decoder-layerscale",
        "coca-prefix",
    ],
)
def test_checkpointed_training_flops_match_torch_counter(name: str, extra: list[str]) -> None:
    planned, counted = _counted_and_planned(name, extra)
    assert planned == pytest.approx(counted, rel=1e-2), (planned, counted, planned / counted)
