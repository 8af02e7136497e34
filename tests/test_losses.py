"""Losses against hand-computed values and closed forms; the deviation-weighted twins of the table."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ddpo.deviation import deviation_weights
from ddpo.losses import (LOSSES, Logps, cdpo_loss, ddpo_loss, dorpo_loss, dpo_loss, hinge_loss, 
                         ipo_loss, log1mexp, log_odds_ratio, orpo_loss, robust_dpo_loss, rpo_loss, simpo_loss)


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
        assert (torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
                and torch.isfinite(rejected.grad).all())
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


# --- the loss family: hand values, gradients, and the deviation weight as one multiply ---------------------------

# Two pairs: summed log-probs pi_c, pi_r (policy) and ref_c, ref_r (reference), beta 0.1.
#   pair 1: log-ratios 2 and -13 -> z = 0.1 * (2 + 13) = 1.5;  pair 2: log-ratios 1 and -3 -> z = 0.1 * 4 = 0.4
# softplus(-1.5) = log(1 + e^-1.5) = 0.2014133, softplus(-0.4) = 0.5130153 (the DPO losses)
PAIRS = dict(pi_c=[-10.0, -10.0], pi_r=[-20.0, -12.0], ref_c=[-12.0, -11.0], ref_r=[-7.0, -9.0])
COUNTS = dict(chosen=[4.0, 5.0], rejected=[5.0, 4.0])  # completion tokens


def pair_logps(dtype=torch.float64, grad=False):
    pi_c, pi_r, ref_c, ref_r = (torch.tensor(PAIRS[k], dtype=dtype) for k in ("pi_c", "pi_r", "ref_c", "ref_r"))
    return pi_c.requires_grad_(grad), pi_r.requires_grad_(grad), ref_c, ref_r


def test_ipo_hand_value_is_per_token_as_trl():
    # h = 2/4 - (-13)/5 = 3.1 and 1/5 - (-3)/4 = 0.95; 1/(2 beta) = 5 -> (3.1 - 5)^2 = 3.61, (0.95 - 5)^2 = 16.4025
    counts = torch.tensor(COUNTS["chosen"], dtype=torch.float64), torch.tensor(COUNTS["rejected"], dtype=torch.float64)
    pi_c, *rest = pair_logps(grad=True)
    losses, chosen_rewards, rejected_rewards = ipo_loss(pi_c, *rest, 0.1, *counts)
    torch.testing.assert_close(losses, torch.tensor([3.61, 16.4025], dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.2, 0.1], dtype=torch.float64))  # beta * summed log-ratio
    torch.testing.assert_close(rejected_rewards, torch.tensor([-1.3, -0.3], dtype=torch.float64))
    losses.sum().backward()  # d/d pi_c = 2 (h - 5) / n_c = 2 * -1.9 / 4 = -0.95 and 2 * -4.05 / 5 = -1.62
    torch.testing.assert_close(pi_c.grad, torch.tensor([-0.95, -1.62], dtype=torch.float64))


def test_hinge_hand_value_and_zero_gradient_past_the_margin():
    # relu(1 - z): relu(1 - 1.5) = 0 (past the margin), relu(1 - 0.4) = 0.6; d/d pi_c = -beta where active
    pi_c, *rest = pair_logps(grad=True)
    losses, chosen_rewards, _ = hinge_loss(pi_c, *rest, 0.1)
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.6], dtype=torch.float64))
    losses.sum().backward()
    torch.testing.assert_close(pi_c.grad, torch.tensor([0.0, -0.1], dtype=torch.float64))


def test_robust_and_conservative_dpo_hand_values():
    # softplus(z) = z + softplus(-z): 1.7014133 and 0.9130153; eps = 0.1
    # cDPO: 0.9 softplus(-z) + 0.1 softplus(z) = softplus(-z) + 0.1 z = 0.3514133, 0.5530153
    # rDPO: (0.9 softplus(-z) - 0.1 softplus(z)) / 0.8 = softplus(-z) - 0.1 z / 0.8 = 0.0139133, 0.4630153
    args = pair_logps()
    torch.testing.assert_close(cdpo_loss(*args, 0.1, 0.1)[0], torch.tensor([0.3514133, 0.5530153], dtype=torch.float64))
    torch.testing.assert_close(robust_dpo_loss(*args, 0.1, 0.1)[0],
                               torch.tensor([0.0139133, 0.4630153], dtype=torch.float64))
    dpo = dpo_loss(*args, 0.1)[0]
    torch.testing.assert_close(dpo, torch.tensor([0.2014133, 0.5130153], dtype=torch.float64))
    for loss in (cdpo_loss, robust_dpo_loss):  # no smoothing: DPO
        torch.testing.assert_close(loss(*args, 0.1, 0.0)[0], dpo)
    # rDPO is unbiased: its expectation under flips with probability eps is the clean DPO loss
    eps = 0.2
    flipped = robust_dpo_loss(args[1], args[0], args[3], args[2], 0.1, eps)[0]
    torch.testing.assert_close((1 - eps) * robust_dpo_loss(*args, 0.1, eps)[0] + eps * flipped, dpo)


def test_simpo_hand_value():
    # mean log-probs -1.0 and -1.5, beta 2, gamma 0.5: z = 2 * (-1 + 1.5) - 0.5 = 0.5 -> softplus(-0.5) = 0.4740770
    chosen = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, torch.tensor([-1.5], dtype=torch.float64), 2.0, 0.5)
    assert losses.item() == pytest.approx(0.4740770, abs=1e-7)
    assert (chosen_rewards.item(), rejected_rewards.item()) == (-2.0, -3.0)  # beta * mean log-prob
    losses.sum().backward()  # d/d chosen = -beta sigmoid(-z) = -2 * 0.3775407
    assert chosen.grad.item() == pytest.approx(-0.7550813, abs=1e-7)


def test_rpo_hand_value():
    # DPO 0.2014133 + alpha 0.5 * NLL 2.5 (mean token log-prob -10/4) = 1.4514133;
    # pair 2: 0.5130153 + 0.5 * 2 = 1.5130153
    args = pair_logps()
    nll = -args[0] / torch.tensor(COUNTS["chosen"], dtype=torch.float64)
    losses, chosen_rewards, _ = rpo_loss(*args, 0.1, nll, 0.5)
    torch.testing.assert_close(losses, torch.tensor([1.4514133, 1.5130153], dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.2, 0.1], dtype=torch.float64))


HP = SimpleNamespace(beta=0.1, orpo_lambda=0.25, dorpo_form="per-example", label_smoothing=0.1, simpo_gamma=0.5,
                     rpo_alpha=1.0, min_weight=0.0)
NEW = ["ipo", "hinge", "robust", "cdpo", "rpo", "simpo", "sft"]


def table_logps(B=5, seed=0, grad=True):
    """Random completion log-probs of B pairs, in float64; the policy's require grad."""
    g = torch.Generator().manual_seed(seed)
    chosen_counts, rejected_counts = (torch.randint(3, 9, (B,), generator=g).double() for _ in range(2))
    pi_c, pi_r, ref_c, ref_r = (-torch.rand(B, generator=g, dtype=torch.float64) * 4 * chosen_counts for _ in range(4))
    return Logps(pi_c.requires_grad_(grad), chosen_counts, pi_r.requires_grad_(grad), rejected_counts, ref_c, ref_r)


