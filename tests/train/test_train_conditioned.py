"""Conditioned SimCLR through the Task: each view conditioned on its own descriptor."""

from __future__ import annotations

import json

import pytest
import torch

import mmssl
from mmssl.train.recipe import ObjectiveConfig
from mmssl.train.tasks import Task


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]
    return {"digits": {"views": views, "aug": [torch.rand(6, 13, generator=g) for _ in views]}}


def _adam_steps(task: Task, batch: dict, steps: int) -> None:
    """`steps` Adam updates of the whole Task on one batch."""
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        task(batch)[0].backward()
        opt.step()


def _hyper_projector_model(name: str) -> torch.nn.Module:
    """Model `name` with a descriptor-conditioned (hypernetwork) projector, moved off its
    neutral init so that the condition changes the output."""
    torch.manual_seed(0)
    model = mmssl.create_model(
        name, condition={"dim": 16}, projector={"cond": "hyper", "hyper_rank": 4}
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


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
    _adam_steps(task, batch, 5)
    assert cond.conditioner.net[0].weight.grad.abs().sum() > 0
    # The Task conditions each view on its own descriptor: equal to the loss written out.
    from mmssl.objectives import nt_xent_loss

    views, augs = batch["digits"]["views"], batch["digits"]["aug"]
    z = []
    for v, a in zip(views, augs):
        c = cond.condition(a)
        z.append(cond.project(cond.forward_features(v, c)["pooled"], c))
    torch.testing.assert_close(task(batch)[0], nt_xent_loss(z[0], z[1], 0.1), atol=1e-6, rtol=1e-6)


def test_a_conditioned_projector_on_a_plain_backbone_gets_each_views_condition():
    """Only the projector reads the descriptor: the backbone runs unconditioned, and each
    view's projection still gets its own condition (equal to the loss written out)."""
    from mmssl.objectives import nt_xent_loss

    model = _hyper_projector_model("test_tiny_simclr")
    task = Task(model, {"simclr": ObjectiveConfig(source="digits")})
    batch = _batch(1)
    views, augs = batch["digits"]["views"], batch["digits"]["aug"]
    z = [model.project(model.forward_pooled(v), model.condition(a)) for v, a in zip(views, augs)]
    plain = model.project(model.forward_pooled(views[0]), None)
    assert not torch.allclose(z[0], plain, atol=1e-3)
    torch.testing.assert_close(task(batch)[0], nt_xent_loss(z[0], z[1], 0.1), atol=1e-6, rtol=1e-6)


def test_hssl_objective_through_the_task_equals_the_loss_written_out():
    from mmssl.models.lifting import remove_structure, translation_lift
    from mmssl.objectives.hssl import HSSLLoss

    model = mmssl.create_model("test_tiny_vit_local")
    # the model's own 32 px (a 4x4 grid of patches), and data.image_size 48 (6x6, which the
    # task took for 4x4 and failed on)
    for size, structure in ((32, True), (32, False), (48, True)):
        images = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(0))
        obj = ObjectiveConfig(type="hssl", source="digits", window=2, structure=structure)
        task = Task(model, {"h": obj})
        torch.manual_seed(7)
        loss, _ = task({"digits": {"image": images}})
        torch.manual_seed(7)
        grid = (size // 8, size // 8)
        lifted = translation_lift(model.forward_features(images)["tokens"], grid, 2)
        if not structure:
            lifted = remove_structure(lifted)
        ref = HSSLLoss(None, 0.1)
        f1, f2 = ref.sample(lifted)
        torch.testing.assert_close(loss, ref(f1, f2), atol=1e-6, rtol=1e-6)


def test_hssl_lifts_the_first_view_when_the_source_renders_views():
    """With data.views 2 (SimCLR and H-SSL on one source) a batch has views and no plain
    image: H-SSL read the grid from batch["image"] (KeyError on the first step); it lifts the
    first view, whose tokens it already used, as the loss written out on that view."""
    from mmssl.models.lifting import translation_lift
    from mmssl.objectives.hssl import HSSLLoss

    model = mmssl.create_model("test_tiny_vit_local")
    gen = torch.Generator().manual_seed(0)
    views = [torch.rand(5, 3, 48, 48, generator=gen) for _ in range(2)]
    obj = ObjectiveConfig(type="hssl", source="digits", window=2)
    torch.manual_seed(7)
    aug = [torch.rand(5, 13, generator=gen) for _ in range(2)]
    loss, _ = Task(model, {"h": obj})({"digits": {"views": views, "aug": aug}})
    torch.manual_seed(7)
    lifted = translation_lift(model.forward_features(views[0])["tokens"], (6, 6), 2)
    f1, f2 = HSSLLoss(None, 0.1).sample(lifted)
    torch.testing.assert_close(loss, HSSLLoss(None, 0.1)(f1, f2), atol=1e-6, rtol=1e-6)


def test_hssl_projects_the_fibers_with_the_models_conditioned_projector():
    """As SimCLR does, H-SSL scores the model's projector (conditioned on the lifted view's
    descriptor), which it skipped: the projector and its conditioning never trained."""
    from mmssl.models.lifting import translation_lift
    from mmssl.objectives.hssl import HSSLLoss

    model = _hyper_projector_model("test_tiny_vit_local")
    batch = _batch(2)
    views, augs = batch["digits"]["views"], batch["digits"]["aug"]
    task = Task(model, {"h": ObjectiveConfig(type="hssl", source="digits", window=2)})
    torch.manual_seed(7)
    loss, _ = task(batch)
    torch.manual_seed(7)
    lifted = translation_lift(model.forward_features(views[0])["tokens"], (4, 4), 2)
    c = model.condition(augs[0])
    f1, f2 = (model.project(f, c) for f in HSSLLoss(None, 0.1).sample(lifted))
    torch.testing.assert_close(loss, HSSLLoss(None, 0.1)(f1, f2), atol=1e-6, rtol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())


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
    # a window larger than the patch grid of the images trained on failed at the first step
    data["data"]["image_size"] = 16  # a 2x2 grid of 8 px patches
    data["objectives"]["hssl"]["window"] = 3
    with pytest.raises(ConfigError, match="objectives.hssl.window 3 exceeds the 2x2 patch grid"):
        validate(recipe_from_dict(data), world_size=1, check_files=False)


PROMPT = "a photo of a digit"


def _clip_models():
    from mmssl.tokenizer import get_tokenizer

    vocab = get_tokenizer().vocab_size
    torch.manual_seed(0)
    plain = mmssl.create_model("test_tiny_clip", text={"vocab_size": vocab})
    cond = mmssl.create_model(
        "test_tiny_clip",
        text={"vocab_size": vocab},
        vision={"cond_dim": 16},
        condition={"source": "text", "dim": 16},
    )
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(
        "modulation" in k or "gate" in k or "conditioner" in k for k in missing
    )
    return plain, cond


def _clip_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab, (6, 10), generator=g)
    mask = torch.arange(10)[None] < torch.tensor([[10], [7], [5], [9], [3], [10]])
    return {
        "digits": {"image": torch.rand(6, 3, 32, 32, generator=g), "text": text, "text_mask": mask}
    }


