"""Deviation weights (docs/method.md, section 2), vectorised over ragged groups: the pure math, no models.

    weights, devs = deviation_weights([semantic, style], group)   # K x (M, D_k), (M,) -> (M,), K x (M,)
    w = chosen_weights(weights, chosen_index, min_weight=0.2)     # (B,) the weight of each pair's chosen response

A group is the pool of responses to one prompt. Responses are rows of an embedding matrix (ddpo/embedders.py makes
them), and `group` (M,) says which prompt each row belongs to (ids 0..G-1, any order). Nothing loops over groups or
pairs in Python:

  mean cosine distance   dev_i = 1/(n-1) sum_{j!=i} (1 - e_i.e_j) = 1 - (e_i.S_g - e_i.e_i) / (n-1),
                         S_g = sum of the unit embeddings of group g: O(M D) instead of O(sum n^2 D)
  min-max to [-1, 1]     d_i = 2 (dev_i - min_g) / (max_g - min_g) - 1, and 0 where max_g - min_g <= EQUAL_TOL
  geometric mean         p_i = prod_m ((d_i^m + 1) / 2) ^ (1/K)
  weights                w_i = p_i / mean_g(p), and 1 where mean_g(p) is 0 (all p equal, e.g. N = 2)

A group of one response has no deviation (dev 0, w 1). EQUAL_TOL guards the released code's `max == min` test
against float noise: without it, identical responses whose deviations differ by 1e-16 would get weights 0 and 2.
"""

import math

import torch
from ddpo_kernels.deviation_loss import (  # one tolerance for the offline path, the kernel and its reference
    EQUAL_TOL,
    deviation_loss,
)

METRICS = {"none": [], "semantic": ["semantic"], "style": ["style"], "both": ["semantic", "style"]}  # --deviation


def mean_cosine_distance(embeddings, group):
    """embeddings (M, D), group (M,) long -> dev (M,): mean cosine distance to the other members of the group."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)  # (M, D)
    G = int(group.max()) + 1
    sums = torch.zeros(G, e.shape[1], dtype=e.dtype, device=e.device).index_add_(0, group, e)  # (G, D)
    n = torch.bincount(group, minlength=G).to(e.dtype)[group]  # (M,) size of each row's group
    cos_to_others = ((e * sums[group]).sum(-1) - (e * e).sum(-1)) / (n - 1).clamp(min=1)
    return torch.where(n > 1, 1.0 - cos_to_others, torch.zeros_like(n))


def group_minmax(values, group):
    """Min-max each group's values to [-1, 1]; 0 for groups whose spread is at most EQUAL_TOL."""
    G = int(group.max()) + 1
    lo = torch.full((G,), math.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, group, values, "amin")
    hi = torch.full((G,), -math.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, group, values, "amax")
    spread = (hi - lo)[group]
    scaled = 2.0 * (values - lo[group]) / spread.clamp(min=EQUAL_TOL) - 1.0
    return torch.where(spread > EQUAL_TOL, scaled, torch.zeros_like(values))


def combine(normalised):
    """Geometric mean in [0, 1] of K min-maxed deviations, each (M,) in [-1, 1]."""
    stacked = torch.stack([(d + 1.0) / 2.0 for d in normalised])  # (K, M)
    return stacked.prod(0) ** (1.0 / len(normalised))


def group_weights(p, group):
    """w = p / mean over the group of p; 1 where that mean is 0."""
    G = int(group.max()) + 1
    sums = torch.zeros(G, dtype=p.dtype, device=p.device).index_add_(0, group, p)
    mean = sums[group] / torch.bincount(group, minlength=G).to(p.dtype)[group]
    return torch.where(mean > 0, p / mean.clamp(min=1e-300), torch.ones_like(p))


def deviation_weights(embeddings_per_metric, group):
    """The whole of docs/method.md section 2 for K metrics: returns (weights (M,), raw deviations [(M,)] per metric)."""
    devs = [mean_cosine_distance(e, group) for e in embeddings_per_metric]
    return group_weights(combine([group_minmax(d, group) for d in devs]), group), devs


def chosen_weights(weights, chosen_index, min_weight=0.0):
    """Weights of the chosen responses, clamped from below (the paper's minimum-weight ablation, on *chosen*)."""
    return weights[chosen_index].clamp(min=min_weight)


def kernel_weights(embeddings, group, chosen_index, min_weight=0.0, use_triton=None):
    """The chosen weights (B,) by the fused kernel (kernels/deviation_loss.py: Triton on CUDA, its fp64 PyTorch
    reference elsewhere), one launch over every pool; its loss, of zero logits here, is not used. Equal to
    chosen_weights(deviation_weights(...)) (tested)."""
    zeros = torch.zeros(chosen_index.shape, device=chosen_index.device)
    return deviation_loss(zeros, embeddings, group, chosen_index, min_weight, use_triton=use_triton)[2]
