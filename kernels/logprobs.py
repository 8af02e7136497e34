"""Fused log-prob head: hidden states (N, H) x output embedding (V, H) -> log p(label) per token, (N,).

The naive head computes logits (N, V), a log-softmax (N, V) in fp32 and a gather: at 8 pairs x 1024 tokens and a
128k vocabulary that is 8 GB of fp32 logits before the backward saves its own copy. Here rows are processed in
chunks of C rows: a (C, V) logits tile is produced by one matmul, a Triton kernel reduces it to the label's log-prob
and the row's log-sum-exp (fp32, online), and the tile is dropped. The backward recomputes each tile, a second
kernel turns it in place into dlogits = g * (onehot(label) - softmax), and two matmuls give the hidden-state and
weight gradients. Only N log-sum-exp values are saved, and no (N, V) tensor ever exists, on GPU or CPU.

Positions whose label is IGNORE_INDEX (-100) get log-prob 0 and no gradient.

When the loss is a function of whole sequences' summed log-probs that splits into terms over groups of sequences
(the pairs of a preference loss), fused_logprobs_loss computes it in the forward, group by group, as Liger's fused
preference losses do: a group's logits tiles give its sequences' log-probs, the loss of the group gives each
sequence's gradient g, and the same tiles become dlogits = g * (onehot - softmax) at once. The gradients are then
ready before the backward, and the logits are computed once (3 matmuls instead of 4). The price is memory: a whole
group's (C, V) tile at a time (a group holds at least one pair: the caller bounds the pairs' length, as
ddpo/models.py does).

Layout: logprobs_ref and logprobs_loss_ref (naive, materialise (N, V): the ground truth of the tests), the Triton
kernels, the launchers, the autograd.Functions (Triton on CUDA or under TRITON_INTERPRET=1, chunked PyTorch
otherwise), and the functional aliases fused_logprobs and fused_logprobs_loss.
"""

import os

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100


def logprobs_ref(hidden, weight, labels):
    """Naive reference: log_softmax(hidden @ weight.T)[label] in fp32, 0 where label == IGNORE_INDEX."""
    logits = hidden.float() @ weight.float().t()  # (N, V)
    valid = labels != IGNORE_INDEX
    logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logps, torch.zeros_like(logps))


def logprobs_loss_ref(hidden, weight, labels, sequences, groups, loss_fn):
    """Naive reference of fused_logprobs_loss: sequence sums of logprobs_ref, then the sum of the groups' losses."""
    n_seq = sum(len(group) for group in groups)
    logps = torch.zeros(n_seq, device=hidden.device).index_add(0, sequences,
                                                               logprobs_ref(hidden, weight, labels).float())
    return sum(loss_fn(group, logps[group]) for group in groups), logps.detach()