@pytest.mark.parametrize("name", NEW)
def test_gradients_match_finite_differences(name):
    logps = table_logps(3, grad=True)
    objective = LOSSES[name].objective

    def losses(pi_c, pi_r):
        fields = dict(vars(logps), policy_chosen_logps=pi_c, policy_rejected_logps=pi_r)
        return objective(Logps(**fields), torch.ones(3, dtype=torch.float64), HP).losses

    shift = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)  # the hinge's kink is not at a sample point
    inputs = (logps.policy_chosen_logps.detach() + shift).requires_grad_(), logps.policy_rejected_logps
    assert torch.autograd.gradcheck(losses, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NEW)
def test_twin_is_the_loss_times_the_chosen_weight(name):
    """dd-<name>: weight 2 doubles a pair's loss, 1 leaves it, 0 zeroes it and its gradient; rewards unchanged."""
    plain_loss, twin = LOSSES[name], LOSSES[f"dd-{name}"]
    assert (twin.reference, twin.rejected, twin.truncation) == (plain_loss.reference, plain_loss.rejected,
                                                                plain_loss.truncation)
    assert twin.weighted and not plain_loss.weighted
    weights = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    plain_logps, logps = table_logps(), table_logps()
    plain = plain_loss.objective(plain_logps, weights, HP)
    out = twin.objective(logps, weights, HP)
    torch.testing.assert_close(plain.chosen_weights, torch.ones_like(weights))
    torch.testing.assert_close(out.chosen_weights, weights)
    torch.testing.assert_close(out.losses, weights * plain.losses)
    assert out.losses[2] == 2 * plain.losses[2] and out.losses[1] == plain.losses[1]
    if plain.chosen_rewards is not None:
        torch.testing.assert_close(out.chosen_rewards, plain.chosen_rewards)
    plain.losses.sum().backward()
    out.losses.sum().backward()
    for got, want in ((logps.policy_chosen_logps.grad, plain_logps.policy_chosen_logps.grad),
                      (logps.policy_rejected_logps.grad, plain_logps.policy_rejected_logps.grad)):
        if want is not None:  # SFT reads no rejected response
            torch.testing.assert_close(got, weights * want)
    assert plain_logps.policy_chosen_logps.grad[0] != 0 and logps.policy_chosen_logps.grad[0] == 0


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
def test_kernel_weights_equal_prepared_weights(use_triton):
    """--deviation's weights (the kernel's, of the pools' embeddings, clamped at --min-weight) equal the weights
    ddpo.prepare writes (ddpo.deviation)."""
    from ddpo.deviation import kernel_weights

    g = torch.Generator().manual_seed(3)
    group = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])  # three prompts' pools, 10 responses
    embeddings = [torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)]
    chosen = torch.tensor([0, 2, 3, 4, 6, 8])  # each pair's chosen response
    weights, _ = deviation_weights(embeddings, group)
    prepared = weights[chosen].clamp(min=0.2)
    got = kernel_weights(embeddings, group, chosen, 0.2, use_triton=use_triton)
    torch.testing.assert_close(got.double(), prepared, atol=1e-5, rtol=1e-5)
    assert (got > 1).any() and (got == 0.2).any()  # weights that move, and the clamp


def test_generic_twin_of_dpo_equals_the_fused_ddpo():
    """deviation_weighted(dpo) (the generic twin) and ddpo (ddpo_loss, the paper's equation) are one loss."""
    from ddpo.losses import deviation_weighted, dpo_objective

    logps, weights = table_logps(grad=False), torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(deviation_weighted(dpo_objective)(logps, weights, HP).losses,
                               LOSSES["ddpo"].objective(logps, weights, HP).losses)
