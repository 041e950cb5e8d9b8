"""The Task's losses against losses written out by hand from the model's public pieces
(encode_image / encode_text / forward_pooled / caption_logits / project / condition) and
naive loop implementations of NT-Xent, CLIP, SigLIP and next-token cross-entropy.

Each test caught a mutant of mmssl/train/tasks.py that the other tests let through (a
mutation audit): a loss with the right value but a gradient cut off, a source conditioned
on another's prompt, positives ignored, the wrong view read.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmssl
from mmssl.train.recipe import ObjectiveConfig
from mmssl.train.tasks import StepTargets, Task

# ----------------------------------------------------------------------------- naive losses


def _positives(keys: list) -> torch.Tensor:
    n = len(keys)
    return torch.tensor([[keys[i] == keys[j] for j in range(n)] for i in range(n)])


def naive_clip(img, txt, scale, pos=None):
    """Mean over the 2N anchors of -mean_{j positive} log softmax_j(scale * cos)."""
    n = img.shape[0]
    pos = torch.eye(n, dtype=torch.bool) if pos is None else pos | torch.eye(n, dtype=torch.bool)
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    logits = scale * img @ txt.T
    total = 0.0
    for lg, p in ((logits, pos), (logits.T, pos.T)):
        for i in range(n):
            lp = lg[i].log_softmax(-1)
            total = total - lp[p[i]].mean()
    return total / (2 * n)


def naive_siglip(img, txt, t, b, pos=None):
    n = img.shape[0]
    pos = torch.eye(n, dtype=torch.bool) if pos is None else pos | torch.eye(n, dtype=torch.bool)
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if pos[i, j] else -1.0
            total = total - F.logsigmoid(z * (t * img[i] @ txt[j] + b))
    return total / n


def naive_nt_xent(z1, z2, tau, pos=None):
    """2N anchors; candidates all views but itself; positives: the other view of the same
    sample and both views of every sample marked positive."""
    n = z1.shape[0]
    pos = torch.eye(n, dtype=torch.bool) if pos is None else pos | torch.eye(n, dtype=torch.bool)
    z = F.normalize(torch.cat([z1, z2]).double(), dim=-1)
    total = 0.0
    for a in range(2 * n):
        others = [c for c in range(2 * n) if c != a]
        lp = (z[a] @ z[others].T / tau).log_softmax(-1)
        p = [k for k, c in enumerate(others) if pos[a % n, c % n]]
        total = total - lp[p].mean()
    return total / (2 * n)


def naive_next_token(logits, text, mask):
    """Token mean of -log p(text[t+1] | ..t) over the t with mask[t+1]."""
    total, count = 0.0, 0
    for b in range(text.shape[0]):
        for t in range(text.shape[1] - 1):
            if mask[b, t + 1]:
                total = total - logits[b, t].double().log_softmax(-1)[text[b, t + 1]]
                count += 1
    return total / count, count


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), torch.as_tensor(b).double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- batches


def _caption_batch(n: int = 6, t: int = 8) -> dict:
    """Captions with repeats: rows 0, 2, 4 share their valid tokens, but rows 0 and 2 differ in
    the padding (masked-out ids); rows 1, 3 are equal; row 5 is alone."""
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, 500, (n, t), generator=g)
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[:, :5] = True
    text[2, :5] = text[0, :5]
    text[4, :5] = text[0, :5]
    text[3, :5] = text[1, :5]
    text[2, 5:] = text[0, 5:] + 1  # other padding ids
    text[4, 5:] = text[0, 5:]
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "text": text, "text_mask": mask}


CAPTION_KEYS = [0, 1, 0, 1, 0, 5]


# ----------------------------------------------------------------------------- tests


def test_clip_with_caption_positives_is_the_naive_multi_positive_loss():
    """positives=caption: images and texts of equal captions (padding ignored) are positives."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_clip")
    batch = _caption_batch()
    task = Task(model, {"clip": ObjectiveConfig(source="train", positives="caption")})
    loss, _ = task({"train": batch})
    with torch.no_grad():
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["text"], batch["text_mask"])
        scale = min(model.logit_scale.exp().item(), 100.0)
    want = naive_clip(img, txt, scale, _positives(CAPTION_KEYS))
    _close(loss, want)
    # NOTE: for CLIP this equals the plain pair loss: rows of equal captions have equal text
    # embeddings, so the soft targets over them sum to the identity targets' terms (the
    # mutants m09/m18 are equivalent here; the SigLIP test below kills them)
    _close(want, naive_clip(img, txt, scale), 1e-9)


