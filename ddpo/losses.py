"""Preference losses as pure functions: DPO, DDPO, ORPO, DORPO, and SFT (the stage before them); and LOSSES, the
table that maps train's --loss to the objective of a micro-batch.

    losses, chosen_rewards, rejected_rewards = ddpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, chosen_weights=w)
    losses, chosen_rewards, rejected_rewards, w = deviation_dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1, embs, group, chosen)
    out = LOSSES["ddpo"].objective(logps, weights, hparams)     # Objective(losses, rewards, weights, metrics)

Every function returns *unreduced* per-pair losses plus rewards, so the deviation weight of DDPO/DORPO is one
visible multiply and the caller decides the reduction. The trainer reduces with sum(losses) / B_global, where
B_global is the number of pairs in the optimiser step, which keeps gradient accumulation exact (docs/method.md,
section 3). DDPO and DORPO take the chosen weights either precomputed (ddpo_loss, dorpo_loss: ddpo.prepare's
`weight`) or computed in the step from the embeddings of the pairs' pools (deviation_dpo_loss,
deviation_dorpo_loss: the fused kernel of kernels/deviation_loss.py); both give the same loss (tested).

Papers:
  DPO   Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290
  ORPO  Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691
  DDPO/DORPO  Chung et al. 2025, "Modifying LLM Post-Training for Diverse Creative Writing", arXiv 2503.17126
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from kernels.deviation_loss import deviation_loss


def dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """z = beta log(pi_c/ref_c) - beta log(pi_r/ref_r) (B,), and the rewards beta log(pi/ref) of chosen and rejected."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    return logits, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Sigmoid DPO. Inputs (B,) summed completion log-probs. Returns (losses, chosen_rewards, rejected_rewards)."""
    logits, chosen_rewards, rejected_rewards = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -F.logsigmoid(logits)  # DPO, Eq. 7: -log sigma(beta log(pi_c/ref_c) - beta log(pi_r/ref_r))
    return losses, chosen_rewards, rejected_rewards


def ddpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, chosen_weights):
    """DDPO: the DPO loss of each pair times the deviation weight of its chosen response (weight outside the sigmoid)."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return chosen_weights * losses, chosen_rewards, rejected_rewards  # Chung et al. 2025, DDPO objective: delta_w * L_DPO


def deviation_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                       embeddings, group, chosen_index, min_weight=0.0, use_triton=None):
    """DDPO with in-step deviation: ddpo_loss with the chosen weights computed from the pools' embeddings
    (kernels/deviation_loss.py: embeddings [K x (M, D_k)], group (M,), chosen_index (B,), clamped at min_weight).

    Returns (losses, chosen_rewards, rejected_rewards, chosen_weights).
    """
    logits, chosen_rewards, rejected_rewards = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses, _, w = deviation_loss(logits, embeddings, group, chosen_index, min_weight, weight_inside=False,
                                  use_triton=use_triton)
    return losses, chosen_rewards, rejected_rewards, w


LN2 = 0.6931471805599453


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012): expm1 near 0, log1p far from it.

    Each branch gets only the inputs it is used for (torch.where differentiates both branches, and the unused one
    would be inf at x -> 0 and poison the gradient with NaN), and x is capped at -eps of its dtype: a response whose
    mean token log-prob rounds to 0 has finite log-odds (about 16 in fp32) and finite gradients.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near_zero = x > -LN2
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, x, -LN2))),
                       torch.log1p(-torch.exp(torch.where(near_zero, -LN2, x))))


def at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_odds_ratio(policy_chosen_logps, policy_rejected_logps):
    """Delta = log odds(y_c) - log odds(y_r), odds(y) = P / (1 - P), P = exp(mean token log-prob); in fp32 or wider."""
    chosen = at_least_fp32(policy_chosen_logps)
    rejected = at_least_fp32(policy_rejected_logps)
    return (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))  # ORPO, Eqs. 4-5: log(odds_c / odds_r)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, lam):
    """ORPO. logps (B,) are *mean* per-token log-probs, policy_chosen_nll (B,) the chosen SFT loss per pair.

    Returns (losses, chosen_rewards, rejected_rewards, log_odds); rewards are lam * mean logps, as TRL reports them.
    """
    log_odds = log_odds_ratio(policy_chosen_logps, policy_rejected_logps)
    odds_losses = -F.logsigmoid(log_odds)  # ORPO, Eq. 7: L_OR = -log sigma(log odds_c / odds_r)
    losses = at_least_fp32(policy_chosen_nll) + lam * odds_losses  # ORPO, Eq. 6: L_SFT + lambda L_OR
    return losses, lam * policy_chosen_logps.detach(), lam * policy_rejected_logps.detach(), log_odds.detach()


def dorpo_nll_weight(chosen_weights, form, weights_mean=None):
    """The weight of DORPO's NLL term: mean_b(w) (released; `weights_mean` when given, the mean weight of the whole
    optimiser step, so that accumulated micro-batches are exact) or each pair's own w_b (per-example)."""
    if form == "released":
        return chosen_weights.mean() if weights_mean is None else weights_mean
    if form == "per-example":
        return chosen_weights
    raise ValueError(f"unknown DORPO form {form!r}: expected 'released' or 'per-example'")


