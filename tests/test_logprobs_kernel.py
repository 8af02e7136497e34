"""kernels/logprobs.py: Triton (interpreted on CPU, compiled on CUDA) and chunked PyTorch against the naive head."""

import pytest
import torch
from conftest import DEVICE

from ddpo_kernels.logprobs import (IGNORE_INDEX, default_chunk_size, fused_logprobs, fused_logprobs_loss,
                                   logprobs_loss_ref, logprobs_ref)

SHAPES = [(47, 31, 1003), (1, 8, 17), (64, 16, 4099), (9, 64, 257)]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=0.1, rtol=0.05)}


def inputs(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = IGNORE_INDEX  # positions that do not count
    grad = torch.randn(N, generator=g)
    return hidden, weight, labels.to(DEVICE), grad.to(DEVICE)


def run(fn, hidden, weight, labels, grad):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, labels)
    (out * grad).sum().backward()
    return out.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SHAPES])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_matches_reference(shape, dtype, use_triton, chunk_size):
    hidden, weight, labels, grad = inputs(*shape, dtype)
    got = run(lambda h, w, lab: fused_logprobs(h, w, lab, chunk_size=chunk_size, use_triton=use_triton),
              hidden, weight, labels, grad)
    want = run(logprobs_ref, hidden, weight, labels, grad)
    for name, g, w in zip(("logps", "grad_hidden", "grad_weight"), got, want):
        assert g.dtype == (torch.float32 if name == "logps" else dtype), name
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype], msg=name)
    assert (got[0][labels == IGNORE_INDEX] == 0).all()
    assert (got[1][labels == IGNORE_INDEX] == 0).all()  # ignored rows get no gradient


def test_large_logits_do_not_overflow():
    hidden, weight, labels, grad = inputs(13, 8, 300, torch.float32)
    with torch.no_grad():
        hidden.mul_(400.0)  # logits in the thousands: a naive exp overflows
    for use_triton in (True, False):
        got = run(lambda h, w, lab: fused_logprobs(h, w, lab, use_triton=use_triton), hidden, weight, labels, grad)
        want = run(logprobs_ref, hidden, weight, labels, grad)
        assert all(torch.isfinite(t).all() for t in got)
        torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-5)


def test_weight_without_grad_and_all_ignored():
    hidden, weight, labels, grad = inputs(7, 8, 50, torch.float32)
    weight.requires_grad_(False)
    out = fused_logprobs(hidden, weight, torch.full_like(labels, IGNORE_INDEX))
    (out * grad).sum().backward()
    assert (out == 0).all() and (hidden.grad == 0).all() and weight.grad is None


def test_no_tensor_of_size_n_by_v_is_allocated():
    """Track every tensor created during forward+backward; none may hold N*V elements (or more)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestAllocation.largest = max(LargestAllocation.largest, t.numel())
            return out

    N, H, V = 8192, 16, 8192
    hidden, weight, labels, grad = inputs(N, H, V, torch.float32)
    chunk = default_chunk_size(N, V, H)
    assert chunk == 2048
    with LargestAllocation():
        out = fused_logprobs(hidden, weight, labels, use_triton=False)
        (out * grad).sum().backward()
    assert LargestAllocation.largest <= max(chunk * V, V * H) < N * V
    with LargestAllocation():  # the same probe sees the naive head's (N, V) logits
        (logprobs_ref(hidden, weight, labels) * grad).sum().backward()
    assert LargestAllocation.largest >= N * V


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("logit_scale", [3.0, 10.0, 30.0])
def test_autocast_gradients_as_accurate_as_plain_autograd(use_triton, logit_scale):
    """Under bf16 autocast (the default on CUDA) the head's logits are bf16. The backward must recompute them in the
    same precision as the forward's log-sum-exp: its error against exact fp32 is then that of plain autograd under
    the same autocast (recomputed in fp32, it was 2.6x at LM-like logit scales of 10 and 12x at 30)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 64, 32, 999
    hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * logit_scale / H**0.5).to(DEVICE).requires_grad_()
    labels, upstream = torch.randint(0, V, (N,), generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)

    def grads(fn, autocast):
        hidden.grad = weight.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = fn(hidden, weight, labels)
        (out * upstream).sum().backward()
        return out.detach(), hidden.grad.clone(), weight.grad.clone()

    exact = grads(logprobs_ref, autocast=False)
    plain = grads(lambda h, w, lab: torch.log_softmax(h @ w.t(), -1).gather(-1, lab[:, None])[:, 0], autocast=True)
    fused = grads(lambda h, w, lab: fused_logprobs(h, w, lab, chunk_size=16, use_triton=use_triton), autocast=True)
    for name, f, p, e in zip(("logps", "grad_hidden", "grad_weight"), fused, plain, exact):
        assert f.dtype == e.dtype, name
        assert (f - e).norm() <= 1.2 * (p - e).norm() + 1e-6, (name, ((f - e).norm() / (p - e).norm()).item())