def test_siglip_with_caption_positives_is_the_naive_sigmoid_loss():
    """Kills m09 (keys dropped) and m18 (padding ids compared)."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_clip")
    batch = _caption_batch()
    task = Task(model, {"siglip": ObjectiveConfig(source="train", positives="caption")})
    loss, _ = task({"train": batch})
    with torch.no_grad():
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["text"], batch["text_mask"])
    want = naive_siglip(img, txt, 10.0, -10.0, _positives(CAPTION_KEYS))
    _close(loss, want)


def test_simclr_with_label_positives_is_the_naive_supervised_nt_xent():
    """positives=label: every view of a sample of the same label is a positive.  Kills m08."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_simclr")
    g = torch.Generator().manual_seed(1)
    views = [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]
    aug = [torch.rand(6, 13, generator=g) for _ in range(2)]
    label = torch.tensor([0, 1, 0, 2, 1, 0])
    task = Task(model, {"simclr": ObjectiveConfig(source="d", positives="label")})
    loss, _ = task({"d": {"views": views, "aug": aug, "label": label}})
    with torch.no_grad():
        z1, z2 = (model.project(model.forward_pooled(v)) for v in views)
    _close(loss, naive_nt_xent(z1, z2, 0.1, _positives(label.tolist())))


def test_clip_reads_the_first_view_when_the_source_renders_views():
    """Module docstring: "CLIP's image embedding is the first SimCLR view's".  Kills m10."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_clip")
    g = torch.Generator().manual_seed(2)
    batch = _caption_batch()
    batch.pop("image")
    batch["views"] = [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]
    batch["aug"] = [torch.rand(6, 13, generator=g) for _ in range(2)]
    task = Task(model, {"clip": ObjectiveConfig(source="train")})
    loss, _ = task({"train": batch})
    with torch.no_grad():
        img = model.encode_image(batch["views"][0])
        txt = model.encode_text(batch["text"], batch["text_mask"])
        scale = min(model.logit_scale.exp().item(), 100.0)
    _close(loss, naive_clip(img, txt, scale))


def test_clip_scale_is_clamped_at_max_logit_scale():
    """exp(logit_scale) above max_logit_scale: the loss uses max_logit_scale.  Kills m17."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_clip")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(60.0))
    batch = _caption_batch()
    task = Task(model, {"clip": ObjectiveConfig(source="train", max_logit_scale=20.0)})
    loss, m = task({"train": batch})
    with torch.no_grad():
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["text"], batch["text_mask"])
    _close(loss, naive_clip(img, txt, 20.0))
    assert float(m["logit_scale"]) == pytest.approx(20.0)


