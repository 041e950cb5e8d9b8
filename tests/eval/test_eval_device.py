"""Evaluation runs on the model's device: every input a forward gets is moved there.

Without a GPU the model is put on the "meta" device (shapes, no data), and the calls run
under `StrictDevices`, which refuses any torch call that mixes meta and CPU tensors as a GPU
refuses CUDA and CPU ones (a meta kernel does not always check: an embedding of CPU ids on
meta weights runs).  A path that moves its inputs then runs every forward and fails only
where it copies a result back to the CPU ("Cannot copy out of meta tensor"), or reads a
value (`float`, `.item()`); one that leaves an input on the CPU fails at that forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from mmssl.eval.loading import load_model
from mmssl.models.io import load_pretrained

META = torch.device("meta")
COPY_OUT = "Cannot copy out of meta tensor"  # the first .cpu() of a result
READ_OUT = r"item\(\) cannot be called on meta tensors"  # the first float() of a result


class MixedDevices(AssertionError):
    """A torch call got tensors on two devices."""


class StrictDevices(TorchFunctionMode):
    """Refuse torch calls whose tensor arguments lie on different devices (0-dim CPU tensors
    excepted: CUDA takes those as scalars)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        devices = {
            t.device
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
        }
        if len(devices) > 1:
            raise MixedDevices(f"{getattr(func, '__name__', func)} got tensors on {devices}")
        return func(*args, **kwargs)


@contextmanager
def strict() -> Iterator[None]:
    with StrictDevices():
        yield


@pytest.fixture()
def meta_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text tower's host-side mask checks read the mask's values (one sync on a GPU),
    which a meta tensor does not have: passed over, every mask being right-padded here."""
    import mmssl.models.text as text

    monkeypatch.setattr(text, "text_mask_faults", lambda m: torch.zeros(2, len(m), dtype=bool))
    monkeypatch.setattr(text, "trim_padding", lambda t, m, multiple=8, limit=None: (t, m))


@pytest.fixture()
def meta_clip(tiny_model_dir: str) -> Any:
    """test_tiny_clip (vision, text, LM head) on the meta device, in eval mode."""
    return load_pretrained(tiny_model_dir).eval().to(META)


def _images(n: int = 3) -> Tensor:
    return torch.rand(n, 3, 32, 32)


# ----------------------------------------------------------------------------- loading


def test_load_model_puts_the_model_on_the_engines_device(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: str
) -> None:
    import mmssl.train.engine as engine

    assert {p.device for p in load_model(tiny_model_dir).model.parameters()} == {
        torch.device("cpu")
    }
    monkeypatch.setattr(engine, "device", lambda: META)
    # where DeepSpeed may find an accelerator: DS_ACCELERATOR names one (without, and without
    # CUDA, the CPU, and DeepSpeed is not imported)
    assert {p.device for p in load_model(tiny_model_dir).model.parameters()} == {
        torch.device("cpu")
    }
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    model = load_model(tiny_model_dir).model
    assert {t.device for t in [*model.parameters(), *model.buffers()]} == {META}
    from mmssl.eval.loading import model_device

    assert model_device(model) == META


# ----------------------------------------------------------------------------- features


def test_feature_batches_run_on_the_models_device(meta_clip: Any) -> None:
    from mmssl.eval.features import embed_batch

    with strict():
        out = embed_batch(meta_clip, _images())
    assert {k: (v.device, tuple(v.shape)) for k, v in out.items()} == {
        "features": (META, (3, 32)),
        "embeddings": (META, (3, 16)),
    }


def test_extract_features_moves_the_images(meta_clip: Any, test_shards: str) -> None:
    from mmssl.eval.data import Preprocess, shard_urls
    from mmssl.eval.features import extract_features

    with strict(), pytest.raises(NotImplementedError, match=COPY_OUT):
        extract_features(meta_clip, shard_urls(test_shards), Preprocess(32), batch_size=4)


def test_rows_are_gathered_on_the_given_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmssl import distributed
    from mmssl.eval.features import gather_rows

    seen: list[torch.device] = []

    def spy(x: Tensor) -> Tensor:
        seen.append(x.device)
        return x.detach()

    monkeypatch.setattr(distributed, "all_gather_no_grad", spy)
    rows = {"features": torch.rand(3, 4), "sample_index": torch.arange(3), "label": torch.ones(3)}
    back = gather_rows(rows, torch.device("cpu"))
    assert all(torch.equal(back[k], rows[k]) and back[k].device.type == "cpu" for k in rows)
    seen.clear()
    with pytest.raises(NotImplementedError, match=COPY_OUT):  # back to the CPU afterwards
        gather_rows(rows, META)
    assert seen == [META]  # the first row's gather ran on the device


# ----------------------------------------------------------------------------- text


def test_text_batches_run_on_the_models_device(meta_clip: Any, tokenizer, meta_text) -> None:
    from mmssl.eval.retrieval import embed_texts

    ids, mask = tokenizer.batch_encode(["a red seven.", "a blue two."], 32)
    with strict():
        out = embed_texts(meta_clip, ids, mask)
    assert (out.device, tuple(out.shape)) == (META, (2, 16))


def test_zeroshot_class_embeddings_move_the_prompts(meta_clip: Any, tokenizer, meta_text) -> None:
    from mmssl.eval.zeroshot import class_embeddings

    prompts = [["a red seven.", "a seven."], ["a blue two."]]
    with strict(), pytest.raises(NotImplementedError, match=COPY_OUT):
        class_embeddings(meta_clip, tokenizer, prompts, batch_size=2)


def test_retrieval_encode_texts_moves_the_captions(meta_clip: Any, tokenizer, meta_text) -> None:
    from mmssl.eval.retrieval import encode_texts

    with strict(), pytest.raises(NotImplementedError, match=COPY_OUT):
        encode_texts(meta_clip, tokenizer, ["a red seven.", "a blue two.", "a two."], 2)


def test_clip_wrapper_moves_its_inputs(meta_clip: Any, tokenizer, meta_text) -> None:
    from mmssl.eval.clip_wrapper import CLIPTokenizer, CLIPWrapper

    wrapper = CLIPWrapper(meta_clip, int(tokenizer.eos_id), int(tokenizer.bos_id))
    ids = CLIPTokenizer(tokenizer, 32)(["a red seven."])
    # the results come back to the inputs' device, the CPU: a copy out of meta
    with strict(), pytest.raises(NotImplementedError, match=COPY_OUT):
        wrapper.encode_image(_images())
    with strict(), pytest.raises(NotImplementedError, match=COPY_OUT):
        wrapper.encode_text(ids)


# ----------------------------------------------------------------------------- lm


def test_lm_logits_run_on_the_models_device(meta_clip: Any) -> None:
    from mmssl.eval.lm import model_logits

    with strict():
        out = model_logits(meta_clip)(torch.ones(2, 5, dtype=torch.int64))
    assert (out.device, tuple(out.shape)) == (META, (2, 5, meta_clip.cfg.text.vocab_size))


def test_lm_scoring_moves_ids_and_targets(meta_clip: Any, tokenizer, text_shards: str) -> None:
    """Perplexity and multiple choice: the forward and the targets it is scored against on
    the model's device; the first value read (a float of the summed log-likelihood) fails."""
    from mmssl.eval import lm

    with strict(), pytest.raises(RuntimeError, match=READ_OUT):
        lm.perplexity_report(meta_clip, tokenizer, text_shards, None, None, batch_size=2)
    with strict(), pytest.raises(RuntimeError, match=READ_OUT):
        lm.batch_loglik(lm.model_logits(meta_clip), [([1, 2, 3], [4, 5]), ([6], [7])], 32)
    with strict(), pytest.raises(RuntimeError, match=READ_OUT):
        lm._check_finite_logits(meta_clip, tokenizer)