# --- fused_logprobs_loss: the head and a loss of pairs, gradients in the forward ---------------------------------


def pair_problem(N, H, V, dtype, pairs, pairs_per_group, seed=0):
    """Rows scattered over 2 * pairs sequences ([chosen; rejected], in random order as packed rows are not), groups
    of whole pairs, and a DPO-like loss of each group with per-pair weights."""
    hidden, weight, labels, _ = inputs(N, H, V, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    sequences = torch.randperm(N, generator=g) % (2 * pairs)  # every sequence has a row
    ref_logps, weights = torch.randn(2 * pairs, generator=g) * 5, torch.rand(pairs, generator=g) * 2
    groups = [torch.cat([p, p + pairs]) for p in torch.arange(pairs).split(pairs_per_group)]

    def loss_fn(group, logps):  # (2k,) [chosen; rejected] of the group's pairs
        k = len(group) // 2
        margin = 0.1 * ((logps[:k] - ref_logps[group[:k]]) - (logps[k:] - ref_logps[group[k:]]))
        return (weights[group[:k]] * -torch.nn.functional.logsigmoid(margin)).sum() - 0.01 * logps[:k].sum()

    to = lambda t: t.to(DEVICE)  # noqa: E731
    return hidden, weight, labels, to(sequences), [to(gr) for gr in groups], loss_fn


def loss_and_grads(fn, hidden, weight, *args, scale=0.7):
    hidden.grad = weight.grad = None
    loss, logps = fn(hidden, weight, *args)
    (scale * loss).backward()  # the upstream gradient reaches both gradients
    return loss.detach(), logps, hidden.grad.clone(), None if weight.grad is None else weight.grad.clone()


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, pairs, per_group", [((47, 31, 1003), 5, 2), ((6, 8, 17), 3, 3), ((64, 16, 4099), 8, 1),
                                                     ((9, 64, 257), 2, 5)], ids=["odd", "one-group", "pair-groups",
                                                                                  "tiny-V"])
def test_loss_in_the_forward_matches_reference(shape, pairs, per_group, dtype, use_triton):
    hidden, weight, labels, sequences, groups, loss_fn = pair_problem(*shape, dtype, pairs, per_group)
    got = loss_and_grads(lambda h, w, *a: fused_logprobs_loss(h, w, *a, use_triton=use_triton), hidden, weight,
                         labels, sequences, groups, loss_fn)
    want = loss_and_grads(logprobs_loss_ref, hidden, weight, labels, sequences, groups, loss_fn)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=0.3, rtol=0.05)  # bf16: sums over up to 16 tokens
    for name, g, w in zip(("loss", "logps", "grad_hidden", "grad_weight"), got, want):
        assert g.dtype == w.dtype, name
        assert not (name == "logps" and g.requires_grad)
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=name)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
def test_loss_in_the_forward_under_autocast(use_triton):
    """bf16 autocast on fp32 inputs: bf16 logits, fp32 loss, gradients in the inputs' dtype, as close to exact fp32
    as plain autograd's under the same autocast."""
    hidden, weight, labels, sequences, groups, loss_fn = pair_problem(64, 32, 999, torch.float32, 6, 2)
    exact = loss_and_grads(logprobs_loss_ref, hidden, weight, labels, sequences, groups, loss_fn)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused = loss_and_grads(lambda h, w, *a: fused_logprobs_loss(h, w, *a, use_triton=use_triton), hidden, weight,
                               labels, sequences, groups, loss_fn)
        plain = loss_and_grads(lambda h, w, lab, seq, grs, fn: logprobs_loss_ref(
            h.bfloat16(), w.bfloat16(), lab, seq, grs, fn), hidden, weight, labels, sequences, groups, loss_fn)
    for name, f, p, e in zip(("loss", "logps", "grad_hidden", "grad_weight"), fused, plain, exact):
        assert f.dtype == e.dtype == torch.float32, name
        assert (f - e).norm() <= 1.2 * (p - e).norm() + 1e-6, (name, ((f - e).norm() / (p - e).norm()).item())


def test_loss_in_the_forward_with_a_frozen_head_and_a_constant_group():
    hidden, weight, labels, sequences, groups, loss_fn = pair_problem(30, 8, 50, torch.float32, 4, 2)
    weight.requires_grad_(False)  # LoRA: the output layer is frozen
    constant = lambda group, logps: (loss_fn(group, logps) if group[0] == 0 else torch.tensor(2.0))  # noqa: E731
    got = loss_and_grads(fused_logprobs_loss, hidden, weight, labels, sequences, groups, constant)
    want = loss_and_grads(logprobs_loss_ref, hidden, weight, labels, sequences, groups, constant)
    assert got[3] is None
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, **TOL[torch.float32])
    assert (got[2][torch.isin(sequences, groups[1])] == 0).all()  # the constant group's rows get no gradient
