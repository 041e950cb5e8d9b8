"""Fine-tuning: the vision tower plus a new linear head on its pooled features, trained with
cross-entropy through the training DeepSpeed engine (`mmssl.train.engine`), then scored on
the test split next to a linear probe of the frozen tower.

Batches come from the training pipeline (resampled, un-augmented centre crops) with the label
field (no augmentation: timm's and MAE's fine-tuning crop and flip); the optimizer (AdamW),
schedule (warmup over a tenth of --steps, then cosine to 0) and clipping (at norm 1.0) are a
recipe's, injected by the same engine code.
With `--limit N` the baseline, the fine-tuning and the test set all use the first N samples of
their split: the fine-tuning then draws shuffled batches from those N train images, held in
memory, so that both reported numbers come from the same training data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.eval.loading import EvalError, model_device, vision_tower

if TYPE_CHECKING:
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.models.vision import VisionEncoder


class Classifier(nn.Module):
    """A vision tower and a linear head: `clf(images)` -> logits (B, C); `clf(images, labels)`
    -> the training loss (what the engine calls).  The tower's projection to the joint
    embedding (`visual.proj`) is held fixed: the head reads the pooled features before it,
    so only weight decay moved it, and the saved tower's `encode` drifted from the export's."""

    def __init__(self, visual: VisionEncoder, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        proj = getattr(visual, "proj", None)
        if isinstance(proj, nn.Module):
            proj.requires_grad_(False)
        self.head = nn.Linear(visual.cfg.dim, num_classes)
        nn.init.zeros_(self.head.weight)  # starts at uniform predictions
        nn.init.zeros_(self.head.bias)

    def logits(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> logits (B, C)."""
        return self.head(self.visual.forward_pooled(images))

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits, or with labels the task's loss: mean cross-entropy (the engine calls backward
        on it)."""
        logits = self.logits(images)
        return logits if labels is None else F.cross_entropy(logits, labels)


def recipe_for(
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    warmup: int,
    deepspeed: str,
    world_size: int = 1,
    layer_decay: float | None = None,
) -> Any:
    """A training Recipe holding only fine-tuning's optimizer, schedule and DeepSpeed settings;
    `batch_size` images a rank, each step (no accumulation)."""
    from mmssl.train.recipe import recipe_from_dict

    return recipe_from_dict(
        {
            "name": "finetune",
            "optim": {"lr": lr, "weight_decay": weight_decay, "layer_decay": layer_decay},
            "schedule": {"warmup_steps": warmup, "min_lr_ratio": 0.0},
            "train": {
                "steps": steps,
                "global_batch_size": batch_size * world_size,
                "micro_batch_size": batch_size,
                "deepspeed": deepspeed,
            },
        }
    )


def finetune(
    model: MultimodalModel,
    train_urls: list[str],
    preprocess: Any,
    field: str,
    num_classes: int,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    deepspeed: str = "zero0",
    limit: int | None = None,
    layer_decay: float | None = None,
) -> Classifier:
    """Fine-tune a copy of model.visual with a new head for `steps` engine steps, on the first
    `limit` train samples when set (else the whole stream); returns it in eval mode on the
    device it trained on (`mmssl.train.engine.device()`)."""
    from mmssl import distributed
    from mmssl.train import engine as ds
    from mmssl.train.ds_config import deepspeed_config

    if layer_decay is not None and not 0 < layer_decay <= 1:  # the command line checks it too
        raise EvalError(f"layer_decay must be in (0, 1], got {layer_decay}")
    torch.manual_seed(seed)
    vision_tower(model)  # EvalError without one
    # a copy whose cond=None is the whole model's (the neutral descriptor's c, if conditioned)
    clf = Classifier(model.standalone_vision(), num_classes).train()
    ds.init_distributed()
    world = distributed.world_size()  # each rank `batch_size` images a step
    warmup = max(0, steps // 10)
    recipe = recipe_for(steps, lr, weight_decay, batch_size, warmup, deepspeed, world, layer_decay)
    linear = F.linear  # ZeRO-3 replaces it process-wide ("persists unless manually reset")
    try:
        eng = ds.initialize(clf, recipe, deepspeed_config(recipe, grad_accum=1))
        dev = ds.device()
        if limit is None:
            it = _stream_batches(train_urls, preprocess, field, batch_size, seed)
        else:
            images, labels = _images_and_labels(train_urls, preprocess, field, batch_size, limit)
            # each rank its own batches, as with the pipeline's per-rank shards
            it = _memory_batches(images, labels, batch_size, seed + distributed.rank())
        for _ in range(steps):
            images, labels = next(it)
            if labels.min() < 0 or labels.max() >= num_classes:
                raise EvalError(
                    f"labels run {int(labels.min())}..{int(labels.max())} but --num-classes is "
                    f"{num_classes}"
                )
            loss = eng(images.to(dev), labels.to(dev))
            eng.backward(loss)
            eng.step()
        return _whole(eng, lambda: Classifier(model.standalone_vision(), num_classes)).eval()
    finally:
        torch.nn.functional.linear = linear


def _whole(eng: Any, build: Callable[[], Classifier]) -> Classifier:
    """The engine's trained module with whole parameters.  Under ZeRO-3 each rank keeps a
    slice of every parameter and the module's own are empty (its state_dict held 0-element
    tensors): they are gathered, on every rank, into a new `build()`, in their dtype."""
    if int(eng.zero_optimization_stage()) != 3:
        return eng.module
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(eng.module.parameters())):
        state = {k: v.detach().clone() for k, v in eng.module.state_dict().items()}
    plain = build()
    plain.load_state_dict(state, assign=True)
    return plain


def _stream_batches(
    urls: list[str], preprocess: Any, field: str, batch_size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images (B, 3, S, S), labels (B,)) from the training pipeline, resampled."""
    from mmssl.data.pipeline import build_pipeline

    loader = build_pipeline(
        urls,
        batch_size=batch_size,
        kind="image",
        mode="resampled",
        seed=seed,
        image_size=preprocess.image_size,
        num_views=0,
        json_fields=(field,),
        mean=preprocess.mean,
        std=preprocess.std,
        max_pixels=preprocess.max_pixels,  # training's limit, as the test split decodes
    )
    for batch in loader:
        yield batch["image"], batch[field].long()


