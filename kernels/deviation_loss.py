"""Fused deviation-weighted loss: ragged groups of response embeddings -> deviation weights -> weighted loss.

    losses, weights, w = deviation_loss(beta * margins, [semantic, style], group, chosen_index)   # DDPO
    losses, weights, w = deviation_loss(log_odds, [semantic, style], group, chosen_index, weight_inside=True)  # DORPO

One program per prompt (group) does all of docs/method.md section 2 and the loss of the group's pairs in one launch:
  1. for each of K metrics: unit-normalise the group's embeddings, dev_i = 1 - (e_i.S - e_i.e_i) / (n - 1) with
     S = sum_j e_j (the mean cosine distance to the others, without the n x n matrix), min-max to [-1, 1]
     (0 where max - min <= EQUAL_TOL);
  2. p_i = prod_k ((d_i^k + 1) / 2)^(1/K), w_i = p_i / mean(p) (1 where mean(p) = 0);
  3. for each pair b of the group, w_b = max(w[chosen_b], min_weight) and
       DDPO  (weight outside):  loss_b = w_b * softplus(-z_b),   d loss_b / d z_b = -w_b * sigmoid(-z_b)
       DORPO (weight inside):   loss_b = softplus(-w_b z_b),     d loss_b / d z_b = -w_b * sigmoid(-w_b z_b)
     where z_b = beta * DPO margin (DDPO) or the ORPO log-odds ratio Delta_b (DORPO's odds term).
Step 1 runs in fp64, as the offline path (ddpo/deviation.py) does: near-duplicate responses have deviations that
differ by about 1e-6, and fp32 rounding there would move weights by up to 0.2 between this path and ddpo.prepare.
The forward stores d loss / d z, so the backward is one multiply. Embeddings come from a frozen embedder and get
no gradient. softplus and sigmoid are evaluated in forms that cannot overflow for any |z|.

Layout: EQUAL_TOL (the one equality tolerance, also ddpo/deviation.py's), deviation_loss_ref (plain PyTorch, one
prompt at a time with the n x n distance matrix written out, in fp64: the ground truth of the tests and the path
without Triton), the Triton kernel, the launcher, one autograd.Function, and the functional alias deviation_loss.
The DDPO and DORPO losses built on it are in ddpo/losses.py. Nothing here imports ddpo (ddpo -> kernels only).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ddpo_kernels.logprobs import use_triton_for

EQUAL_TOL = 1e-6  # deviations of one prompt that differ by at most this count as equal (the released max == min)


def group_weights_ref(embeddings):
    """Deviation weights of one prompt's n responses: [K x (n, D_k)] -> (n,) float64 (docs/method.md 2, steps 1-4)."""
    n = embeddings[0].shape[0]
    p = torch.ones(n, dtype=torch.float64, device=embeddings[0].device)
    for e in embeddings:
        e = F.normalize(e.double(), dim=-1)
        distance = 1.0 - e @ e.T  # (n, n) cosine distances
        others = ~torch.eye(n, dtype=torch.bool, device=e.device)
        dev = (distance * others).sum(1) / max(n - 1, 1)  # mean distance to the others; 0 for a lone response
        spread = dev.max() - dev.min()
        d = 2.0 * (dev - dev.min()) / spread - 1.0 if spread > EQUAL_TOL else torch.zeros_like(dev)  # in [-1, 1]
        p = p * ((d + 1.0) / 2.0) ** (1.0 / len(embeddings))  # geometric mean over the K metrics
    return p / p.mean() if p.mean() > 0 else torch.ones_like(p)


def deviation_loss_ref(logits, embeddings, group, chosen_index, min_weight=0.0, weight_inside=False):
    """logits (B,), embeddings [K x (M, D_k)], group (M,), chosen_index (B,) -> losses (B,), weights (M,), w_b (B,)."""
    weights = torch.empty(group.shape[0], dtype=torch.float64, device=group.device)
    for g in group.unique():
        rows = (group == g).nonzero()[:, 0]
        weights[rows] = group_weights_ref([e.detach()[rows] for e in embeddings])  # frozen embedder: no gradient
    w = weights[chosen_index].clamp(min=min_weight).to(logits.dtype)
    losses = -F.logsigmoid(w * logits) if weight_inside else -w * F.logsigmoid(logits)
    return losses, weights.to(logits.dtype), w


