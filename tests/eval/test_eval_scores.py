"""Scores of degenerate models against hand-computed values (metrics, LM scoring)."""

from __future__ import annotations

import math

import pytest
import torch

from mmssl.eval.lm import stream_nll
from mmssl.eval.metrics import perplexity


def test_perplexity_of_a_confidently_wrong_model_is_inf():
    # a diverged LM: every logit 0 but a wrong token's at 2000, so each target costs 2000
    # nats (hand-computed: log(exp(2000) + V - 1) - 0); exp(2000) is past float range
    vocab = 5

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, vocab, dtype=torch.float64)
        return out.scatter(-1, ((ids + 1) % vocab)[..., None], 2000.0)

    # rows of 4 tokens: 3 + 2 targets, always 0, while the model favours token 1
    tokens = [0, 0, 0, 0, 0, 0, 0]
    total, count, _ = stream_nll(logits_fn, tokens, context_length=3)
    assert count == 5 and total / count == pytest.approx(2000.0)
    assert perplexity(total, count) == math.inf
    assert perplexity(700.0, 1) == math.exp(700.0)  # still finite just below the range


def test_zeroshot_prompts_file_refuses_repeated_class_names(tmp_path):
    import json

    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import load_classes, score

    # per-class accuracy is keyed by name: two classes called "cat" left one row for both
    emb = torch.eye(3)
    res = score(emb, emb, torch.arange(3), ["cat", "cat", "dog"])
    assert len(res["per_class"]) == 2  # what a repeated name does to the results
    path = tmp_path / "classes.json"
    prompts = [["a cat."], ["a kitten."], ["a dog."]]
    path.write_text(json.dumps({"classnames": ["cat", "cat", "dog"], "prompts": prompts}))
    with pytest.raises(EvalError, match="repeat"):
        load_classes(str(path))
    path.write_text(json.dumps({"classnames": ["cat", "", "dog"], "prompts": prompts}))
    with pytest.raises(EvalError, match="non-empty"):
        load_classes(str(path))
    path.write_text(json.dumps({"classnames": ["cat", "kitten", "dog"], "prompts": prompts}))
    assert load_classes(str(path)).prompts == prompts


def test_zeroshot_score_without_labels_is_a_clear_error():
    """score() from Python with no labels raised metrics' bare ValueError ("no samples to
    score"), and with fewer labels than images a shape ValueError from deep inside."""
    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import score

    emb = torch.eye(3)
    with pytest.raises(EvalError, match="got no labels: there are no images to classify"):
        score(emb[:0], emb, torch.zeros(0, dtype=torch.long), ["a", "b", "c"])
    with pytest.raises(
        EvalError, match=r"one label per image: 3 image embeddings, labels of shape \(2,\)"
    ):
        score(emb, emb, torch.arange(2), ["a", "b", "c"])
    assert score(emb, emb, torch.arange(3), ["a", "b", "c"])["top1"] == 1.0


class _ContextModel:
    """A stand-in for a text tower with a 16-token context: encode_text checks the width."""

    class cfg:  # noqa: N801
        class text:  # noqa: N801
            context_length = 16

    def encode_text(self, ids, mask=None, normalize=False):
        assert ids.shape[1] == 16 and mask.shape == ids.shape
        out = torch.nn.functional.one_hot(ids % 64, 64).double().sum(1) * mask.sum(1, True)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def test_zeroshot_refuses_prompts_longer_than_the_text_context():
    """A template longer than the text context was cut silently: with the quickstart's
    16-token context every class's prompt became the same token row, every image tied and
    top-1 was 0.0 without a word."""
    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import class_embeddings, render_templates
    from mmssl.tokenizer import get_tokenizer

    tok = get_tokenizer()
    words = (
        "a blurry low resolution photograph of the handwritten digit {} drawn in bright red ink"
    ).split()
    template = " ".join(words)
    classes = ["zero", "one", "seven"]
    prompts = render_templates(classes, [template, "a {}."])
    counts = {p: len(tok.encode(p, add_bos=True, add_eos=True)) for ps in prompts for p in ps}
    longest = max(counts, key=counts.get)
    assert counts[longest] > 16
    with pytest.raises(EvalError) as info:
        class_embeddings(_ContextModel(), tok, prompts)
    msg = str(info.value)
    assert repr(longest) in msg and f"{counts[longest]} tokens" in msg
    assert "context of 16" in msg and "shorten the template" in msg and "\n" not in msg
    # a prompt of exactly the context length (bos and eos counted) still passes, unchanged
    fit = max(
        (" ".join(words[:n]) for n in range(1, len(words) + 1)),
        key=lambda t: (
            max(len(tok.encode(t.replace("{}", c), True, True)) for c in classes) <= 16,
            len(t),
        ),
    )
    fitted = render_templates(classes, [fit])
    assert max(len(tok.encode(p, True, True)) for ps in fitted for p in ps) == 16
    ids, mask = tok.batch_encode([ps[0] for ps in fitted], 16)
    want = _ContextModel().encode_text(ids, mask, normalize=True).float()
    got = class_embeddings(_ContextModel(), tok, fitted)
    assert torch.allclose(got, torch.nn.functional.normalize(want, dim=-1))