@triton.jit
def _logprobs_fwd_kernel(logits_ptr, stride_row, labels_ptr, logps_ptr, lse_ptr, V,
                         IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    # online log-sum-exp, one running (max, sum) per lane, merged at the end
    m = tl.full([BLOCK_V], -1e30, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))  # torch.logsumexp(logits[row].float(), -1)
    valid = label != IGNORE
    target = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)  # logits[row, label]
    tl.store(logps_ptr + row, tl.where(valid, target - lse, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, grad_ptr, V,
                         IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    # g = 0 on ignored rows, so their dlogits are 0 as well
    g = tl.where(label != IGNORE, tl.load(grad_ptr + row).to(tl.float32), 0.0)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        onehot = tl.where(cols == label, 1.0, 0.0)
        dx = g * (onehot - tl.exp(x - lse))  # g * (one_hot(label) - softmax(logits[row]))
        tl.store(row_ptr + cols, dx.to(logits_ptr.dtype.element_ty), mask=cols < V)


def _block_v(V):
    return min(triton.next_power_of_2(V), 4096)


def _logprobs_fwd_triton(logits, labels):
    """logits (C, V) -> (logps (C,) fp32, lse (C,) fp32)."""
    C, V = logits.shape
    logps = torch.empty(C, dtype=torch.float32, device=logits.device)
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    _logprobs_fwd_kernel[(C,)](logits, logits.stride(0), labels, logps, lse, V,
                               IGNORE=IGNORE_INDEX, BLOCK_V=_block_v(V))
    return logps, lse


def _logprobs_bwd_triton(logits, labels, lse, grad_logps):
    """Overwrites logits (C, V) with dlogits = grad * (onehot - softmax)."""
    C, V = logits.shape
    _logprobs_bwd_kernel[(C,)](logits, logits.stride(0), labels, lse, grad_logps, V,
                               IGNORE=IGNORE_INDEX, BLOCK_V=_block_v(V))
    return logits


def _softmax_torch(logits, labels):
    """Log-probs of a tile and what its gradient needs: returns (logps (C,), exp(logits - row max) (C, V) fp32, written
    over the tile when it is fp32, its row sums (C,), and the log-sum-exp (C,)), so that softmax = exps / sums without
    a second exp."""
    logits = logits.float()
    target = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    row_max = logits.amax(-1, keepdim=True)  # (C, 1)
    exps = logits.sub_(row_max).exp_()  # in place
    sums = exps.sum(-1)
    lse = sums.log() + row_max.squeeze(-1)  # logsumexp
    return torch.where(labels != IGNORE_INDEX, target - lse, torch.zeros_like(lse)), exps, sums, lse


def _logprobs_fwd_torch(logits, labels):
    """Consumes the tile: in-place ops, so no (C, V) temporary is allocated (on CPU each fresh tile is page faults).
    Returns (logps (C,), lse (C,))."""
    token_logps, _, _, lse = _softmax_torch(logits, labels)
    return token_logps, lse


def _logprobs_bwd_torch(logits, labels, lse, grad_logps):
    """Overwrites the tile (when fp32) with dlogits = grad * (onehot - softmax)."""
    valid = labels != IGNORE_INDEX
    g = torch.where(valid, grad_logps.float(), torch.zeros_like(lse)).unsqueeze(-1)  # (C, 1)
    dlogits = logits.float().sub_(lse.unsqueeze(-1)).exp_().mul_(-g)  # -g * softmax, in place
    dlogits.scatter_add_(-1, labels.clamp(min=0).unsqueeze(-1), g)
    return dlogits.to(logits.dtype)


def _dlogits_torch(exps, sums, labels, grad_logps):
    """dlogits = g * (onehot - softmax), written over the exps tile of _softmax_torch."""
    g = torch.where(labels != IGNORE_INDEX, grad_logps.float(), torch.zeros_like(sums))
    return exps.mul_((-g / sums).unsqueeze(-1)).scatter_add_(-1, labels.clamp(min=0).unsqueeze(-1), g.unsqueeze(-1))


CHUNK_ELEMENTS = 1 << 24  # a (C, V) tile of at least 16M elements keeps each matmul large enough to be efficient


def default_chunk_size(N, V, H):
    """Rows per (C, V) logits tile: about the size of the (N, H) hidden states (as in Liger), but at least
    CHUNK_ELEMENTS, since each tile re-reads the whole (V, H) weight; a power of two, at most N."""
    rows = max(N * H, CHUNK_ELEMENTS) // V
    return max(1, min(N, 1 << (rows.bit_length() - 1) if rows else 1))


def use_triton_for(tensor):
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def compute_dtype(hidden, weight):
    """The dtype of the logits: autocast's when it is on (bf16 logits, as the model's own head would give), else the
    inputs'. The backward recomputes the logits in this same dtype, so that they agree with the saved log-sum-exp
    (recomputed in fp32 instead, the implied softmax rows would sum to 0.9-1.1 and the gradients would be off)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, use_triton):
        N, H = hidden.shape
        V = weight.shape[0]
        chunk = chunk_size or default_chunk_size(N, V, H)
        dtype = compute_dtype(hidden, weight)
        fwd = _logprobs_fwd_triton if use_triton else _logprobs_fwd_torch
        logps = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit, in forward and backward
            w = weight.to(dtype)
            for start in range(0, N, chunk):
                rows = slice(start, start + chunk)
                logits = hidden[rows].to(dtype) @ w.t()  # (C, V) in the compute dtype; reduced in fp32 below
                logps[rows], lse[rows] = fwd(logits, labels[rows])
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.use_triton, ctx.dtype = chunk, use_triton, dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        bwd = _logprobs_bwd_triton if ctx.use_triton else _logprobs_bwd_torch
        grad_logps = grad_logps.contiguous().float()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h = hidden[rows].to(ctx.dtype)
                dlogits = bwd(h @ w.t(), labels[rows], lse[rows], grad_logps[rows])  # logits (C, V) recomputed
                if need_hidden:
                    grad_hidden[rows] = dlogits @ w  # (C, H)
                if need_weight and grad_weight is None:
                    grad_weight = (dlogits.t() @ h).float()  # (V, H), summed over chunks in fp32
                elif need_weight:
                    grad_weight += dlogits.t() @ h
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def fused_logprobs(hidden, weight, labels, chunk_size=None, use_triton=None):
    """log p(labels) under softmax(hidden @ weight.T), (N,) fp32, without materialising (N, V).

    hidden (N, H), weight (V, H), labels (N,) int64 with IGNORE_INDEX where a position does not count.
    use_triton: None picks Triton on CUDA (or under TRITON_INTERPRET=1) and chunked PyTorch otherwise.
    """
    if use_triton is None:
        use_triton = use_triton_for(hidden)
    return FusedLogprobs.apply(hidden.contiguous(), weight, labels.contiguous(), chunk_size, use_triton)


class FusedLogprobsLoss(torch.autograd.Function):
    """The head and the loss in one pass, the gradients computed in the forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, sequences, groups, loss_fn, use_triton):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(hidden, weight)
        logps = torch.zeros(sum(len(group) for group in groups), dtype=torch.float32, device=hidden.device)  # (S,)
        local = torch.empty_like(logps, dtype=torch.long)  # a sequence's position within its group
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit
            w = weight.to(dtype)
            for group in groups:
                rows = torch.isin(sequences, group).nonzero().squeeze(-1)  # the group's tokens
                local[group] = torch.arange(len(group), device=group.device)
                seq, lab = local[sequences[rows]], labels[rows]
                h = hidden[rows].to(dtype)
                logits = h @ w.t()  # (C, V), kept until the group's loss says what its gradient is
                if use_triton:
                    token_logps, lse = _logprobs_fwd_triton(logits, lab)
                else:
                    token_logps, exps, sums, _ = _softmax_torch(logits, lab)
                    del logits  # a bf16 tile is not needed beside its fp32 exps
                group_logps = torch.zeros(len(group), device=h.device).index_add(0, seq, token_logps)
                with torch.enable_grad():
                    x = group_logps.requires_grad_()
                    group_loss = loss_fn(group, x)
                    g = (torch.autograd.grad(group_loss, x)[0] if group_loss.requires_grad  # dloss/dlogp (k,)
                         else torch.zeros_like(x))
                loss += group_loss.detach().float()
                logps[group] = group_logps.detach()
                if not (need_hidden or need_weight):
                    continue
                g = g[seq]  # each token's: its sequence's gradient
                if use_triton:
                    dlogits = _logprobs_bwd_triton(logits, lab, lse, g)  # in place
                else:
                    dlogits = _dlogits_torch(exps, sums, lab, g).to(dtype)
                if need_hidden:
                    grad_hidden[rows] = (dlogits @ w).to(hidden.dtype)  # (C, H)
                if need_weight:
                    grad_weight += dlogits.t() @ h  # (V, H), summed over groups in fp32
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(logps)
        ctx.weight_dtype = weight.dtype
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * grad_loss).to(grad_hidden.dtype)  # the scale in fp32, as the weight's
        if grad_weight is not None:  # scaled in place: no second (V, H) fp32 copy (a second backward raises)
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_logprobs_loss(hidden, weight, labels, sequences, groups, loss_fn, use_triton=None):
    """A loss of sequences' summed log-probs under softmax(hidden @ weight.T), with its gradients computed in the
    forward. Returns (loss (), the sequences' log-probs (S,) fp32, not differentiable).

    hidden (N, H), weight (V, H), labels (N,) as fused_logprobs; sequences (N,): the sequence (0..S-1) of each row;
    groups: LongTensors that split 0..S-1; loss_fn(group, logps of its sequences (len(group),)) -> the group's loss,
    which must depend on no other group's log-probs (each pair's loss, its own weight). The loss is their sum.
    """
    if use_triton is None:
        use_triton = use_triton_for(hidden)
    return FusedLogprobsLoss.apply(hidden.contiguous(), weight, labels.contiguous(), sequences, groups, loss_fn,
                                   use_triton)
