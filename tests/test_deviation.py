"""Deviation weights: the worked example of docs/method.md section 2, a naive per-prompt reference, edge cases."""

import numpy as np
import pytest
import torch

from ddpo.deviation import chosen_weights, deviation_weights, group_minmax, mean_cosine_distance

SEM = torch.tensor([[1, 0, 0], [0.9, 0.1, 0], [0.8, 0.2, 0.1], [0, 0, 1.0]])
STY = torch.tensor([[1, 0], [1, 0.1], [0, 1], [0.7, 0.7]])


@pytest.mark.parametrize("embs, expected", [
    ([SEM], [0.2055, 0.1669, 0.0, 3.6276]),
    ([STY], [0.8888, 0.5846, 2.5266, 0.0]),
    ([SEM, STY], [2.3109, 1.6891, 0.0, 0.0]),
], ids=["semantic", "style", "both"])
def test_worked_example(embs, expected):
    weights, _ = deviation_weights(embs, torch.zeros(4, dtype=torch.long))
    np.testing.assert_allclose(weights.numpy(), expected, atol=1e-4)
    # pairs (c1, r1) and (c2, r2): only the chosen weight enters the loss
    assert chosen_weights(weights, torch.tensor([0, 2])).numpy() == pytest.approx([expected[0], expected[2]], abs=1e-4)


def released_weights(pools_per_metric):
    """The released code's arithmetic, per prompt, with Python loops: pairwise distances, min-max (0 when max == min,
    exactly as released: callers use pools whose deviations differ), geometric mean, score = p / mean(p) - 1; the loss
    multiplies by score + 1."""
    K = len(pools_per_metric)
    n = len(pools_per_metric[0])
    p = np.ones(n)
    for embs in pools_per_metric:
        e = [v / np.linalg.norm(v) for v in np.asarray(embs, dtype=np.float64)]
        dev = np.array([np.mean([1 - e[i] @ e[j] for j in range(n) if j != i]) if n > 1 else 0.0 for i in range(n)])
        d = np.zeros(n) if dev.max() == dev.min() else 2 * (dev - dev.min()) / (dev.max() - dev.min()) - 1
        p *= ((d + 1) / 2) ** (1 / K)
    score = p / p.mean() - 1 if p.mean() > 0 else np.zeros(n)
    return score + 1


@pytest.mark.parametrize("K", [1, 2])
def test_vectorised_equals_per_prompt_loop_on_ragged_groups(K):
    g = torch.Generator().manual_seed(0)
    sizes = [1, 2, 3, 8, 31, 5]
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(group), generator=g)  # groups need not be contiguous
    group = group[perm]
    embs = [torch.randn(len(group), d, generator=g) for d in (16, 7)[:K]]
    weights, devs = deviation_weights(embs, group)
    for i in range(len(sizes)):
        rows = (group == i).nonzero()[:, 0]
        want = released_weights([e[rows].numpy() for e in embs])
        np.testing.assert_allclose(weights[rows].numpy(), want, atol=1e-9)
        assert weights[rows].mean().item() == pytest.approx(1.0)  # the mean weight of a pool is 1


def test_edge_cases():
    two = deviation_weights([torch.randn(2, 4)], torch.zeros(2, dtype=torch.long))[0]
    assert two.tolist() == [1.0, 1.0]  # N = 2: max == min, every weight 1
    same = torch.randn(1, 8).repeat(5, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]])
    assert deviation_weights([same], torch.zeros(5, dtype=torch.long))[0].tolist() == [1.0] * 5  # identical responses
    one = deviation_weights([torch.randn(1, 3)], torch.zeros(1, dtype=torch.long))[0]
    assert one.tolist() == [1.0]
    # every p is 0 (each response is the least deviating under one metric): weights 1, not NaN
    sem = torch.tensor([[1.0, 0], [1.0, 0.0], [0.0, 1.0]])  # dev: 0.5, 0.5, 1 -> d = -1, -1, 1
    sty = torch.tensor([[1.0, 0], [0.0, 1.0], [0.0, 1.0]])  # dev: 1, .5, .5  -> d = 1, -1, -1
    w, _ = deviation_weights([sem, sty], torch.zeros(3, dtype=torch.long))
    assert w.tolist() == [1.0, 1.0, 1.0]
    assert chosen_weights(torch.tensor([0.0, 0.1, 3.0]), torch.tensor([0, 1, 2]),
                          0.2).tolist() == pytest.approx([0.2, 0.2, 3.0])


def test_mean_cosine_distance_and_minmax_hand_values():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    dev = mean_cosine_distance(e, torch.zeros(3, dtype=torch.long))
    c = 1 - 2**-0.5
    np.testing.assert_allclose(dev.numpy(), [(1 + c) / 2, (1 + c) / 2, c], atol=1e-12)
    assert group_minmax(dev, torch.zeros(3, dtype=torch.long)).tolist() == pytest.approx([1.0, 1.0, -1.0])