def dorpo_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, lam, chosen_weights,
               form="released", weights_mean=None):
    """DORPO, both forms (docs/method.md, section 3). Returns (losses, chosen_rewards, rejected_rewards, log_odds).

    form="released" (the authors' code, "ver 2"): mean_b(w) * NLL + lam * mean_b(-logsigmoid(w_b * Delta_b)),
        the weight inside the sigmoid. Per pair: w_mean * NLL_b + lam * (-logsigmoid(w_b Delta_b)); pass
        `weights_mean` (the mean weight of the whole optimiser batch) so that accumulated micro-batches are exact.
    form="per-example" (the paper's prose): w_b * (NLL_b + lam * (-logsigmoid(Delta_b))).
    """
    log_odds = log_odds_ratio(policy_chosen_logps, policy_rejected_logps)
    nll = at_least_fp32(policy_chosen_nll)
    weights = at_least_fp32(chosen_weights)
    nll_weight = dorpo_nll_weight(weights, form, weights_mean)
    if form == "released":
        losses = nll_weight * nll + lam * -F.logsigmoid(weights * log_odds)  # released DORPO: weight inside the sigmoid
    else:
        losses = nll_weight * (nll + lam * -F.logsigmoid(log_odds))  # Chung et al. 2025, DORPO: delta_w * L_ORPO
    return losses, lam * policy_chosen_logps.detach(), lam * policy_rejected_logps.detach(), log_odds.detach()


def deviation_dorpo_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, lam, embeddings, group,
                         chosen_index, form="released", min_weight=0.0, weights_mean=None, use_triton=None):
    """DORPO with in-step deviation: dorpo_loss with the chosen weights computed from the pools' embeddings and the
    odds term fused (kernels/deviation_loss.py: softplus(-w_b Delta_b) released, w_b softplus(-Delta_b) per-example).

    Returns (losses, chosen_rewards, rejected_rewards, log_odds, chosen_weights).
    """
    log_odds = log_odds_ratio(policy_chosen_logps, policy_rejected_logps)
    odds_losses, _, w = deviation_loss(log_odds, embeddings, group, chosen_index, min_weight,
                                       weight_inside=form == "released", use_triton=use_triton)
    losses = dorpo_nll_weight(w, form, weights_mean) * at_least_fp32(policy_chosen_nll) + lam * odds_losses
    return losses, lam * policy_chosen_logps.detach(), lam * policy_rejected_logps.detach(), log_odds.detach(), w


def sft_loss(policy_chosen_logps):
    """SFT on the chosen responses: logps (B,) are *mean* per-token log-probs; returns the per-pair NLL (B,)."""
    return -at_least_fp32(policy_chosen_logps)  # -1/|y| sum_t log pi(y_t | x, y_<t), averaged per response as ORPO's NLL


# --- the table of --loss: every objective takes a micro-batch's log-probs and returns the same Objective ---------


@dataclass
class Logps:
    """Log-probs of a micro-batch's completions: policy sums (B,) and token counts (B,); the reference's sums (B,)
    for losses with a reference; the rejected ones None for losses of the chosen alone."""
    policy_chosen_logps: torch.Tensor
    chosen_counts: torch.Tensor
    policy_rejected_logps: torch.Tensor | None = None
    rejected_counts: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None


