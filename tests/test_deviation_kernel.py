"""kernels/deviation_loss.py: the Triton kernel, its per-prompt reference and ddpo.deviation (the offline path) agree
on outputs, weights and gradients; the in-step DDPO / DORPO losses equal the losses of prepared weights; kernels/
imports nothing from ddpo."""

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from ddpo.deviation import deviation_weights
from ddpo.losses import ddpo_loss, dorpo_loss, dorpo_nll_weight, dpo_logits, log_odds_ratio
from ddpo_kernels.deviation_loss import deviation_loss, deviation_loss_ref
from test_deviation import SEM, STY


def ragged(sizes, dims, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    if shuffle:
        group = group[torch.randperm(len(group), generator=g)]  # groups need not be contiguous
    embs = [torch.randn(len(group), d, generator=g) for d in dims]
    chosen = torch.cat([(group == i).nonzero()[:, 0][: max(1, n // 2)] for i, n in enumerate(sizes)])
    chosen = chosen[torch.randperm(len(chosen), generator=g)]  # pairs in any order
    logits = torch.randn(len(chosen), generator=g) * 3
    return logits.to(DEVICE), [e.to(DEVICE) for e in embs], group.to(DEVICE), chosen.to(DEVICE)


def compare(logits, embs, group, chosen, min_weight, inside, atol=1e-5):
    upstream = torch.linspace(-1, 2, len(logits), device=logits.device)
    z1 = logits.clone().requires_grad_()
    got = deviation_loss(z1, embs, group, chosen, min_weight, inside, use_triton=True)
    (got[0] * upstream).sum().backward()
    z2 = logits.clone().double().requires_grad_()
    want = deviation_loss_ref(z2, [e.double() for e in embs], group, chosen, min_weight, inside)
    (want[0] * upstream.double()).sum().backward()
    for name, a, b in zip(("losses", "weights", "chosen_weights", "grad"), (*got, z1.grad), (*want, z2.grad)):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=atol, msg=name)
    return got


@pytest.mark.parametrize("inside", [False, True], ids=["ddpo", "dorpo"])
@pytest.mark.parametrize("dims", [(24,), (24, 7), (300, 5, 33)], ids=["K1", "K2", "K3"])
@pytest.mark.parametrize("min_weight", [0.0, 0.2])
def test_ragged_groups(dims, inside, min_weight):
    compare(*ragged([1, 2, 3, 8, 31], dims), min_weight, inside)


@pytest.mark.parametrize("dims", [(95,), (384, 95), (2, 1, 7)], ids=["K1", "K2", "K3-low-D"])
def test_a_prompt_of_600_responses(dims):
    """BLOCK_N 1024 x BLOCK_D <= 4 tiles; in 2 dimensions many responses lie near the least deviating one (d close to
    -1), where (d + 1) / 2 must be taken before the cast to fp32."""
    compare(*ragged([600, 1], dims), 0.2, False)


@pytest.mark.parametrize("dims", [(24,), (24, 7), (300, 5, 33)], ids=["K1", "K2", "K3"])
def test_reference_weights_equal_the_offline_path(dims):
    """The per-prompt reference (n x n distances) and ddpo.deviation (vectorised) compute the same weights."""
    logits, embs, group, chosen = ragged([1, 2, 3, 8, 31], dims)
    _, weights, w = deviation_loss_ref(logits.double(), embs, group, chosen, min_weight=0.2)
    want, _ = deviation_weights(embs, group)
    torch.testing.assert_close(weights, want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(w, want[chosen].clamp(min=0.2), atol=1e-9, rtol=1e-9)


def test_worked_example_through_the_kernel():
    group, chosen = torch.zeros(4, dtype=torch.long, device=DEVICE), torch.tensor([0, 2], device=DEVICE)
    logits = torch.tensor([1.5, 1.5], device=DEVICE)
    losses, weights, w = compare(logits, [SEM.to(DEVICE), STY.to(DEVICE)], group, chosen, 0.0, False)
    assert weights.tolist() == pytest.approx([2.3109, 1.6891, 0.0, 0.0], abs=1e-4)
    assert losses.tolist() == pytest.approx([2.3109 * 0.2014, 0.0], abs=1e-4)


def test_equal_embeddings_give_weight_one():
    e = torch.randn(1, 16).repeat(6, 1).to(DEVICE)
    group = torch.tensor([0, 0, 0, 1, 1, 1], device=DEVICE)
    _, weights, _ = compare(torch.randn(2, device=DEVICE), [e], group, torch.tensor([0, 3], device=DEVICE), 0.0, False)
    assert weights.tolist() == [1.0] * 6


@pytest.mark.parametrize("inside", [False, True], ids=["ddpo", "dorpo"])
def test_large_margins_do_not_overflow(inside):
    logits, embs, group, chosen = ragged([4, 5, 6], (16,), seed=3)
    logits = torch.tensor([1e4, -1e4, 80.0, -80.0, 0.0, 300.0, -300.0], device=DEVICE)
    assert len(logits) == len(chosen)
    losses, _, w = compare(logits, embs, group, chosen, 0.0, inside)
    z = w * logits if inside else logits
    assert torch.isfinite(losses).all()
    expected = F.softplus(-z) * (1 if inside else w)
    torch.testing.assert_close(losses, expected.float(), atol=1e-3, rtol=1e-5)


def test_bf16_logits_and_embeddings():
    logits, embs, group, chosen = ragged([2, 3, 8, 31], (64,), seed=5)
    got = deviation_loss(logits.bfloat16(), [e.bfloat16() for e in embs], group, chosen, use_triton=True)
    want = deviation_loss_ref(logits.bfloat16().double(), [e.bfloat16().double() for e in embs], group, chosen)
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[1].double(), want[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0].double(), want[0], atol=2e-2, rtol=2e-2)


def test_ddpo_loss_of_the_kernel_equals_ddpo_loss_with_prepared_weights():
    """The kernel's loss of beta x DPO margins equals ddpo_loss fed the weights ddpo.prepare writes."""
    _, embs, group, chosen = ragged([3, 8, 5], (32, 9), seed=7)
    g = torch.Generator().manual_seed(1)
    logps = [torch.randn(len(chosen), generator=g).to(DEVICE) * 10 for _ in range(4)]
    losses, _, w = deviation_loss(dpo_logits(*logps, 0.1)[0], embs, group, chosen, use_triton=True)
    weights, _ = deviation_weights(embs, group)  # what ddpo.prepare writes as each pair's `weight`
    want, _, _ = ddpo_loss(*logps, 0.1, chosen_weights=weights[chosen].float())
    torch.testing.assert_close(losses, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, weights[chosen].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "reference"])
@pytest.mark.parametrize("form", ["released", "per-example"])
@pytest.mark.parametrize("step_mean", [None, 0.7])
def test_dorpo_odds_term_of_the_kernel_equals_dorpo_loss_with_prepared_weights(form, step_mean, use_triton):
    """The kernel's odds term (weight inside the sigmoid: released; outside: per-example) plus the weighted NLL equals
    dorpo_loss fed the prepared weights, in both forms."""
    _, embs, group, chosen = ragged([3, 8, 5], (32, 9), seed=7)
    g = torch.Generator().manual_seed(2)
    chosen_logps, rejected_logps = (-torch.rand(len(chosen), generator=g).to(DEVICE) * 3 - 1e-3 for _ in range(2))
    mean = None if step_mean is None else torch.tensor(step_mean, device=DEVICE)
    odds, _, w = deviation_loss(log_odds_ratio(chosen_logps, rejected_logps), embs, group, chosen, 0.2,
                                weight_inside=form == "released", use_triton=use_triton)
    got = dorpo_nll_weight(w, form, mean) * -chosen_logps + 0.25 * odds
    weights, _ = deviation_weights(embs, group)
    want = dorpo_loss(chosen_logps, rejected_logps, -chosen_logps, 0.25, weights[chosen].clamp(min=0.2).float(),
                      form=form, weights_mean=mean)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shape_mismatch_is_a_clear_error():
    logits, embs, group, chosen = ragged([3, 4], (8,))
    with pytest.raises(ValueError, match="one logit per pair"):
        deviation_loss(logits[:-1], embs, group, chosen)
    with pytest.raises(ValueError, match="one row per response"):
        deviation_loss(logits, [embs[0][:-1]], group, chosen)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "reference"])
def test_embeddings_get_no_gradient(use_triton):
    """The embedder is frozen: neither path sends a gradient into the embeddings."""
    logits, embs, group, chosen = ragged([3, 5], (8,), seed=2)
    embs = [e.clone().requires_grad_() for e in embs]
    z = logits.clone().requires_grad_()
    losses, _, _ = deviation_loss(z, embs, group, chosen, use_triton=use_triton)
    losses.sum().backward()
    assert z.grad is not None and all(e.grad is None for e in embs)


@pytest.mark.parametrize("scale", [4e-3, 5e-3, 8e-3])
def test_near_duplicate_pools_give_the_reference_weights(scale):
    """Responses that are near-duplicates in embedding space: deviations differ by about 1e-6, just above the
    equality tolerance. The kernel, its reference and the offline path (ddpo.deviation), all deciding equality in
    float64, must give the same weights."""
    g = torch.Generator().manual_seed(11)
    sizes = [4, 5, 7, 3]
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    base = torch.randn(len(sizes), 384, generator=g)[group]
    embs = [(base + scale * torch.randn(len(group), 384, generator=g)).to(DEVICE)]
    chosen = torch.tensor([0, 4, 9, 16], device=DEVICE)
    logits = torch.randn(4, generator=g).to(DEVICE)
    _, weights, _ = deviation_loss(logits, embs, group.to(DEVICE), chosen, use_triton=True)
    _, want, _ = deviation_loss_ref(logits.double(), [e.double() for e in embs], group.to(DEVICE), chosen)
    assert (want != 1).any()  # the spreads are real (above the tolerance), so weights are not all 1
    torch.testing.assert_close(weights.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deviation_weights(embs, group.to(DEVICE))[0], want, atol=1e-9, rtol=1e-9)


def imported_modules(source):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""


def test_kernels_import_nothing_from_ddpo():
    """The dependency runs one way, ddpo -> kernels: a kernel file reads alone, with its reference beside it."""
    paths = sorted((pathlib.Path(__file__).parents[1] / "kernels").glob("*.py"))
    assert "deviation_loss.py" in [p.name for p in paths]
    for path in paths:
        from_ddpo = [m for m in imported_modules(path.read_text()) if m.split(".")[0] == "ddpo"]
        assert not from_ddpo, f"kernels/{path.name} imports {from_ddpo}"
