"""What the probes say about their classes and what kNN holds in memory: a train split of
one class is refused by few-shot as by the linear probe (it scored 1.0 for an untrained
model); test classes without train samples are named in a warning with their share of the
test set; kNN scores its queries in blocks (the whole (M, N) similarity and its temporaries
took ~5x one float64 matrix, ~29 GB at ImageNet's 16-shot scale); and a features file under
another name is read as one, not as a damaged shard."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mmssl.eval import classifiers, fewshot, linear
from mmssl.eval.cli import run_task
from mmssl.eval.features import main as features_main
from mmssl.eval.loading import EvalError


def _blobs(labels: list[int], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n points around each of 3 orthogonal centres, one per label: separable classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, dtype=torch.float64) * 5
    x = torch.cat(
        [centres[c] + 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64) for c in labels]
    )
    return x, torch.tensor([c for c in labels for _ in range(n)])


def test_one_train_class_is_refused_by_few_shot_and_linear():
    tx, ty = _blobs([0], 10)
    qx, qy = _blobs([0], 10, seed=1)
    with pytest.raises(
        EvalError,
        match=r"few-shot classification needs at least two classes in the train split, got \[0\]",
    ):
        fewshot.evaluate(tx, ty, qx, qy, shots=(1,), seeds=(0,))
    with pytest.raises(EvalError, match="a linear probe needs at least two classes"):
        linear.sweep(tx, ty, qx, qy)


def test_test_classes_without_train_samples_are_named_with_their_share():
    """Separable clusters, train {0, 1}, test {0, 1, 2}: every method scores exactly 2/3 (the
    analytic ceiling), and the warning says why."""
    tx, ty = _blobs([0, 1], 20)
    qx, qy = _blobs([0, 1, 2], 10, seed=1)
    says = r"1 test classes have no train sample \(2\): their 10 of 30 test samples \(33.3%\)"
    with pytest.warns(RuntimeWarning, match=says):
        res = fewshot.evaluate(tx, ty, qx, qy, shots=(1,), seeds=(0,))
    assert {m: r[1]["mean"] for m, r in res.items()} == pytest.approx(dict.fromkeys(res, 2 / 3))
    with pytest.warns(RuntimeWarning, match=says):
        assert linear.sweep(tx, ty, qx, qy)["top1"] == pytest.approx(2 / 3)


def test_knn_votes_in_blocks_equal_the_whole_matrix():
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(50, 8, generator=g), torch.randn(23, 8, generator=g)
    y = torch.randint(-3, 4, (50,), generator=g)
    x[7] = x[3]  # a tie at the k-th place
    whole = classifiers.knn_scores(x, y, q, 5, 0.1, block_elements=10**9)
    for block in (1, 50, 7 * 50, 10 * 50 + 3):
        blocks = classifiers.knn_scores(x, y, q, 5, 0.1, block_elements=block)
        assert torch.equal(blocks[0], whole[0])  # the classes
        torch.testing.assert_close(blocks[1], whole[1], rtol=1e-12, atol=1e-12)  # BLAS blocking


@pytest.mark.slow
def test_knn_memory_does_not_grow_with_queries_times_support():
    """6000 queries x 4000 support: one float64 (M, N) matrix is 192 MB; the peak grew 4.7x
    that before the blocks, and stays under 1.5x with them."""
    code = textwrap.dedent(
        """
        import resource, torch
        torch.set_num_threads(1)
        from mmssl.eval import classifiers
        M, N = 6000, 4000
        x, y, q = torch.randn(N, 16), torch.arange(N) % 100, torch.randn(M, 16)
        classifiers.knn_scores(x[:10], y[:10], q[:10])  # first-call allocations
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        classifiers.knn_scores(x, y, q, 20, 0.07)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / (M * N * 8))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 1.5, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t.st", "t.SAFETENSORS"])
def test_a_features_file_under_another_name_is_read_as_one(
    tmp_path, tiny_model_dir, test_shards, name
):
    """`mmssl features --out t.st` wrote a file the tasks read as a tar shard ("shard t.st
    is damaged"); t.SAFETENSORS was a shard pattern.  Both are the features file now, and give
    the scores of the same features under the usual name."""
    f, ref = str(tmp_path / name), str(tmp_path / "ref.safetensors")
    for out in (f, ref):
        assert features_main(["--model", tiny_model_dir, "--data", test_shards, "--out", out]) == 0
    for task in (
        ["zeroshot", "--data", "{}", "--classes", "color", "--label-field", "label"],
        ["fewshot", "--train", "{}", "--test", test_shards, "--shots", "1", "--seeds", "1"],
    ):
        got, want = (
            run_task(
                [
                    task[0],
                    "--model",
                    tiny_model_dir,
                    *(p if a == "{}" else a for a in task[1:]),
                    "--out",
                    str(tmp_path / f"{task[0]}{i}"),
                ]
            )
            for i, p in enumerate((f, ref))
        )
        assert got.keys() == want.keys()
        torch.testing.assert_close(
            {k: v for k, v in got.items() if not isinstance(v, str)},
            {k: v for k, v in want.items() if not isinstance(v, str)},
            equal_nan=True,  # a colour without test images
        )


def test_the_extension_is_matched_in_any_case(tmp_path):
    """A missing .SAFETENSORS is a missing features file, not an empty shard pattern."""
    from mmssl.eval.features_file import names_features_file

    for name in ("feats.SAFETENSORS", "feats.SafeTensors", "feats.safetensors"):
        assert names_features_file(str(tmp_path / name))  # missing: still a features file
    (tmp_path / "train-0.tar").write_bytes(b"\0" * 1024)
    assert not names_features_file(str(tmp_path / "train-0.tar"))
    assert not names_features_file(str(tmp_path / "train-{0..3}.tar"))