def _memory_batches(
    images: Tensor, labels: Tensor, batch_size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless full batches of images (N, 3, S, S) and labels (N,): one seeded permutation
    after another, a batch running on into the next (N < batch_size repeats samples)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.zeros(0, dtype=torch.int64)
    while True:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(labels), generator=g)])
        idx, order = order[:batch_size], order[batch_size:]
        yield images[idx], labels[idx]


@torch.no_grad()
def accuracy(clf: Classifier, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 of clf on images (N, 3, S, S), labels (N,), the forwards on clf's device and the
    scoring on the CPU.  Ties and NaN logits count against the model, as in
    `mmssl.eval.metrics` (an argmax gave a head that never moved, or one that diverged to
    NaN, every sample of class 0); a label the head has no column for is a miss."""
    from mmssl.eval.metrics import predictions

    dev = model_device(clf)
    logits = torch.cat(
        [
            clf.logits(images[i : i + batch_size].to(dev)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )  # (N, C)
    labels = labels.long()
    pred = predictions(logits, labels.clamp(0, logits.shape[1] - 1))
    return float((pred == labels).double().mean())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `finetune` task's options."""
    parser.add_argument("--train", required=True, help="labelled train shards (pattern)")
    parser.add_argument("--test", required=True, help="labelled test shards (pattern)")
    parser.add_argument("--label-field", default="label")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="default: 1 + the largest train label"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=None,
        help="layer-wise lr decay (BEiT/MAE fine-tuning: 0.65-0.75): block i of L at lr x "
        "d^(L-i), the embeddings at lr x d^(L+1), the head and final norm at lr; default off",
    )
    parser.add_argument(
        "--train-batch-size", type=int, default=64, help="fine-tuning images per rank a step"
    )
    parser.add_argument(
        "--deepspeed", default="zero0", help="engine JSON name or path (recipes/deepspeed)"
    )
    parser.add_argument("--seed", type=int, default=0)


def _images_and_labels(
    urls: list[str], preprocess: Any, field: str, batch_size: int, limit: int | None
) -> tuple[Tensor, Tensor]:
    from mmssl.eval.data import iter_image_batches

    images, labels = [], []
    for b in iter_image_batches(urls, preprocess, batch_size, fields=(field,), limit=limit):
        images.append(b["image"])
        labels.append(b[field])
    return torch.cat(images), torch.cat(labels).long()