def test_zeroshot_class_file_field_and_templates_must_have_the_right_types(tmp_path):
    """A class file with "field": null said "have no 'None' field" later; with "templates":
    "a photo of {}" (a string) it was read character by character: "template 'a' has no
    '{}' placeholder"."""
    import json

    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import load_classes

    path = tmp_path / "classes.json"
    for field in (None, 3, "", ["label"]):
        path.write_text(json.dumps({"classnames": ["cat", "dog"], "field": field}))
        with pytest.raises(EvalError, match=r"'field' must be a non-empty string") as info:
            load_classes(str(path))
        assert str(path) in str(info.value) and "None" not in str(info.value)
    for templates in ("a photo of {}", ["a photo of {}", 3], {"a": "{}"}):
        path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": templates}))
        with pytest.raises(EvalError, match=r"'templates' must be a list of strings") as info:
            load_classes(str(path))
        assert "has no '{}' placeholder" not in str(info.value)
    # the templates file given apart (--templates) says the same for a non-string item
    tfile = tmp_path / "templates.json"
    tfile.write_text(json.dumps(["a {}.", None]))
    path.write_text(json.dumps({"classnames": ["cat", "dog"]}))
    with pytest.raises(EvalError, match=r"templates must be a list of strings"):
        load_classes(str(path), str(tfile))
    # without 'field' the class index is in 'label', as before
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": ["a {}."]}))
    spec = load_classes(str(path))
    assert spec.field == "label" and spec.prompts == [["a cat."], ["a dog."]]
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "field": "kind"}))
    assert load_classes(str(path)).field == "kind"


def test_prompts_of_a_tokenizer_without_a_mask_are_encoded_as_batch_encode_does():
    """Nothing to measure the length with: the rows are the tokenizer's own at the context
    length (its cut keeps its end token), not the first columns of a wider encoding."""
    import torch

    from mmssl.eval.zeroshot import _encode_prompts

    class NoMask:
        def batch_encode(self, texts, context_length):
            rows = [[1, *range(10, 10 + len(t)), 2] for t in texts]
            rows = [r if len(r) <= context_length else [*r[: context_length - 1], 2] for r in rows]
            ids = torch.zeros(len(texts), context_length, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
            return ids, None

    texts = ["a long prompt", "ab"]
    ids, mask, cut = _encode_prompts(NoMask(), texts, 6)
    assert torch.equal(ids, NoMask().batch_encode(texts, 6)[0]) and mask is None and cut == []


def test_zeroshot_class_file_with_templates_and_other_prompts_is_refused(tmp_path):
    """With both keys the templates won and edited "prompts" were dropped without a word;
    the demo's class files carry both, the prompts rendered from the templates, and load as
    before."""
    import json

    from mmssl.data.demo import class_files
    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import load_classes

    path = tmp_path / "classes.json"
    both = {"classnames": ["cat", "dog"], "templates": ["a {}.", "my {}"]}
    both["prompts"] = [["something red."], ["something blue."]]
    path.write_text(json.dumps(both))
    with pytest.raises(EvalError) as info:
        load_classes(str(path))
    assert str(info.value) == (
        f"{path} has both 'templates' and 'prompts', and the prompts are not the templates "
        "filled with the class names: remove 'templates' to use the prompts, or 'prompts' to "
        "use the templates"
    )
    # one prompt of one class missing is a difference too
    both["prompts"] = [["a cat.", "my cat"], ["a dog."]]
    path.write_text(json.dumps(both))
    with pytest.raises(EvalError, match="has both 'templates' and 'prompts'"):
        load_classes(str(path))
    # the prompts the templates render (by hand): accepted, as the templates alone
    both["prompts"] = [["a cat.", "my cat"], ["a dog.", "my dog"]]
    path.write_text(json.dumps(both))
    assert load_classes(str(path)).prompts == both["prompts"]
    # each key alone, as before
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "prompts": [["x"], ["y"]]}))
    assert load_classes(str(path)).prompts == [["x"], ["y"]]
    # the demo's class files (both keys) still load, with their own prompts
    class_files(str(tmp_path))
    for name, field in (("classes_digit.json", "digit"), ("classes_color.json", "color")):
        data = json.loads((tmp_path / name).read_text())
        assert "prompts" in data and ("templates" in data) == (field == "color")
        spec = load_classes(str(tmp_path / name))
        assert spec.field == field and spec.prompts == data["prompts"]


def test_zeroshot_templates_are_a_json_list_inline_or_in_a_file(tmp_path):
    """--templates' help says "JSON list of templates": given inline, it was looked for as a
    file, and the error called it a missing "class file"."""
    import json

    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import load_classes

    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": ["x {}"]}))
    inline = load_classes(str(path), '["a photo of a {}.", "{} things"]')
    assert inline.prompts == [
        ["a photo of a cat.", "cat things"],
        ["a photo of a dog.", "dog things"],
    ]
    tfile = tmp_path / "t.json"
    tfile.write_text('["a photo of a {}.", "{} things"]')
    assert load_classes(str(path), str(tfile)).prompts == inline.prompts
    with pytest.raises(EvalError, match=r"templates file not found: .*nope\.json$"):
        load_classes(str(path), str(tmp_path / "nope.json"))
    with pytest.raises(EvalError, match="not a valid JSON list"):
        load_classes(str(path), '["a {}.",')
