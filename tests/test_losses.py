"""Losses against hand-computed values and closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddpo.losses import ddpo_loss, dorpo_loss, dpo_loss, log1mexp, log_odds_ratio, orpo_loss


def test_dpo_hand_value_and_ddpo_weight():
    # beta * margin = 0.1 * ((-10 - -12) - (-20 - -7)) = 0.1 * (2 - (-13))= 1.5 -> log(1 + e^-1.5) = 0.2014
    args = (torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-7.0]), 0.1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*args)
    assert losses.item() == pytest.approx(0.2014, abs=1e-4)
    assert chosen_rewards.item() == pytest.approx(0.2) and rejected_rewards.item() == pytest.approx(-1.3)
    weighted, _, _ = ddpo_loss(*args, chosen_weights=torch.tensor([1.6]))
    assert weighted.item() == pytest.approx(0.3223, abs=1e-4)


def test_ddpo_weight_is_one_multiply_and_zero_weight_has_no_gradient():
    torch.manual_seed(0)
    policy_chosen = torch.randn(5, requires_grad=True)
    policy_rejected = torch.randn(5)
    ref_chosen, ref_rejected = torch.randn(5), torch.randn(5)
    weights = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
    plain, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.1)
    weighted, _, _ = ddpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.1, weights)
    torch.testing.assert_close(weighted, weights * plain)
    weighted.sum().backward()
    assert policy_chosen.grad[0] == 0 and (policy_chosen.grad[1:] != 0).all()


def test_log1mexp_is_stable_at_both_ends():
    x = torch.tensor([-1e-10, -1e-3, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-12, atol=1e-20)
    x32 = torch.tensor([-1e-30, -1e-10, -1e4])
    assert torch.isinf(torch.log(1 - torch.exp(x32[:2]))).all()  # the naive form breaks in fp32 ...
    assert torch.isfinite(log1mexp(x32)).all()  # ... this one does not
    assert log1mexp(torch.tensor([-1e-6])).item() == pytest.approx(math.log(1e-6), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_values_and_gradients_are_finite_for_near_certain_responses(dtype):
    """A chosen response the model is certain of (mean token log-prob in (-6e-8, 0] in fp32, or exactly 0) and one
    it finds impossible: finite log-odds, losses and gradients, in ORPO and both DORPO forms."""
    chosen = torch.tensor([0.0, -1e-9, -3e-8, -6e-8, -1e-7, -0.5, -1e4], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1e4, -0.7, -1e-8, 0.0, -2.0, -1e-10, -0.1], dtype=dtype, requires_grad=True)
    nll = -chosen
    for losses in (orpo_loss(chosen, rejected, nll, 0.25)[0],
                   dorpo_loss(chosen, rejected, nll, 0.25, torch.full((7,), 1.5, dtype=dtype))[0],
                   dorpo_loss(chosen, rejected, nll, 0.25, torch.full((7,), 1.5, dtype=dtype), form="per-example")[0]):
        chosen.grad = rejected.grad = None
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    x = torch.tensor([0.0, -1e-9, -6e-8, -1e4], dtype=dtype, requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def logps_with_log_odds(delta):
    """Mean log-probs whose log-odds ratio is `delta`: rejected at P = 0.5 (log-odds 0), chosen at sigmoid(delta)."""
    return F.logsigmoid(torch.tensor([delta])), torch.tensor([math.log(0.5)])


def test_dorpo_odds_term_hand_values():
    chosen, rejected = logps_with_log_odds(0.406)
    assert log_odds_ratio(chosen, rejected).item() == pytest.approx(0.406, abs=1e-6)
    for w, expected in [(0.0, 0.693), (0.5, 0.597), (1.0, 0.511), (1.6, 0.420), (3.0, 0.259)]:
        # NLL 0 and lambda 1 isolate the odds term -logsigmoid(w * Delta)
        losses, *_ = dorpo_loss(chosen, rejected, torch.zeros(1), 1.0, torch.tensor([w]), form="released")
        assert losses.item() == pytest.approx(expected, abs=5e-4), w


def test_orpo_matches_closed_form_in_float64():
    torch.manual_seed(1)
    chosen = -torch.rand(6, dtype=torch.float64) * 3 - 1e-3
    rejected = -torch.rand(6, dtype=torch.float64) * 3 - 1e-3
    nll = torch.rand(6, dtype=torch.float64)
    losses, chosen_rewards, _, log_odds = orpo_loss(chosen, rejected, nll, 0.25)
    pc, pr = chosen.exp(), rejected.exp()
    expected_odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    torch.testing.assert_close(log_odds.double(), expected_odds, rtol=1e-5, atol=1e-5)
    expected = nll + 0.25 * torch.log1p(torch.exp(-expected_odds))
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_rewards, 0.25 * chosen)


def test_dorpo_forms():
    torch.manual_seed(2)
    chosen, rejected = -torch.rand(4) * 2, -torch.rand(4) * 2
    nll, w = torch.rand(4), torch.tensor([0.0, 0.5, 1.5, 2.0])
    orpo, *_ = orpo_loss(chosen, rejected, nll, 0.25)
    per_example, *_ = dorpo_loss(chosen, rejected, nll, 0.25, w, form="per-example")
    torch.testing.assert_close(per_example, w * orpo)
    released, _, _, log_odds = dorpo_loss(chosen, rejected, nll, 0.25, w, form="released")
    torch.testing.assert_close(released, w.mean() * nll - 0.25 * F.logsigmoid(w * log_odds))
    # with all weights 1 both forms are ORPO
    ones = torch.ones(4)
    torch.testing.assert_close(dorpo_loss(chosen, rejected, nll, 0.25, ones)[0], orpo)
    torch.testing.assert_close(dorpo_loss(chosen, rejected, nll, 0.25, ones, form="per-example")[0], orpo)
    # the batch mean weight can be given, for exact gradient accumulation
    given, *_ = dorpo_loss(chosen, rejected, nll, 0.25, w, weights_mean=2.0)
    torch.testing.assert_close(given, 2.0 * nll - 0.25 * F.logsigmoid(w * log_odds))
    with pytest.raises(ValueError, match="unknown DORPO form"):
        dorpo_loss(chosen, rejected, nll, 0.25, w, form="ver3")


def test_orpo_gradients_match_float64_autograd():
    chosen = torch.tensor([-0.3, -2.0, -1e-4], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-0.9, -0.1, -4.0], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor([0.3, 2.0, 1e-4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r, n: orpo_loss(c, r, n, 0.25)[0].double(), (chosen, rejected, nll),
                                    eps=1e-7, atol=1e-4)
