"""Fine-tuning through the DeepSpeed engine: the reported accuracy equals a naive recount with
the saved weights, the tower really changed, and unlabelled shards are refused."""

from __future__ import annotations

import stat

import pytest
import torch
from safetensors.torch import load_file
from test_eval_tasks import naive_samples

import mmssl
from mmssl.eval.cli import main, run_task
from mmssl.eval.finetune import Classifier
from mmssl.models.io import load_pretrained


@pytest.mark.slow
def test_finetune_accuracy_matches_saved_weights(
    tmp_path, tiny_model_dir, train_shards, test_shards
):
    res = run_task(
        [
            "finetune",
            "--model",
            tiny_model_dir,
            "--train",
            train_shards,
            "--test",
            test_shards,
            "--steps",
            "12",
            "--train-batch-size",
            "8",
            "--lr",
            "3e-3",
            "--out",
            str(tmp_path),
        ]
    )
    model = load_pretrained(tiny_model_dir)
    clf = Classifier(mmssl.load_encoder(tiny_model_dir), 3)  # as run()'s docstring says
    clf.load_state_dict(load_file(str(tmp_path / "finetuned.safetensors")))
    clf.eval()
    samples = naive_samples(test_shards)
    # scored on --test, trained on --train (a mutant scoring the train split passed)
    assert res["num_test"] == len(samples) != len(naive_samples(train_shards)) == res["num_train"]
    with torch.no_grad():
        right = sum(
            int(clf(img[None]).argmax(1).item() == meta["label"]) for img, _, meta in samples
        )
    assert res["top1"] == pytest.approx(right / len(samples))
    assert res["top1"] == 1.0  # colour squares are easy: a dozen steps separate them
    assert not torch.equal(clf.visual.patch_embed.proj.weight, model.visual.patch_embed.proj.weight)
    # the projection to the joint space, which the head does not read: weight decay alone
    # moved it, so the saved tower's encode_image was no longer the export's
    assert torch.equal(clf.visual.proj.weight, model.visual.proj.weight)
    assert 0.0 <= res["linear_probe_top1"] <= 1.0
    # readable like the report beside it (safetensors' save_file alone makes it 0600)
    weights, report = tmp_path / "finetuned.safetensors", tmp_path / "results.json"
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(report.stat().st_mode)