def _naive_clip(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP cross-entropy written out row by row."""
    img, txt = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    logits = scale * img @ txt.T
    rows = [torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(len(img))]
    cols = [torch.logsumexp(logits[:, i], 0) - logits[i, i] for i in range(len(img))]
    return (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2


def test_text_conditioned_clip_equals_plain_at_init_and_trains_the_conditioner():
    from mmssl.tokenizer import get_tokenizer

    tok = get_tokenizer()
    plain, cond = _clip_models()
    batch = _clip_batch(tok.vocab_size)
    loss_plain, _ = Task(plain, {"clip": ObjectiveConfig(type="clip", source="digits")})(batch)
    obj = ObjectiveConfig(type="clip", source="digits", condition_prompt=PROMPT)
    task = Task(cond, {"clip": obj})
    loss_cond, _ = task(batch)
    torch.testing.assert_close(loss_cond, loss_plain, atol=1e-6, rtol=1e-6)
    _adam_steps(task, batch, 3)
    # zero-init adaLN blocks gradients to c at step 0; after a step they flow to gamma_text
    # and, through the prompt, into the text tower
    task.zero_grad()
    task(batch)[0].backward()
    assert cond.conditioner.proj.weight.grad.abs().sum() > 0
    # the Task's loss equals the one written out: the prompt encoded alone, at its own length
    # (with conditioning weights large enough for the prompt to matter)
    with torch.no_grad():
        for name, p in cond.named_parameters():
            if "modulation" in name or "gate" in name or "conditioner" in name:
                p.normal_(0, 0.5)
    ids, mask = tok.batch_encode([PROMPT], len(tok.encode(PROMPT)) + 2)
    with torch.no_grad():
        c = cond.condition(cond_text=ids, cond_text_mask=mask)  # (1, C)
        d = batch["digits"]
        img = cond.encode_image(d["image"], c.expand(6, -1))
        txt = cond.encode_text(d["text"], d["text_mask"])
        ref = _naive_clip(img, txt, cond.logit_scale.exp().clamp(max=100).reshape(()))
        assert cond.condition(cond_text=ids, cond_text_mask=mask).abs().sum() > 0
        torch.testing.assert_close(task(batch)[0], ref, atol=1e-5, rtol=1e-5)
        # and the prompt matters now: another prompt gives another loss, by ~1e-3 here (9e-4
        # with other library versions: float rounding of one prompt's loss is ~1e-7)
        other = Task(
            cond, {"clip": ObjectiveConfig(type="clip", source="digits", condition_prompt="red")}
        )
        assert abs(other(batch)[0].item() - ref.item()) > 1e-4


def _text_recipe(**objectives) -> dict:
    objectives = objectives or {"clip": {"condition_prompt": PROMPT}}
    read = {o.get("source", "train") for o in objectives.values()}  # unread sources are errors
    return {
        "model": {
            "name": "test_tiny_clip",
            "overrides": {
                "text": {"vocab_size": 8192},
                "vision": {"cond_dim": 16},
                "condition": {"source": "text", "dim": 16},
            },
        },
        "data": {"sources": {name: {} for name in sorted(read)}, "views": 2},
        "objectives": objectives,
        "train": {"global_batch_size": 4, "micro_batch_size": 4},
    }


def _validate(data: dict):
    from mmssl.train.recipe import recipe_from_dict, validate

    return validate(recipe_from_dict(data), world_size=1, check_files=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: (
                d["model"]["overrides"].pop("condition") and d["model"]["overrides"].pop("vision")
            ),
            "the model is not conditioned on text",
        ),
        (lambda d: d["objectives"]["clip"].pop("condition_prompt"), "give the prompt"),
        (lambda d: d["objectives"].update(simclr={"condition_prompt": "red"}), "share one prompt"),
        (lambda d: d["model"]["overrides"].pop("vision"), "set model.overrides.vision.cond_dim"),
        # the prompt is tokenized with data.tokenizer: CLIP's BPE ids overflow this vocab
        (lambda d: d["data"].update(tokenizer="clip"), "text.vocab_size=49408"),
        (lambda d: d["model"]["overrides"]["text"].update(vocab_size=512), "vocab_size 512"),
    ],
)
def test_text_condition_recipe_errors_name_the_key(change, message):
    from mmssl.schema import ConfigError

    data = _text_recipe()
    _validate(_text_recipe())  # the unchanged recipe is valid
    change(data)
    with pytest.raises(ConfigError, match="condition_prompt") as err:
        _validate(data)
    assert message in str(err.value)


def test_text_conditioned_prompt_per_source_and_simclr():
    """Two sources, two prompts; SimCLR views share their source's prompt."""
    data = _text_recipe(
        clip={"condition_prompt": PROMPT},
        simclr={"source": "other", "condition_prompt": "a red digit"},
    )
    _validate(data)


TINY = {"dim": 32, "depth": 2, "num_heads": 2}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_text_conditioned_recipe_trains_through_the_engine(demo_data, tmp_path, monkeypatch):
    """recipes/experiments/clip_text_conditioned.yaml, tiny, 3 steps through DeepSpeed: the
    export holds the text conditioner, and training moved the zero-initialised adaLN weights."""
    from train_helpers import RECIPES, demo_urls

    from mmssl.models.io import load_encoder, load_pretrained
    from mmssl.tokenizer import get_tokenizer
    from mmssl.train.export import export_run
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # the in-process run sets them; restored after
    path = RECIPES / "experiments" / "clip_text_conditioned.yaml"
    overrides = [
        *demo_urls(path, demo_data),
        f"out_dir={tmp_path}",
        *(f"model.overrides.{t}.{k}={v}" for t in ("vision", "text") for k, v in TINY.items()),
        "model.overrides.embed_dim=16",
        "train.steps=3",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "schedule.warmup_steps=1",
        "data.workers=0",
        "logging.every=1",
        "logging.tensorboard=false",
        "logging.progress=false",
    ]
    recipe = load_recipe(path, overrides)
    assert train(recipe, validate(recipe))["final_step"] == 3
    export = export_run(tmp_path / "clip_text_conditioned")
    model = load_pretrained(export)
    assert type(model.conditioner).__name__ == "TextConditioner"
    modulation = model.visual.trunk.blocks[0].norm1.modulation.weight
    assert modulation.abs().sum() > 0
    # the export records the prompt as training encoded it, and cond=None gives its features
    (source, obj), *_ = [(o.source, o) for o in recipe.objectives.values() if o.condition_prompt]
    prompt = json.loads((export / "config.json").read_text())["condition"]["prompts"][source]
    ids, _ = get_tokenizer(export).batch_encode([obj.condition_prompt], len(prompt["ids"]))
    assert prompt == {"text": obj.condition_prompt, "ids": ids[0].tolist()}
    assert ids[0, -1] == get_tokenizer(export).eos_id and ids.shape[1] > 2
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model.visual.encode(images, model.condition(cond_text=ids))
        torch.testing.assert_close(load_encoder(export)(images), want, rtol=0, atol=0)
        assert (model.visual.encode(images) - want).abs().max() > 0  # not the plain path


def test_task_augself_loss_takes_the_views_descriptors_in_order() -> None:
    """The Task scores AugSelf as head(f1, f2, aug[0], aug[1]): swapped descriptors flip the
    sign of every regression target."""
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.recipe import recipe_from_dict, validate
    from mmssl.train.streams import build_streams

    recipe = recipe_from_dict(
        {
            "model": {"name": "test_tiny_simclr"},
            "data": {"sources": {"train": {"urls": "synthetic", "kind": "image_text"}}, "views": 2},
            "objectives": {"augself": {"source": "train", "hidden": 16}},
            "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
        }
    )
    resolved = validate(recipe, world_size=1)
    torch.manual_seed(0)
    task = Task(MultimodalModel(resolved.model), recipe.objectives)
    batch = build_streams(recipe, resolved.model, 0, 1)["train"].next()
    _, metrics = task({"train": batch})
    f1, f2 = (task.visual.forward_features(v)["pooled"] for v in batch["views"])
    a1, a2 = batch["aug"]
    head = task.heads["augself"]
    want = head(f1, f2, a1, a2)
    assert not torch.allclose(want, head(f1, f2, a2, a1))
    torch.testing.assert_close(metrics["loss/augself"], want, rtol=1e-4, atol=1e-5)


def test_each_view_is_conditioned_on_its_own_descriptor() -> None:
    """The training Task conditions each view on ITS OWN augmentation descriptor
    (mmssl.train.tasks: "Each view is conditioned on its own descriptor").  The check above runs after 5 small Adam steps from zero-init gates, where
    the conditioning barely matters, so pairing view 0 with view 1's descriptor passes it.  Here
    the conditioning weights are made large first."""
    from mmssl.objectives import nt_xent_loss

    torch.manual_seed(0)
    cond = mmssl.create_model(
        "test_tiny_simclr",
        vision={"cond_dim": 16},
        condition={"dim": 16},
        projector={"cond": "hyper", "hyper_rank": 4},
    )
    with torch.no_grad():
        for name, p in cond.named_parameters():
            if "modulation" in name or "gate" in name or "conditioner" in name or "hyper" in name:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    views = [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]
    augs = [torch.rand(6, 13, generator=g) for _ in views]
    batch = {"digits": {"views": views, "aug": augs}}
    task = Task(cond, {"simclr": ObjectiveConfig(source="digits")})
    with torch.no_grad():
        z = []
        for v, a in zip(views, augs):
            c = cond.condition(a)
            z.append(cond.project(cond.forward_features(v, c)["pooled"], c))
        ref = nt_xent_loss(z[0], z[1], 0.1)
        torch.testing.assert_close(task(batch)[0], ref, atol=1e-5, rtol=1e-5)


def test_augself_needs_a_prompt_under_text_conditioning():
    data = _text_recipe(clip={"condition_prompt": PROMPT}, augself={})
    from mmssl.schema import ConfigError

    with pytest.raises(
        ConfigError, match=r"objectives\.augself\.condition_prompt: .*give the prompt"
    ):
        _validate(data)


def test_prompt_id_equal_to_vocab_size_is_out_of_range():
    from mmssl.schema import ConfigError
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import tokenizer

    tok = tokenizer(recipe_from_dict(_text_recipe()))
    top = max(tok.encode(PROMPT, add_bos=True, add_eos=True))
    data = _text_recipe()
    data["model"]["overrides"]["text"]["vocab_size"] = top + 1
    _validate(data)  # every id fits
    data["model"]["overrides"]["text"]["vocab_size"] = top
    with pytest.raises(ConfigError, match=f"token id {top} .* vocab_size {top}"):
        _validate(data)


def test_condition_prompts_are_tokenized_with_the_recipes_tokenizer() -> None:
    """As the captions are: with data.tokenizer clip the prompt is CLIP's ids, not the
    default tokenizer's (the Task falls back to the default when given none)."""
    pytest.importorskip("open_clip", reason="the clip tokenizer reads open_clip's vocabulary")
    from mmssl.tokenizer import get_tokenizer
    from mmssl.train.loop import build_task
    from mmssl.train.recipe import recipe_from_dict

    data = _text_recipe()
    data["model"]["overrides"]["text"]["vocab_size"] = 49408
    data["data"]["tokenizer"] = "clip"
    recipe = recipe_from_dict(data)
    task = build_task(recipe, _validate(data).model)
    n = task.prompts.natural_length("train")
    ids, _ = task.prompts.get("train", n, torch.device("cpu"))
    want, _ = get_tokenizer("clip").batch_encode([PROMPT], n)
    assert torch.equal(ids, want)
    assert not torch.equal(ids[:, : len(want[0])], get_tokenizer().batch_encode([PROMPT], n)[0])
