"""The diversity metrics papers cite, each of one prompt's samples (ddpo.evaluate and train's eval_* rows call them).

  vendi_score        Friedman & Dieng 2023 (arXiv 2210.02410): exp of the Shannon entropy of the eigenvalues of K/n,
                     K the n x n cosine-similarity kernel of the samples' embeddings; 1 (all alike) to n (orthogonal).
  effective_rank     Roy & Vetterli 2007: exp of the entropy of the singular values of the unit-normalised embedding
                     matrix, normalised to sum 1; from 1 to min(n, dim).
  distinct_classes   NoveltyBench-style (Zhang et al. 2025, arXiv 2504.05228): the samples, in order, are partitioned
                     greedily: each joins the first class whose first member it matches (cosine similarity >=
                     threshold, --class-threshold), else starts a class. The number of classes, from 1 to n.
  slop_score         EQ-Bench-style (Paech, eqbench.com creative writing): occurrences of over-used words and phrases
                     (ddpo/data/slop.txt) per 1,000 words of the samples together; lower is better.
"""

import functools
import os
import re

import torch

SLOP_FILE = os.path.join(os.path.dirname(__file__), "data", "slop.txt")
CLASS_THRESHOLD = 0.9


def unit(embeddings):
    x = torch.as_tensor(embeddings, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def entropy_exp(p):
    """exp(-sum p log p) of a distribution p (0 log 0 = 0)."""
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).item()


def vendi_score(embeddings):
    x = unit(embeddings)  # (n, D)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / len(x)).clamp_min(0)  # K/n has trace 1: eigenvalues sum to 1
    return entropy_exp(eigenvalues / eigenvalues.sum())


def effective_rank(embeddings):
    s = torch.linalg.svdvals(unit(embeddings))
    return entropy_exp(s / s.sum())


def distinct_classes(embeddings, threshold=CLASS_THRESHOLD):
    x = unit(embeddings)
    firsts = []  # the first member of each class
    for i in range(len(x)):
        if not any((x[i] @ x[j]).item() >= threshold for j in firsts):
            firsts.append(i)
    return len(firsts)


@functools.lru_cache(maxsize=None)
def slop_patterns(path=SLOP_FILE):
    """One regular expression of the list's entries (a word or a phrase a line; '#' lines are comments), matched as
    whole words, case-insensitive, longest first."""
    with open(path, encoding="utf-8") as f:
        entries = {line.strip().lower() for line in f if line.strip() and not line.startswith("#")}
    alternatives = "|".join(r"\s+".join(map(re.escape, e.split())) for e in sorted(entries, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def slop_score(texts, path=SLOP_FILE):
    words = sum(len(t.split()) for t in texts)
    hits = sum(len(slop_patterns(path).findall(t)) for t in texts)
    return 1000.0 * hits / words if words else 0.0