# ----------------------------------------------------------------------------- sensitivity


@pytest.fixture()
def meta_cond() -> Any:
    """test_tiny_vit_cond (descriptor-conditioned backbone and projector) on meta."""
    import mmssl

    return mmssl.create_model("test_tiny_vit_cond").eval().to(META)


def test_sensitivity_loss_runs_on_the_models_device(meta_cond: Any) -> None:
    from mmssl.eval.sensitivity import conditioned_simclr_loss

    augs = [torch.rand(4, 13), torch.rand(4, 13)]
    with strict(), torch.no_grad():
        loss = conditioned_simclr_loss(meta_cond, [_images(4), _images(4)], augs, 0.1)
    assert (loss.device, tuple(loss.shape)) == (META, ())


def test_sensitivity_features_and_omega_usage_move_their_inputs(meta_cond: Any) -> None:
    from mmssl.eval.sensitivity import features, omega_usage

    with strict(), pytest.raises(NotImplementedError, match=COPY_OUT):
        features(meta_cond, _images(4), batch_size=2)
    batches = [([_images(4), _images(4)], [torch.rand(4, 13), torch.rand(4, 13)])]
    with strict(), pytest.raises(RuntimeError, match=READ_OUT):  # the loss's .item()
        omega_usage(meta_cond, batches, 0.1)


# ----------------------------------------------------------------------------- finetune


def test_finetuned_classifier_is_scored_on_its_device(tiny_model_dir: str) -> None:
    from mmssl.eval.finetune import Classifier, accuracy

    clf = Classifier(load_pretrained(tiny_model_dir).standalone_vision(), 3).eval().to(META)
    with strict(), pytest.raises(NotImplementedError, match=COPY_OUT):
        accuracy(clf, _images(5), torch.tensor([0, 1, 2, 0, 1]), batch_size=2)


def test_a_launched_rank_loads_onto_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before init_distributed pins it, the accelerator's current device is 0 on every rank
    (`mmssl eval finetune` loads the model first): LOCAL_RANK names the rank's own."""
    import mmssl.train.engine as engine
    from mmssl.eval.loading import _device

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(engine, "device", lambda: torch.device("cuda", 0))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert _device() == torch.device("cuda", 0)
    monkeypatch.setattr(engine, "device", lambda: torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _device() == torch.device("cpu")