def head_size(train_y: Tensor, num_classes: int | None) -> int:
    """The head's width for these train labels, checked before anything trains: the head
    scores label c in column c.  A label out of range was refused only if a drawn batch held
    it (exit 0 otherwise, its class never predicted); sparse ids ({3, 1000000}) built a head
    of 1 + the largest (132 MB for two classes; past ~1e10 an allocation traceback)."""
    low, high = int(train_y.min()), int(train_y.max())
    if low < 0:
        raise EvalError(f"train labels must be >= 0 (label c is the head's column c), got {low}")
    if num_classes is not None:
        if high >= num_classes:
            raise EvalError(f"train labels run up to {high} but --num-classes is {num_classes}")
        return num_classes
    distinct = len(torch.unique(train_y))
    if high + 1 > max(10 * distinct, 10_000):
        raise EvalError(
            f"the {distinct} train labels are sparse ids up to {high}: a head of {high + 1} "
            "columns; remap them to 0..N-1, or pass --num-classes to build it anyway"
        )
    return high + 1


def run(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """The `finetune` task: writes results.json, summary.md and finetuned.safetensors under
    args.out.  The last is the `Classifier`'s state_dict (visual.*, head.*); rebuilt as
    `Classifier(mmssl.load_encoder(EXPORT), num_classes)` it gives the scored logits (a
    descriptor-conditioned backbone's state_dict holds `visual.cond_default`, the condition
    it was fine-tuned with)."""
    from mmssl.eval.data import shard_urls
    from mmssl.eval.features import extract_features
    from mmssl.eval.features_file import integer_labels
    from mmssl.eval.linear import sweep
    from mmssl.models.io import save_safetensors

    if args.steps < 1:
        raise EvalError(f"--steps must be >= 1, got {args.steps}")
    from mmssl.schema import ConfigError
    from mmssl.train.ds_config import deepspeed_config

    try:  # before the frozen baseline's extraction and sweep: --deepspeed names a JSON
        recipe = recipe_for(
            args.steps,
            args.lr,
            args.weight_decay,
            args.train_batch_size,
            0,
            args.deepspeed,
            layer_decay=args.layer_decay,
        )
        deepspeed_config(recipe, grad_accum=1)
    except ConfigError as err:
        raise EvalError(str(err)) from None
    loaded = ctx.load()
    if loaded.model.visual is None:
        raise EvalError("fine-tuning needs a model with a vision tower")
    train_urls, test_urls = shard_urls(args.train), shard_urls(args.test)
    pre, field = loaded.preprocess, args.label_field
    # the frozen baseline first: it also checks that both splits carry labels
    frozen = {
        split: extract_features(
            loaded.model, urls, pre, batch_size=args.batch_size, fields=(field,), limit=args.limit
        )
        for split, urls in (("train", train_urls), ("test", test_urls))
    }
    train_y, test_y = (
        integer_labels(frozen[split][field], f"shards {src}", field, frozen[split]["__key__"])
        for split, src in (("train", args.train), ("test", args.test))
    )
    if args.train_batch_size > len(train_y):  # 100000 for 16 images took all 23 GB: killed
        raise EvalError(
            f"--train-batch-size {args.train_batch_size} is more than the {len(train_y)} "
            "training images"
        )
    num_classes = head_size(train_y, args.num_classes)
    probe = sweep(frozen["train"]["features"], train_y, frozen["test"]["features"], test_y)
    clf = finetune(
        loaded.model,
        train_urls,
        pre,
        field,
        num_classes,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.train_batch_size,
        seed=args.seed,
        deepspeed=args.deepspeed,
        limit=args.limit,
        layer_decay=args.layer_decay,
    )
    test_x, test_y = _images_and_labels(test_urls, pre, field, args.batch_size, args.limit)
    res = {
        "top1": accuracy(clf, test_x, test_y),
        "linear_probe_top1": probe["top1"],
        "linear_probe_weight_decay": probe["weight_decay"],
        "steps": args.steps,
        "num_classes": num_classes,
        "num_train": len(train_y),
        "num_test": len(test_y),
    }
    weights = Path(args.out) / "finetuned.safetensors"
    # readable by others (safetensors' own save_file makes it 0600), replaced atomically
    save_safetensors({k: v.cpu().contiguous() for k, v in clf.state_dict().items()}, weights)
    summary = (
        f"Fine-tuned vision tower + linear head, {args.steps} steps: **test top-1 {res['top1']:.4f}** "
        f"vs linear probe of the frozen tower {res['linear_probe_top1']:.4f}, both trained on the "
        f"same {res['num_train']} train images. Weights: `{weights.name}`."
    )
    ctx.report(
        "finetune",
        res,
        data={"train": args.train, "test": args.test, "field": field},
        summary=summary,
    )
    return res