@triton.jit
def _softplus_neg(x):
    # softplus(-x) = log(1 + exp(-x)) = max(-x, 0) + log(1 + exp(-|x|))
    return tl.maximum(-x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid_neg(x):
    # sigmoid(-x), from exp(-|x|) only
    t = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, t / (1.0 + t), 1.0 / (1.0 + t))


@triton.jit
def _deviation_loss_kernel(emb_ptr, stride_k, stride_m, offsets_ptr, logits_ptr, chosen_ptr, pair_offsets_ptr,
                           weights_ptr, losses_ptr, chosen_w_ptr, dlogits_ptr, D, min_weight, equal_tol,
                           K: tl.constexpr, WEIGHT_INSIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    n = tl.load(offsets_ptr + g + 1) - start
    local = tl.arange(0, BLOCK_N)
    valid = local < n
    cols = tl.arange(0, BLOCK_D)
    log_p = tl.zeros([BLOCK_N], tl.float32)
    is_zero = local < 0  # p_i = 0 once response i is the least deviating (d = -1) under some metric
    for k in range(K):
        base = emb_ptr + k * stride_k + (start + local)[:, None].to(tl.int64) * stride_m
        sq = tl.zeros([BLOCK_N], tl.float64)
        for d0 in range(0, D, BLOCK_D):
            x = tl.load(base + d0 + cols[None, :], mask=valid[:, None] & (d0 + cols[None, :] < D),
                        other=0.0).to(tl.float64)
            sq += tl.sum(x * x, axis=1)
        inv_norm = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)  # F.normalize(e.double(), dim=-1)
        dots = tl.zeros([BLOCK_N], tl.float64)
        for d0 in range(0, D, BLOCK_D):
            x = tl.load(base + d0 + cols[None, :], mask=valid[:, None] & (d0 + cols[None, :] < D),
                        other=0.0).to(tl.float64)
            x = x * inv_norm[:, None]
            s = tl.sum(x, axis=0)  # S[d0:d0+BLOCK_D] = e[group].sum(0)
            dots += tl.sum(x * s[None, :], axis=1)  # e_i . S
        self_dot = sq * inv_norm * inv_norm  # e_i . e_i (1, or 0 for a zero vector)
        dev = 1.0 - (dots - self_dot) / tl.maximum(n - 1, 1).to(tl.float64)
        dev = tl.where(n > 1, dev, 0.0)
        lo = tl.min(tl.where(valid, dev, float("inf")), axis=0)
        hi = tl.max(tl.where(valid, dev, float("-inf")), axis=0)
        spread = hi - lo
        d = tl.where(spread > equal_tol, 2.0 * (dev - lo) / tl.maximum(spread, equal_tol) - 1.0, 0.0)
        is_zero = is_zero | (d <= -1.0)
        log_p += tl.log(tl.maximum(((d + 1.0) * 0.5).to(tl.float32), 1e-30))  # fp64 up to here: d near -1 would
        # cancel in fp32 ((d.float() + 1) lost 0.3% of a weight at 600 responses in 2 dims); the rest in fp32
    p = tl.where(valid & ~is_zero, tl.exp(log_p / K), 0.0)  # geometric mean over the K metrics
    mean_p = tl.sum(p, axis=0) / n.to(tl.float32)
    w = tl.where(mean_p > 0, p / tl.maximum(mean_p, 1e-30), 1.0)
    tl.store(weights_ptr + start + local, w, mask=valid)

    for b in range(tl.load(pair_offsets_ptr + g), tl.load(pair_offsets_ptr + g + 1)):
        c = tl.load(chosen_ptr + b) - start
        wc = tl.maximum(tl.sum(tl.where(local == c, w, 0.0), axis=0), min_weight)  # w[chosen_b], clamped
        z = tl.load(logits_ptr + b).to(tl.float32)
        if WEIGHT_INSIDE:
            loss = _softplus_neg(wc * z)
            dz = -wc * _sigmoid_neg(wc * z)
        else:
            loss = wc * _softplus_neg(z)
            dz = -wc * _sigmoid_neg(z)
        tl.store(losses_ptr + b, loss)
        tl.store(chosen_w_ptr + b, wc)
        tl.store(dlogits_ptr + b, dz)