def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _same_grads(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_captioning_loss_and_gradients_are_the_written_out_ones():
    """CoCa cross mode: the decoder reads the text tower's hidden states of this step, and the
    image tokens; both towers get the captioning gradient.  Kills m13 (text hidden detached)
    and m14 (image tokens detached), which leave the loss value unchanged."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_coca")
    batch = _caption_batch()
    task = Task(model, {"captioning": ObjectiveConfig(source="train")})
    loss, _ = task({"train": batch})
    got = _grads(model, loss)
    tokens = model.forward_features(batch["image"])["tokens"]
    logits = model.caption_logits(tokens, batch["text"], batch["text_mask"])
    want_loss, _ = naive_next_token(logits, batch["text"], batch["text_mask"])
    _close(loss, want_loss.detach())
    want = _grads(model, want_loss.float())
    assert any(n.startswith("text.") for n in want) and any(n.startswith("visual.") for n in want)
    _same_grads(got, want)


def test_augself_gradients_reach_both_views_features():
    """Kills m25 (one view's features detached: same value, half the gradient)."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_simclr")
    g = torch.Generator().manual_seed(4)
    views = [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]
    aug = [torch.rand(6, 13, generator=g) for _ in range(2)]
    task = Task(model, {"augself": ObjectiveConfig(source="d", hidden=16)})
    loss, _ = task({"d": {"views": views, "aug": aug}})
    got = _grads(task, loss)
    f1, f2 = (model.forward_pooled(v) for v in views)
    want_loss = task.heads["augself"](f1, f2, aug[0], aug[1])
    _close(loss, want_loss.detach())
    _same_grads(got, _grads(task, want_loss))


def _lm_batch():
    g = torch.Generator().manual_seed(5)
    text = torch.randint(3, 500, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False  # 4 targets
    mask[1, 3:] = False  # 2 targets
    return {"text": text, "text_mask": mask}  # row 2: 7 targets; 13 in all


def test_target_counts_count_only_the_masked_targets():
    """Kills m16 (padding counted): the step's token mean would be divided by 21, not 13."""
    model = mmssl.create_model("test_tiny_coca")
    task = Task(model, {"next_token": ObjectiveConfig(source="t")})
    assert task.target_counts({"t": _lm_batch()}) == {"next_token": 13}


def test_a_micro_batch_is_normalised_by_the_steps_count_over_its_micro_batches():
    """StepTargets: 39 targets over 3 micro-batches; this micro-batch (13 targets) returns its
    summed loss / (39 / 3).  Kills m01 (no division by the micro-batches)."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_coca")
    batch = _lm_batch()
    task = Task(model, {"next_token": ObjectiveConfig(source="t")})
    st = StepTargets({"next_token": torch.tensor(39)}, micro_batches=3)
    loss, _ = task({"t": batch}, step_targets=st)
    with torch.no_grad():
        logits = model.lm_logits(batch["text"], batch["text_mask"])
    mean, count = naive_next_token(logits, batch["text"], batch["text_mask"])
    assert count == 13
    _close(loss, mean * count / (39 / 3))


def _text_conditioned_clip(**vision):
    from mmssl.tokenizer import get_tokenizer

    tok = get_tokenizer()
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_clip",
        text={"vocab_size": tok.vocab_size},
        vision=vision or {"cond_dim": 16},
        condition={"source": "text", "dim": 16},
    )
    with torch.no_grad():  # conditioning weights off their neutral init, so prompts matter
        for name, p in model.named_parameters():
            if "modulation" in name or "gate" in name or "conditioner" in name:
                p.normal_(0, 0.5)
    return tok, model


@pytest.mark.parametrize("vision", [{"cond_dim": 16}, {"cond_tokens": 2}], ids=["adaln", "prefix"])
def test_each_source_is_conditioned_on_its_own_prompt(vision):
    """Two sources, two prompts: each source's images get its own prompt's c, written out with
    model.condition(cond_text=prompt ids) and encode_image(images, c).  Kills m03 (every
    source conditioned on the first source's prompt) and, with prefix tokens, m04."""
    tok, model = _text_conditioned_clip(**vision)
    prompts = {"a": "a photo of a digit", "b": "a red car"}
    g = torch.Generator().manual_seed(6)
    batches = {}
    for name in prompts:
        text = torch.randint(3, tok.vocab_size, (5, 9), generator=g)
        mask = torch.arange(9)[None] < torch.tensor([[9], [6], [4], [8], [3]])
        batches[name] = {
            "image": torch.rand(5, 3, 32, 32, generator=g),
            "text": text,
            "text_mask": mask,
        }
    objectives = {
        f"clip_{n}": ObjectiveConfig(type="clip", source=n, condition_prompt=p)
        for n, p in prompts.items()
    }
    _, metrics = Task(model, objectives)(batches)
    with torch.no_grad():
        scale = min(model.logit_scale.exp().item(), 100.0)
        for name, prompt in prompts.items():
            ids = torch.tensor([tok.encode(prompt, add_bos=True, add_eos=True)])
            c = model.condition(cond_text=ids)
            b = batches[name]
            img = model.encode_image(b["image"], c.expand(5, -1))
            txt = model.encode_text(b["text"], b["text_mask"])
            _close(metrics[f"loss/clip_{name}"], naive_clip(img, txt, scale))


def test_only_text_sources_are_packed_and_full_captions_keep_their_last_token():
    """Kills m27 (image_text sources taken for packed LM rows): a caption filling its row
    lost its last token (the eos the tower pools at) in every CLIP step."""
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import packed_sources

    recipe = recipe_from_dict(
        {
            "model": {"name": "test_tiny_coca"},
            "data": {
                "sources": {
                    "pairs": {"urls": "synthetic", "kind": "image_text"},
                    "lm": {"urls": "synthetic", "kind": "text"},
                }
            },
            "objectives": {"clip": {"source": "pairs"}, "next_token": {"source": "lm"}},
            "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
        }
    )
    packed = packed_sources(recipe)
    assert packed == ["lm"]
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_clip")
    g = torch.Generator().manual_seed(8)
    batch = {
        "image": torch.rand(4, 3, 32, 32, generator=g),
        "text": torch.randint(3, 500, (4, 8), generator=g),
        "text_mask": torch.ones(4, 8, dtype=torch.bool),
    }  # captions filling the row
    loss, _ = Task(model, {"clip": ObjectiveConfig(source="pairs")}, packed=packed)(
        {"pairs": batch}
    )
    with torch.no_grad():
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["text"], batch["text_mask"])
        scale = min(model.logit_scale.exp().item(), 100.0)
    _close(loss, naive_clip(img, txt, scale))


def _validate(data):
    from mmssl.train.recipe import recipe_from_dict, validate

    return validate(recipe_from_dict(data), world_size=1, check_files=False)


def test_text_conditioned_siglip_needs_a_conditioned_backbone():
    """Kills m29: siglip, as clip, compares visual.proj(pooled), which only a conditioned
    backbone changes; without vision.cond_dim/cond_tokens the prompt would train nothing."""
    from mmssl.schema import ConfigError

    data = {
        "model": {
            "name": "test_tiny_clip",
            "overrides": {"text": {"vocab_size": 8192}, "condition": {"source": "text", "dim": 16}},
        },
        "data": {"sources": {"train": {"urls": "synthetic", "kind": "image_text"}}},
        "objectives": {"siglip": {"source": "train", "condition_prompt": "a digit"}},
        "train": {"global_batch_size": 4, "micro_batch_size": 4},
    }
    with pytest.raises(ConfigError, match="siglip compares the image projection"):
        _validate(data)
