"""ddpo/diversity.py: Vendi score, effective rank, distinct classes and slop score, by hand and against numpy."""

import math

import numpy as np
import pytest
import torch

from ddpo.diversity import SLOP_FILE, distinct_classes, effective_rank, slop_patterns, slop_score, vendi_score


def numpy_vendi(x):
    """Friedman & Dieng's definition, from numpy: exp of the entropy of the eigenvalues of K/n, K cosine similarity."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = np.clip(np.linalg.eigvalsh(x @ x.T / len(x)), 0, None)
    w = w[w > 1e-12]
    return float(np.exp(-(w * np.log(w)).sum()))


def numpy_effective_rank(x):
    s = np.linalg.svd(x / np.linalg.norm(x, axis=1, keepdims=True), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_by_hand():
    # two equal samples and one orthogonal: K/n = [[1, 1, 0], [1, 1, 0], [0, 0, 1]] / 3, eigenvalues 2/3, 1/3, 0
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert vendi_score(x) == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))  # 1.8899
    # singular values of the unit rows: sqrt(2) and 1
    p = [math.sqrt(2) / (1 + math.sqrt(2)), 1 / (1 + math.sqrt(2))]
    assert effective_rank(x) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))  # 1.9706
    assert vendi_score(torch.eye(4)) == pytest.approx(4) and effective_rank(torch.eye(4)) == pytest.approx(4)
    assert vendi_score(torch.ones(5, 3)) == pytest.approx(1) and effective_rank(torch.ones(5, 3)) == pytest.approx(1)


def test_against_numpy():
    rng = np.random.default_rng(0)
    for n, d in [(2, 8), (4, 16), (8, 4), (16, 32)]:
        x = rng.normal(size=(n, d))
        assert vendi_score(torch.tensor(x)) == pytest.approx(numpy_vendi(x), rel=1e-9)
        assert effective_rank(torch.tensor(x)) == pytest.approx(numpy_effective_rank(x), rel=1e-9)


def at(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_distinct_classes_join_the_first_member_of_a_class():
    # b is 18 degrees from a (cos 0.951), c 18 from b but 36 from a (cos 0.809): c matches b, not a's class head
    x = torch.tensor([at(0), at(18), at(36)])
    assert distinct_classes(x, 0.9) == 2
    assert distinct_classes(x, 0.8) == 1 and distinct_classes(x, 0.96) == 3
    assert distinct_classes(torch.tensor([at(36), at(18), at(0)]), 0.9) == 2
    assert distinct_classes(torch.tensor([at(0), at(90), at(1), at(91)]), 0.9) == 2  # two classes, interleaved


def test_slop_score_by_hand(tmp_path):
    words = tmp_path / "slop.txt"
    words.write_text("# a comment line\ntestament\na testament to\nshivers down her spine\ndelve\n")
    # the phrase once (longest first), 'Delve'; not 'testaments'
    texts = ["It was a testament to the testaments of Delve.",
             "Shivers   down\nher spine, she said."]  # a phrase across any whitespace, any case
    # 3 hits in 9 + 6 = 15 words
    assert slop_score(texts, str(words)) == pytest.approx(1000 * 3 / 15)
    assert slop_score(["plain words only"], str(words)) == 0.0 and slop_score([""], str(words)) == 0.0
    # the list we ship names its source and parses
    head = open(SLOP_FILE).read().splitlines()[:4]
    assert any("EQ-Bench" in line for line in head) and slop_patterns().pattern.startswith(r"\b(?:")