def test_finetune_needs_labels(tmp_path, capsys, tiny_model_dir, unlabelled_shards, test_shards):
    argv = [
        "finetune",
        "--model",
        tiny_model_dir,
        "--train",
        unlabelled_shards,
        "--test",
        test_shards,
        "--steps",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "no 'label' field" in capsys.readouterr().err


def test_a_train_batch_larger_than_the_training_images_is_refused(
    tmp_path, capsys, tiny_model_dir, train_shards, test_shards
):
    argv = ["finetune", "--model", tiny_model_dir, "--train", train_shards, "--test", test_shards]
    argv += ["--limit", "6", "--steps", "1", "--train-batch-size", "7", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--train-batch-size 7 is more than the 6 training images" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_limit_bounds_the_training_samples(
    tmp_path, monkeypatch, tiny_model_dir, train_shards, test_shards
):
    # the frozen baseline took the first --limit train samples while the fine-tuning streamed
    # the whole split, so the two reported numbers came from different training data
    seen: list[torch.Tensor] = []
    forward = Classifier.forward

    def spy(self, images, labels):
        seen.append(images.detach().clone())
        return forward(self, images, labels)

    monkeypatch.setattr(Classifier, "forward", spy)
    argv = ["finetune", "--model", tiny_model_dir, "--train", train_shards, "--test", test_shards]
    res = run_task(
        [*argv, "--limit", "6", "--steps", "3", "--train-batch-size", "4"]
        + ["--out", str(tmp_path)]
    )
    first = torch.stack([img for img, _, _ in naive_samples(train_shards)[:6]])  # (6, 3, S, S)
    images = torch.cat(seen)  # (12, 3, S, S)
    dist = (images[:, None] - first[None]).abs().flatten(2).amax(2)  # (12, 6)
    assert dist.min(1).values.max() < 1e-6  # every training image is one of the first six
    assert (dist.min(0).values < 1e-6).all()  # and each of them is used
    assert res["num_train"] == 6 and res["num_test"] == 6
    summary = (tmp_path / "summary.md").read_text()
    assert "same 6 train images" in summary


def test_finetune_accuracy_counts_ties_and_nan_against_the_head():
    # an argmax handed class 0 to a head whose logits all tie (never moved) or are NaN
    # (diverged): a third right on balanced labels; compare with a strict-maximum loop
    from mmssl.eval.finetune import accuracy
    from mmssl.models.registry import create_model

    torch.manual_seed(0)
    visual = create_model("test_tiny_clip").visual
    clf = Classifier(visual, 3).eval()
    size = visual.cfg.image_size
    images, labels = torch.rand(9, 3, size, size), torch.tensor([0, 1, 2] * 3)

    def naive() -> float:
        with torch.no_grad():
            logits = clf.logits(images)
        right = 0
        for row, y in zip(logits.tolist(), labels.tolist()):
            right += all(row[y] > v for j, v in enumerate(row) if j != y)  # False for NaN
        return right / len(labels)

    assert accuracy(clf, images, labels, batch_size=4) == naive() == 0.0  # zero head: ties
    with torch.no_grad():
        clf.head.weight.fill_(float("nan"))
    assert accuracy(clf, images, labels, batch_size=4) == naive() == 0.0
    with torch.no_grad():
        clf.head.weight.normal_(std=5.0)
        clf.head.bias.zero_()
    assert accuracy(clf, images, labels, batch_size=4) == pytest.approx(naive())
    # a test label past the head's columns is a miss, not an error
    assert accuracy(clf, images, labels + 3) == 0.0


@pytest.mark.slow
def test_zero3_finetune_returns_the_whole_weights_of_zero0(tiny_model_dir, train_shards):
    """Under ZeRO-3 the engine's module holds empty parameters (each rank keeps slices):
    finetune() gathers them, so what it scores and saves equals ZeRO-0's run (one process, the
    same data and seed) instead of 0-element tensors."""
    from mmssl.eval.data import shard_urls
    from mmssl.eval.finetune import _images_and_labels, accuracy, finetune
    from mmssl.eval.loading import load_model

    loaded = load_model(tiny_model_dir)
    urls = shard_urls(train_shards)
    kw = {"steps": 4, "lr": 3e-3, "batch_size": 8, "limit": 16}
    images, labels = _images_and_labels(urls, loaded.preprocess, "label", 8, 16)
    linear = torch.nn.functional.linear
    state, top1 = {}, {}
    for stage in ("zero0", "zero3"):
        clf = finetune(loaded.model, urls, loaded.preprocess, "label", 3, deepspeed=stage, **kw)
        top1[stage] = accuracy(clf, images, labels)  # a forward releases ZeRO-3's gathered weights
        state[stage] = clf.state_dict()
    assert top1["zero3"] == top1["zero0"]
    # ZeRO-3 replaced F.linear for the whole process, which later code then ran
    assert torch.nn.functional.linear is linear
    assert state["zero3"].keys() == state["zero0"].keys()
    for k, v in state["zero0"].items():
        torch.testing.assert_close(state["zero3"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    start = loaded.model.visual.patch_embed.proj.weight
    assert not torch.equal(state["zero3"]["visual.patch_embed.proj.weight"], start)


def _finetune_state(model_dir: str, urls: str, stage: str) -> dict:
    from mmssl.eval.data import shard_urls
    from mmssl.eval.finetune import finetune
    from mmssl.eval.loading import load_model

    loaded = load_model(model_dir)
    kw = {"steps": 4, "lr": 3e-3, "batch_size": 4, "limit": 16, "deepspeed": stage}
    clf = finetune(loaded.model, shard_urls(urls), loaded.preprocess, "label", 3, **kw)
    return {k: v.detach().clone() for k, v in clf.state_dict().items()}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_finetune_runs_and_zero3_equals_zero0(tiny_model_dir, train_shards):
    """With 2 ranks the engine's batch was --train-batch-size for both ranks together
    (DeepSpeed's "train_batch_size is not equal to micro_batch_per_gpu * ... * world_size"):
    now each rank fine-tunes on its own batch.  ZeRO-3 gathers the same weights as ZeRO-0."""
    from distributed_utils import run_distributed

    states = {s: run_distributed(_finetune_state, 2, tiny_model_dir, train_shards, s) for s in ("zero0", "zero3")}  # fmt: skip
    zero0 = states["zero0"][0]
    for stage, ranks in states.items():
        for rank, state in enumerate(ranks):
            assert state.keys() == zero0.keys()
            for k, v in zero0.items():
                torch.testing.assert_close(
                    state[k], v, rtol=1e-4, atol=1e-5, msg=f"{stage} {rank} {k}"
                )


def test_layer_decay_reaches_the_fine_tuning_engine(tiny_model_dir, train_shards, tmp_path):
    """--layer-decay d: the patch embedding (lr x d^(L+1)) hardly moves at a tiny d, where it
    moves without; the head trains at the full lr either way.  Out of (0, 1] is refused."""
    from mmssl.eval.data import shard_urls
    from mmssl.eval.finetune import finetune
    from mmssl.eval.loading import EvalError, load_model

    loaded = load_model(tiny_model_dir)
    urls = shard_urls(train_shards)
    kw = {"steps": 3, "lr": 3e-3, "batch_size": 8, "limit": 16}
    start = loaded.model.visual.patch_embed.proj.weight.detach().clone()
    moved = {}
    for d in (None, 1e-3):
        clf = finetune(loaded.model, urls, loaded.preprocess, "label", 3, layer_decay=d, **kw)
        moved[d] = (clf.visual.patch_embed.proj.weight.detach() - start).abs().max().item()
        assert clf.head.weight.abs().max() > 1e-4  # the head (lr x 1) trained
    assert moved[None] > 1e-4 and moved[1e-3] < 1e-8, moved
    argv = ["finetune", "--model", tiny_model_dir, "--train", train_shards, "--test", train_shards]
    with pytest.raises(EvalError, match=r"--layer-decay must be in \(0, 1\], got 0.0"):
        run_task([*argv, "--layer-decay", "0", "--out", str(tmp_path / "o")])
