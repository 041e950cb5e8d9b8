"""The evaluation metrics mean what the peer tools' metrics of the same name mean: each test
writes the peer's formula out naively (or calls the peer) and compares on the same inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmssl.eval import classifiers, lm, retrieval, zeroshot

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_lm import CharTokenizer, bigram_logits  # noqa: E402


def test_acc_norm_divides_by_the_choice_length_without_the_delimiter():
    # lm-eval-harness scores the continuation " " + choice but normalises by len(choice):
    # process_results takes completion_len from doc_to_choice (no target_delimiter).  Here
    # that rule and "len(' ' + choice)" pick different choices.
    tok = CharTokenizer()
    space, a, b, c, x = 3, 4, 5, 6, 7
    table = torch.zeros(9, 9)
    table[a, space] = 5.0
    table[space, b] = -1.2
    table[c, x] = -2.0
    logp = table.log_softmax(-1)
    ll_b = float(logp[a, space] + logp[space, b])  # about -3.37
    ll_cx = float(logp[a, space] + logp[space, c] + logp[c, x])  # about -6.27
    assert ll_b > ll_cx  # acc picks "b"
    assert ll_cx / 2 > ll_b / 1  # the harness's acc_norm picks "cx"
    assert ll_b / 2 > ll_cx / 3  # normalising by the delimited length would pick "b"
    items = [{"context": "a", "choices": ["b", "cx"], "answer": 1}]
    res = lm.score_task(bigram_logits(table), tok, items, 0, 32)
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)


def _clip_benchmark_recall(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """clip_benchmark: a query is a hit when any positive is among its top-k gallery items."""
    top = scores.topk(k, dim=1).indices
    return float(positives.gather(1, top).any(1).double().mean())


def test_recall_matches_clip_benchmark_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        num_images = int(torch.randint(2, 10, (1,), generator=g))
        per_image = torch.randint(1, 5, (num_images,), generator=g)
        image_of_text = torch.repeat_interleave(torch.arange(num_images), per_image)
        image_emb = F.normalize(torch.randn(num_images, 8, generator=g), dim=-1)
        text_emb = F.normalize(torch.randn(len(image_of_text), 8, generator=g), dim=-1)
        pos = retrieval.positives(image_of_text, num_images)
        res = retrieval.score(image_emb, text_emb, image_of_text, ks=(1, 2, 5))
        sim = image_emb @ text_emb.T
        for k in (1, 2, 5):
            # continuous random scores: no ties, where the two may differ by design
            want_i2t = _clip_benchmark_recall(sim, pos, min(k, sim.shape[1]))
            want_t2i = _clip_benchmark_recall(sim.T, pos.T, min(k, sim.shape[0]))
            assert res[f"i2t_R@{k}"] == pytest.approx(want_i2t)
            assert res[f"t2i_R@{k}"] == pytest.approx(want_t2i)


def test_prompt_ensemble_matches_open_clip():
    zsc = pytest.importorskip("open_clip.zero_shot_classifier")
    table = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    words: dict[str, int] = {}

    def ids_of(texts: list[str]) -> torch.Tensor:
        rows = [[words.setdefault(w, len(words) + 1) for w in t.split()][:5] for t in texts]
        return torch.tensor([r + [0] * (5 - len(r)) for r in rows])

    class Tokenizer:
        def __call__(self, texts: list[str]) -> torch.Tensor:
            return ids_of(texts)

        def batch_encode(self, texts: list[str], context_length: int) -> tuple:
            return ids_of(texts), None

    class Model(torch.nn.Module):
        class cfg:  # noqa: N801
            class text:  # noqa: N801
                context_length = 5

        def encode_text(self, ids, mask=None, normalize=False):
            # prompt embeddings of very different norms: averaging before normalising differs
            out = table[ids].sum(1) * (1 + ids.sum(1, keepdim=True).float())
            return F.normalize(out, dim=-1) if normalize else out

    classnames = ["cat", "dog", "bird"]
    templates = ["a photo of a {}.", "a {} drawing", "big {}"]
    want = zsc.build_zero_shot_classifier(
        Model(), Tokenizer(), classnames, templates, device="cpu", use_tqdm=False
    ).T  # open_clip returns (E, C)
    got = zeroshot.class_embeddings(
        Model(), Tokenizer(), zeroshot.render_templates(classnames, templates)
    )
    assert torch.allclose(got, want, atol=1e-6)


def test_knn_matches_dino_weighted_votes():
    # DINO's knn_classifier: top-k cosine neighbours, one-hot labels weighted by exp(sim / T)
    g = torch.Generator().manual_seed(0)
    x, query = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    for k, t in ((20, 0.07), (5, 0.5), (1, 0.07)):
        sim = F.normalize(query.double(), dim=-1) @ F.normalize(x.double(), dim=-1).T
        top, idx = sim.topk(k, dim=1)
        one_hot = F.one_hot(y[idx], 4).double()  # (M, k, C)
        want = (one_hot * (top / t).exp()[..., None]).sum(1).argmax(1)
        assert torch.equal(classifiers.knn(x, y, query, k, t), want)


def _minimise_documented_objective(xs: torch.Tensor, y: torch.Tensor, wd: float) -> torch.Tensor:
    """Logits (N, C) of the minimiser of mean CE + wd / 2 * |W|^2 (bias free), by L-BFGS."""
    w = torch.zeros(int(y.max()) + 1, xs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(w), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        out = F.cross_entropy(xs @ w.T + b, y) + wd / 2 * (w**2).sum()
        out.backward()
        return out

    opt.step(loss)
    return (xs @ w.T + b).detach()


@pytest.mark.parametrize("wd", [1e-3, 1e-1])
def test_logistic_weight_decay_is_mean_cross_entropy_plus_half_decay_times_norm(wd):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    xs = F.normalize(x.double(), dim=-1)
    want = _minimise_documented_objective(xs, y, wd)
    want = want - want.mean(1, keepdim=True)  # softmax logits are defined up to a row constant
    got = torch.from_numpy(classifiers.fit_logistic(x, y, wd, 10_000).decision_function(xs))
    assert torch.allclose(got - got.mean(1, keepdim=True), want, atol=1e-2)
    # the comparison can tell C = 1 / (wd * N) from scikit-learn's plain C = 1 / wd
    plain = LogisticRegression(C=1 / wd, max_iter=10_000).fit(xs.numpy(), y.numpy())
    other = torch.from_numpy(plain.decision_function(xs.numpy()))
    assert not torch.allclose(other - other.mean(1, keepdim=True), want, atol=1e-2)