class Objective(NamedTuple):
    """What every objective returns: unreduced per-pair losses (B,), the rewards of chosen and rejected (B,) (None
    for SFT), the chosen weights it used (B,) and sums over the pairs of extra metrics."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None
    chosen_weights: torch.Tensor
    metrics: dict


def dpo_args(logps, hp):
    return (logps.policy_chosen_logps, logps.policy_rejected_logps, logps.ref_chosen_logps, logps.ref_rejected_logps,
            hp.beta)


def dpo_objective(logps, weights, hp, **_):
    losses, chosen_rewards, rejected_rewards = dpo_loss(*dpo_args(logps, hp))
    return Objective(losses, chosen_rewards, rejected_rewards, torch.ones_like(weights),
                     logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def ddpo_objective(logps, weights, hp, deviation=None, use_triton=None, **_):
    """Weights from the data, or (`deviation` = embeddings, group, chosen index of the pools) from the fused kernel."""
    if deviation is None:
        losses, chosen_rewards, rejected_rewards = ddpo_loss(*dpo_args(logps, hp), chosen_weights=weights)
    else:
        losses, chosen_rewards, rejected_rewards, weights = deviation_dpo_loss(
            *dpo_args(logps, hp), *deviation, min_weight=hp.min_weight, use_triton=use_triton)
    return Objective(losses, chosen_rewards, rejected_rewards, weights,
                     logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def mean_logps(logps):
    """Per-token averages of chosen and rejected, which ORPO and SFT use."""
    chosen = logps.policy_chosen_logps / logps.chosen_counts
    return chosen, None if logps.policy_rejected_logps is None else logps.policy_rejected_logps / logps.rejected_counts


def orpo_objective(logps, weights, hp, **_):
    chosen_mean, rejected_mean = mean_logps(logps)
    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen_mean, rejected_mean, -chosen_mean,
                                                                   hp.orpo_lambda)
    return Objective(losses, chosen_rewards, rejected_rewards, torch.ones_like(weights),
                     odds_metrics(chosen_mean, rejected_mean, log_odds))


def dorpo_objective(logps, weights, hp, deviation=None, weights_mean=None, use_triton=None, **_):
    """`weights_mean`: the mean chosen weight of the whole optimiser step (the released form's NLL weight)."""
    chosen_mean, rejected_mean = mean_logps(logps)
    if deviation is None:
        losses, chosen_rewards, rejected_rewards, log_odds = dorpo_loss(
            chosen_mean, rejected_mean, -chosen_mean, hp.orpo_lambda, weights, hp.dorpo_form, weights_mean)
    else:
        losses, chosen_rewards, rejected_rewards, log_odds, weights = deviation_dorpo_loss(
            chosen_mean, rejected_mean, -chosen_mean, hp.orpo_lambda, *deviation, form=hp.dorpo_form,
            min_weight=hp.min_weight, weights_mean=weights_mean, use_triton=use_triton)
    return Objective(losses, chosen_rewards, rejected_rewards, weights, odds_metrics(chosen_mean, rejected_mean, log_odds))


def sft_objective(logps, weights, hp, **_):
    chosen_mean, _ = mean_logps(logps)
    return Objective(sft_loss(chosen_mean), None, None, torch.ones_like(weights),
                     {"logps/chosen": chosen_mean.detach().sum()})


def logps_metrics(chosen, rejected):
    return {"logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}


def odds_metrics(chosen_mean, rejected_mean, log_odds):
    return {**logps_metrics(chosen_mean, rejected_mean), "nll_loss": -chosen_mean.detach().sum(),
            "log_odds_ratio": log_odds.sum()}


@dataclass(frozen=True)
class Loss:
    objective: Callable  # (Logps, chosen weights (B,), hparams, deviation=, weights_mean=, use_triton=) -> Objective
    reference: bool = False  # needs reference log-probs
    weighted: bool = False  # takes chosen weights: the data's `weight`, or deviation computed in the step
    rejected: bool = True  # runs the rejected responses
    truncation: tuple = (0, 0)  # the released code's (max_length, max_prompt_length); 0 = off


LOSSES = {
    "dpo": Loss(dpo_objective, reference=True),
    "ddpo": Loss(ddpo_objective, reference=True, weighted=True),
    "orpo": Loss(orpo_objective, truncation=(512, 128)),  # the released code cut ORPO/DORPO to 512 tokens, the
    "dorpo": Loss(dorpo_objective, weighted=True, truncation=(512, 128)),  # prompt to its last 128
    "sft": Loss(sft_objective, rejected=False),
}
