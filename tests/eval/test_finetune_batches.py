"""Fine-tuning from memory walks one seeded permutation after another: every image once
before any repeats."""

from __future__ import annotations

import torch

from mmssl.eval.finetune import _memory_batches, accuracy


def test_memory_batches_walk_whole_permutations():
    n, b = 10, 4
    images, labels = torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n)
    it = _memory_batches(images, labels, b, seed=0)
    seen = torch.cat([next(it)[1] for _ in range(5)])  # 20 draws = two whole permutations
    assert sorted(seen[:10].tolist()) == list(range(n))
    assert sorted(seen[10:].tolist()) == list(range(n))
    g = torch.Generator().manual_seed(0)  # the documented order: randperm after randperm
    assert seen.tolist() == torch.cat([torch.randperm(n, generator=g) for _ in range(2)]).tolist()


class _Fixed:
    def logits(self, x):
        return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)


def test_a_label_without_a_head_column_is_a_miss():
    images = torch.zeros(2, 3, 4, 4)
    # class 1 has a column and is predicted: a hit; class 5 has none: a miss, even though
    # the prediction is the last column, which a clamped label 5 would be
    assert accuracy(_Fixed(), images, torch.tensor([1, 5])) == 0.5