def _layout(embeddings, group, chosen_index):
    """Sort responses by group and pairs by their chosen response's group; stack metrics, zero-padded to one D."""
    G = int(group.max()) + 1
    order = torch.argsort(group, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)  # where each response lands after sorting
    counts = torch.bincount(group, minlength=G)
    offsets = torch.zeros(G + 1, dtype=torch.int32, device=group.device)
    offsets[1:] = torch.cumsum(counts, 0)
    chosen_sorted = position[chosen_index]
    pair_order = torch.argsort(group[chosen_index], stable=True)
    pair_offsets = torch.zeros(G + 1, dtype=torch.int32, device=group.device)
    pair_offsets[1:] = torch.cumsum(torch.bincount(group[chosen_index], minlength=G), 0)
    D = max(e.shape[1] for e in embeddings)
    stacked = torch.stack([F.pad(e.float(), (0, D - e.shape[1]))[order] for e in embeddings]).contiguous()  # (K, M, D)
    return (stacked, offsets, order, chosen_sorted[pair_order].to(torch.int32).contiguous(), pair_order, pair_offsets,
            int(counts.max()))


def _deviation_loss_triton(logits, embeddings, group, chosen_index, min_weight, weight_inside):
    stacked, offsets, order, chosen_sorted, pair_order, pair_offsets, max_n = _layout(embeddings, group, chosen_index)
    K, M, D = stacked.shape
    B = logits.shape[0]
    weights_sorted = torch.empty(M, dtype=torch.float32, device=logits.device)
    losses, chosen_w, dlogits = (torch.empty(B, dtype=torch.float32, device=logits.device) for _ in range(3))
    _deviation_loss_kernel[(offsets.shape[0] - 1,)](
        stacked, stacked.stride(0), stacked.stride(1), offsets, logits.float()[pair_order].contiguous(), chosen_sorted,
        pair_offsets, weights_sorted, losses, chosen_w, dlogits, D, float(min_weight), EQUAL_TOL,
        K=K, WEIGHT_INSIDE=weight_inside, BLOCK_N=(block_n := max(16, triton.next_power_of_2(max_n))),
        BLOCK_D=(block_d := min(128, max(16, triton.next_power_of_2(D)), max(1, 4096 // block_n))),
        num_warps=min(16, max(4, block_n * block_d // 256)))  # fp64 tiles of <= 4096 elements, <= 8 a thread, up
        # to 4096 responses a prompt (more D-loop steps above 256): 256 x 16 at 4 warps (32 a thread) spilled registers
        # on sm_80/sm_90 with an unaligned D (tests/test_kernels_compile.py prints registers and spills)
    unsort = torch.empty_like(pair_order)
    unsort[pair_order] = torch.arange(B, device=logits.device)
    weights = torch.empty_like(weights_sorted)
    weights[order] = weights_sorted
    return losses[unsort], weights, chosen_w[unsort], dlogits[unsort]


class DeviationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, group, chosen_index, min_weight, weight_inside, *embeddings):
        losses, weights, chosen_w, dlogits = _deviation_loss_triton(logits, list(embeddings), group, chosen_index,
                                                                    min_weight, weight_inside)
        ctx.save_for_backward(dlogits)
        ctx.mark_non_differentiable(weights, chosen_w)
        return losses.to(logits.dtype), weights, chosen_w

    @staticmethod
    def backward(ctx, grad_losses, grad_weights, grad_chosen_w):
        (dlogits,) = ctx.saved_tensors
        return (grad_losses * dlogits).to(grad_losses.dtype), *[None] * (len(ctx.needs_input_grad) - 1)


def deviation_loss(logits, embeddings, group, chosen_index, min_weight=0.0, weight_inside=False, use_triton=None):
    """Deviation weights of ragged groups and the weighted -logsigmoid loss of each pair, in one launch on CUDA.

    logits (B,): beta * DPO margin (weight_inside=False, DDPO) or the log-odds ratio (weight_inside=True, DORPO).
    embeddings: K tensors (M, D_k), one per metric; group (M,) prompt id of each response; chosen_index (B,) the
    row of each pair's chosen response. Returns (losses (B,), weights (M,), chosen weights (B,)).
    """
    if logits.shape != chosen_index.shape:
        raise ValueError(f"one logit per pair: logits {tuple(logits.shape)}, chosen_index {tuple(chosen_index.shape)}")
    if any(e.shape[0] != group.shape[0] for e in embeddings):
        raise ValueError(f"one row per response: group {tuple(group.shape)}, "
                         f"embeddings {[tuple(e.shape) for e in embeddings]}")
    if use_triton is None:
        use_triton = use_triton_for(logits)
    if not use_triton:
        return deviation_loss_ref(logits, embeddings, group, chosen_index, min_weight, weight_inside)
    return DeviationLoss.apply(logits, group, chosen_index, float(min_weight), bool(weight_inside), *embeddings)

