"""Fast-path switches of a recipe: `optim.impl` (which AdamW), `train.compile` (compiled
Blocks) and `train.attention` (the attention kernel).  Each is parsed and validated, reaches the real DeepSpeed engine, and trains to the
same losses as an independent plain-PyTorch loop (torch AdamW, eager model, no DeepSpeed).

DeepSpeed's own FusedAdam (`optim.impl=deepspeed`, the default) is not run here: it builds a
C++ extension on first use (minutes); the other training tests cover it."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch

from mmssl.schema import ConfigError
from mmssl.train.recipe import load_recipe, recipe_from_dict, validate

pytestmark = pytest.mark.usefixtures("one_process_group")
STEPS = 3
LR = 1e-2


def _recipe(optim: dict[str, Any] | None = None, train: dict[str, Any] | None = None):
    return recipe_from_dict(
        {
            "optim": {"lr": LR, **(optim or {})},
            "schedule": {"kind": "constant"},
            "train": {
                "steps": STEPS,
                "global_batch_size": 8,
                "micro_batch_size": 8,
                "grad_clip": None,
                **(train or {}),
            },
        }
    )


def _batches(recipe, resolved) -> list[dict]:
    from mmssl.train.streams import build_streams

    stream = build_streams(recipe, resolved.model, 0, 1)["train"]
    return [{"train": stream.next()} for _ in range(STEPS)]


def _task(recipe, resolved):
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.tasks import Task

    torch.manual_seed(0)
    return Task(MultimodalModel(resolved.model), recipe.objectives)


def _engine_losses(recipe) -> tuple[list[float], Any]:
    """STEPS steps of the real engine on the synthetic batches -> (losses, engine)."""
    from mmssl.train.engine import init_distributed, initialize
    from mmssl.train.loop import to_device

    resolved = validate(recipe, world_size=1)
    init_distributed()
    engine = initialize(_task(recipe, resolved), recipe, resolved.ds_config)
    losses = []
    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float32
    for batch in _batches(recipe, resolved):
        loss, _ = engine({k: to_device(v, torch.device("cpu"), dtype) for k, v in batch.items()})
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses, engine


@functools.cache
def _reference_losses() -> tuple[float, ...]:
    """The same steps as a plain loop: eager model, torch AdamW's per-tensor loop."""
    from mmssl.train.engine import param_groups

    recipe = _recipe()
    resolved = validate(recipe, world_size=1)
    task = _task(recipe, resolved)
    o = recipe.optim
    opt = torch.optim.AdamW(
        param_groups(task, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, foreach=False
    )
    losses = []
    for batch in _batches(recipe, resolved):
        opt.zero_grad()
        loss, _ = task(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return tuple(losses)


def test_decay_embeddings_reaches_the_engines_optimizer() -> None:
    """optim.decay_embeddings puts the token and position tables in the engine's decayed
    group (nanoGPT's and OpenCLIP's rule); the default leaves them out (timm's)."""

    def decayed(optim: dict[str, Any]) -> set[str]:
        _, engine = _engine_losses(_recipe({"impl": "torch", "weight_decay": 0.1, **optim}))
        names = {id(p): n for n, p in engine.module.named_parameters()}
        groups = engine.optimizer.param_groups
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    tables = {"model.text.token_embed.weight", "model.text.pos_embed", "model.visual.pos_embed"}
    on, off = decayed({"decay_embeddings": True}), decayed({})
    assert on - off == tables and not off & tables
    assert "model.visual.cls_token" not in on


def test_switches_parse_and_reach_the_deepspeed_config() -> None:
    from mmssl.train.recipe import Recipe

    assert Recipe().optim.impl == "deepspeed" and Recipe().train.compile is False
    params = validate(_recipe(), world_size=1).ds_config["optimizer"]["params"]
    assert "torch_adam" not in params  # the default stays DeepSpeed's own Adam
    for impl, extra in (
        ("torch", {"torch_adam": True}),
        ("foreach", {"torch_adam": True, "foreach": True}),
        ("fused", {"torch_adam": True, "fused": True}),
    ):
        params = validate(_recipe({"impl": impl}), world_size=1).ds_config["optimizer"]["params"]
        assert {k: params[k] for k in extra} == extra
        assert params["lr"] == LR


def test_overrides_parse(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("optim: {lr: 0.01}\n")
    recipe = load_recipe(path, ["optim.impl=foreach", "train.compile=true"])
    assert recipe.optim.impl == "foreach" and recipe.train.compile is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.impl=apex", r"optim\.impl: 'apex' is not one of \['deepspeed', 'torch', "),
        ("train.compile=fast", r"train\.compile"),
        ("train.attention=flash", r"train\.attention: 'flash' is not one of \['auto', 'sdpa', "),
        ("optim.implementation=fused", r"optim\.implementation"),
    ],
)
def test_bad_switch_values_name_the_key(tmp_path, override: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: bad\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(path, [override])


@pytest.mark.parametrize("impl", ["torch", "foreach", "fused"])
def test_optimizer_impl_trains_like_plain_torch_adamw(impl: str) -> None:
    losses, engine = _engine_losses(_recipe({"impl": impl}))
    opt = engine.basic_optimizer
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["foreach"] is (True if impl == "foreach" else None)
    assert opt.defaults["fused"] is (True if impl == "fused" else None)
    # the first loss precedes any update; the next ones differ if an update differs
    torch.testing.assert_close(losses, list(_reference_losses()), rtol=1e-4, atol=1e-5)
    assert losses[-1] != losses[0]


@pytest.mark.slow
def test_compile_switch_trains_like_eager(monkeypatch) -> None:
    """train.compile=true compiles every Block of the task and keeps the losses.  The
    aot_eager backend traces forward and backward graphs like inductor but needs no C++
    build (inductor would take ~40 s here)."""
    import mmssl.nn.compile as nn_compile

    original, calls = nn_compile.compile_blocks, []

    def aot_eager(module: torch.nn.Module, **kwargs: Any) -> int:
        calls.append(original(module, backend="aot_eager"))
        return calls[-1]

    monkeypatch.setattr(nn_compile, "compile_blocks", aot_eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no eager fallback
        losses, engine = _engine_losses(_recipe({"impl": "torch"}, {"compile": True}))
    assert calls == [4]  # 2 vision + 2 text Blocks of test_tiny_clip
    blocks = [m for m in engine.module.modules() if isinstance(m, nn_compile.Block)]
    assert all(isinstance(b.forward, nn_compile.CompiledForward) for b in blocks)
    assert all(b.forward.failed is None for b in blocks)
    torch.testing.assert_close(losses, list(_reference_losses()), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_failure_warns_once_and_trains_eagerly(monkeypatch) -> None:
    import mmssl.nn.compile as nn_compile

    def broken(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        raise RuntimeError("no compiler here")

    original = nn_compile.compile_blocks
    monkeypatch.setattr(
        nn_compile, "compile_blocks", lambda module, **kw: original(module, backend=broken)
    )
    # Block.forward's dynamo cache is per process: after the earlier tests' compiles it can
    # be at its recompile limit, and dynamo then runs new shapes eagerly without calling
    # any backend, the broken one included
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, _ = _engine_losses(_recipe({"impl": "torch"}, {"compile": True}))
    fallbacks = [w for w in caught if "running them eagerly" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    torch.testing.assert_close(losses, list(_reference_losses()), rtol=1e-4, atol=1e-5)


def test_fp32_zero3_keeps_one_copy_of_the_partitions_and_trains_alike() -> None:
    """DeepSpeed would clone the fp32 partitions into a master copy; mmssl aliases them."""
    losses, engine = _engine_losses(_recipe({"impl": "torch"}, {"deepspeed": "zero3"}))
    opt = engine.optimizer
    params = {p.ds_tensor.untyped_storage().data_ptr() for p in engine.module.parameters()}
    masters = {t.untyped_storage().data_ptr() for t in opt.fp32_partitioned_groups_flat}
    assert masters <= params, "the fp32 master partitions are separate copies"
    torch.testing.assert_close(losses, list(_reference_losses()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_attention_kernel_reaches_every_block_and_trains_alike(kernel: str) -> None:
    from mmssl.nn.attention import Attention

    assert recipe_from_dict({}).train.attention == "auto"
    losses, engine = _engine_losses(_recipe({"impl": "torch"}, {"attention": kernel}))
    kernels = {m.kernel for m in engine.module.modules() if isinstance(m, Attention)}
    assert kernels == {kernel}
    torch.testing.assert_close(losses, list(_reference_losses()), rtol=1e-4, atol=1e-5)


def test_bf16_at_zero0_starts_adamw_as_zero1_does() -> None:
    """DeepSpeed's stage-0 bf16 wrapper steps its optimizer once on zero gradients when built:
    AdamW counted that step (the first real update was 0.744 of ZeRO-1's) and shrank the fp32
    masters by one weight decay.  mmssl undoes it: the masters equal the model's weights, the
    optimizer has no state, and ZeRO-0 trains as ZeRO-1 does (same maths, other code)."""

    base = {"optim": {"lr": LR, "impl": "torch", "weight_decay": 0.1}, "precision": "bf16",
            "schedule": {"kind": "constant"},
            "train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 8, "grad_clip": None}}  # fmt: skip
    from mmssl.train.engine import init_distributed, initialize

    recipe = recipe_from_dict(base)
    resolved = validate(recipe, world_size=1)
    init_distributed()
    engine = initialize(_task(recipe, resolved), recipe, resolved.ds_config)
    opt = engine.optimizer
    assert len(opt.optimizer.state) == 0
    for low, masters in zip(opt.fp16_groups, opt.fp32_groups):
        for p, m in zip(low, masters):
            assert torch.equal(m, p.float())
    zero0, _ = _engine_losses(recipe)
    zero1, engine1 = _engine_losses(
        recipe_from_dict({**base, "train": {**base["train"], "deepspeed": "zero1"}})
    )
    torch.testing.assert_close(zero0, zero1, rtol=0, atol=1e-5)  # the bug: 7e-4 at step 2
