"""Preference losses as pure per-pair functions, and LOSSES, the table that maps train's --loss to the objective of
a micro-batch.

    losses, chosen_rewards, rejected_rewards = ddpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, chosen_weights=w)
    losses, chosen_rewards, rejected_rewards = ipo_loss(pi_c, pi_r, ref_c, ref_r, 0.1, chosen_counts, rejected_counts)
    out = LOSSES["dd-ipo"].objective(logps, weights, hparams)     # Objective(losses, rewards, weights, metrics)

The losses with a reference share DPO's signature (policy chosen, policy rejected, reference chosen, reference
rejected, beta; then their own hyper-parameters) and return (losses, chosen_rewards, rejected_rewards); SimPO, ORPO
and SFT, which have no reference, take the policy's log-probs alone. Every function returns *unreduced* per-pair
losses, so the deviation weight is one visible multiply and the caller decides the reduction. The trainer reduces
with sum(losses) / B_global, where B_global is the number of pairs in the optimiser step, which keeps gradient
accumulation exact (docs/method.md, section 3).

Every loss has a deviation-weighted twin in LOSSES: ddpo and dorpo (the paper's), and dd-<loss> for the others
(dd-ipo, dd-hinge, dd-robust, dd-cdpo, dd-simpo, dd-rpo, dd-sft). A twin multiplies each pair's loss by the chosen
weight it is given, w_b * L_b (DORPO's released form: inside the sigmoid); the weights are computed once, before
training, by ddpo.prepare or ddpo/step.py: chosen_weights, never in the loss.

Papers (the equation each loss implements is cited on its line):
  DPO     Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290
  IPO     Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
          arXiv 2310.12036
  hinge   Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv 2305.10425, in the
          normalised form (a reference ratio, margin 1/beta) of Liu et al. 2023, "Statistical Rejection Sampling
          Improves Preference Optimization" (RSO), arXiv 2309.06657; TRL's loss_type="hinge"
  robust  Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", arXiv 2403.00409
  cDPO    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (conservative DPO:
          label smoothing), https://ericmitchell.ai/cdpo.pdf
  SimPO   Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734
  RPO     Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733 (DPO + NLL)
  ORPO    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691
  DDPO/DORPO  Chung et al. 2025, "Modifying LLM Post-Training for Diverse Creative Writing", arXiv 2503.17126
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


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
    """DDPO: each pair's DPO loss times the deviation weight of its chosen response (weight outside the sigmoid)."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    # Chung et al. 2025, DDPO objective: delta_w * L_DPO
    return chosen_weights * losses, chosen_rewards, rejected_rewards


def logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """log(pi_c/ref_c) and log(pi_r/ref_r) (B,)."""
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             chosen_counts, rejected_counts):
    """IPO, with beta as the paper's tau. The log-ratios are averaged per completion token (counts (B,)), as TRL's
    loss_type="ipo" does (TRL: the form the IPO authors confirmed their results used). Rewards beta log(pi/ref),
    summed over tokens, as TRL reports them."""
    chosen, rejected = logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = chosen / chosen_counts - rejected / rejected_counts
    losses = (h - 1 / (2 * beta)) ** 2  # IPO, Eq. 17: (h_pi(y_w, y_l, x) - tau^-1 / 2)^2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """SLiC's hinge on DPO's logit z (TRL's loss_type="hinge"): 0 once z >= 1, i.e. the log-ratio margin >= 1/beta."""
    logits, chosen_rewards, rejected_rewards = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    # RSO's hinge loss: SLiC-HF's calibration loss max(0, delta - log P(y_w|x) + log P(y_l|x)) on log-ratios to the
    losses = torch.relu(1 - logits)  # reference, delta = 1/beta, times beta: max(0, 1 - z)
    return losses, chosen_rewards, rejected_rewards


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    label_smoothing):
    """rDPO: DPO de-biased for preferences flipped with probability label_smoothing = epsilon in [0, 0.5) (TRL's
    loss_type="robust"). Unbiased, not bounded below: a pair's loss is negative once z is large."""
    logits, chosen_rewards, rejected_rewards = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    # Chowdhury et al. 2024, the rDPO loss: [(1 - eps) L_DPO(y_w, y_l) - eps L_DPO(y_l, y_w)] / (1 - 2 eps)
    losses = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, chosen_rewards, rejected_rewards


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
              label_smoothing):
    """Conservative DPO: DPO's loss against labels smoothed by label_smoothing = epsilon (TRL's sigmoid loss with
    label_smoothing before TRL 1.0)."""
    logits, chosen_rewards, rejected_rewards = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    # Mitchell 2023 (cDPO): (1 - eps) (-log sigma(z)) + eps (-log sigma(-z))
    losses = (1 - eps) * -F.logsigmoid(logits) + eps * -F.logsigmoid(-logits)
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta, gamma):
    """SimPO, no reference: logps (B,) are *mean* per-token log-probs; gamma the target reward margin (TRL CPOTrainer's
    loss_type="simpo", simpo_gamma). Rewards beta * mean logps, as TRL reports them."""
    chosen_rewards, rejected_rewards = beta * policy_chosen_logps, beta * policy_rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)  # SimPO, Eq. 6: -log sigma(b/|y_w| log pi(y_w|x)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()  # - b/|y_l| log pi(y_l|x) - gamma)


def rpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             policy_chosen_nll, alpha):
    """RPO: DPO plus alpha times the chosen response's NLL per token, policy_chosen_nll (B,) (TRL: loss_type
    ["sigmoid", "sft"], loss_weights [1, alpha], whose NLL is a token mean over the batch instead of per pair)."""
    dpo, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = dpo + alpha * policy_chosen_nll  # Pang et al. 2024, L_DPO+NLL: L_DPO - alpha log M(y_w | x) / |y_w|
    return losses, chosen_rewards, rejected_rewards


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


def sft_loss(policy_chosen_logps):
    """SFT on the chosen responses: logps (B,) are *mean* per-token log-probs; returns the per-pair NLL (B,)."""
    # -1/|y| sum_t log pi(y_t | x, y_<t), averaged per response as ORPO's NLL
    return -at_least_fp32(policy_chosen_logps)


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


def concat(objectives):
    """One Objective of those of consecutive groups of pairs (the fused head's, ddpo/models.py), detached."""
    cat = lambda ts: None if ts[0] is None else torch.cat([t.detach() for t in ts])  # noqa: E731
    return Objective(*(cat([o[i] for o in objectives]) for i in range(4)),
                     {key: sum(o.metrics[key] for o in objectives).detach() for key in objectives[0].metrics})


def dpo_args(logps, hp):
    return (logps.policy_chosen_logps, logps.policy_rejected_logps, logps.ref_chosen_logps, logps.ref_rejected_logps,
            hp.beta)


def dpo_objective(logps, weights, hp, **_):
    losses, chosen_rewards, rejected_rewards = dpo_loss(*dpo_args(logps, hp))
    return Objective(losses, chosen_rewards, rejected_rewards, torch.ones_like(weights),
                     logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def ddpo_objective(logps, weights, hp, **_):
    losses, chosen_rewards, rejected_rewards = ddpo_loss(*dpo_args(logps, hp), chosen_weights=weights)
    return Objective(losses, chosen_rewards, rejected_rewards, weights,
                     logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def mean_logps(logps):
    """Per-token averages of chosen and rejected, which ORPO, SimPO, SFT and RPO's NLL use."""
    chosen = logps.policy_chosen_logps / logps.chosen_counts
    return chosen, None if logps.policy_rejected_logps is None else logps.policy_rejected_logps / logps.rejected_counts


def orpo_objective(logps, weights, hp, **_):
    chosen_mean, rejected_mean = mean_logps(logps)
    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen_mean, rejected_mean, -chosen_mean,
                                                                   hp.orpo_lambda)
    return Objective(losses, chosen_rewards, rejected_rewards, torch.ones_like(weights),
                     odds_metrics(chosen_mean, rejected_mean, log_odds))


def dorpo_objective(logps, weights, hp, weights_mean=None, **_):
    """`weights_mean`: the mean chosen weight of the whole optimiser step (the released form's NLL weight)."""
    chosen_mean, rejected_mean = mean_logps(logps)
    losses, chosen_rewards, rejected_rewards, log_odds = dorpo_loss(
        chosen_mean, rejected_mean, -chosen_mean, hp.orpo_lambda, weights, hp.dorpo_form, weights_mean)
    return Objective(losses, chosen_rewards, rejected_rewards, weights,
                     odds_metrics(chosen_mean, rejected_mean, log_odds))


def sft_objective(logps, weights, hp, **_):
    chosen_mean, _ = mean_logps(logps)
    return Objective(sft_loss(chosen_mean), None, None, torch.ones_like(weights),
                     {"logps/chosen": chosen_mean.detach().sum()})


def unweighted(result, weights, metrics):
    """The Objective of a loss function's (losses, chosen_rewards, rejected_rewards), every chosen weight 1."""
    return Objective(*result, torch.ones_like(weights), metrics)


def ipo_objective(logps, weights, hp, **_):
    return unweighted(ipo_loss(*dpo_args(logps, hp), logps.chosen_counts, logps.rejected_counts), weights,
                      logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def hinge_objective(logps, weights, hp, **_):
    return unweighted(hinge_loss(*dpo_args(logps, hp)), weights,
                      logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def robust_objective(logps, weights, hp, **_):
    return unweighted(robust_dpo_loss(*dpo_args(logps, hp), hp.label_smoothing), weights,
                      logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def cdpo_objective(logps, weights, hp, **_):
    return unweighted(cdpo_loss(*dpo_args(logps, hp), hp.label_smoothing), weights,
                      logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps))


def rpo_objective(logps, weights, hp, **_):
    chosen_mean, _ = mean_logps(logps)
    return unweighted(rpo_loss(*dpo_args(logps, hp), -chosen_mean, hp.rpo_alpha), weights,
                      {**logps_metrics(logps.policy_chosen_logps, logps.policy_rejected_logps),
                       "nll_loss": -chosen_mean.detach().sum()})


def simpo_objective(logps, weights, hp, **_):
    chosen_mean, rejected_mean = mean_logps(logps)  # SimPO's rewards are per-token means, and TRL logs them
    return unweighted(simpo_loss(chosen_mean, rejected_mean, hp.beta, hp.simpo_gamma), weights,
                      logps_metrics(chosen_mean, rejected_mean))


def deviation_weighted(objective):
    """The deviation-weighted twin of an objective: each pair's loss times its chosen weight."""
    def weighted_objective(logps, weights, hp, **_):
        out = objective(logps, weights, hp)
        losses = weights * out.losses  # Chung et al. 2025: delta_w * L, the weight outside the pair's loss
        return out._replace(losses=losses, chosen_weights=weights)
    return weighted_objective


def logps_metrics(chosen, rejected):
    return {"logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}


def odds_metrics(chosen_mean, rejected_mean, log_odds):
    return {**logps_metrics(chosen_mean, rejected_mean), "nll_loss": -chosen_mean.detach().sum(),
            "log_odds_ratio": log_odds.sum()}


@dataclass(frozen=True)
class Loss:
    objective: Callable  # (Logps, chosen weights (B,), hparams, weights_mean=) -> Objective
    reference: bool = False  # needs reference log-probs
    weighted: bool = False  # takes chosen weights: the data's `weight`, or its pools' deviation
    rejected: bool = True  # runs the rejected responses
    truncation: tuple = (0, 0)  # the released code's (max_length, max_prompt_length); 0 = off
    orpo_rule: bool = False  # truncated by the released ORPO rule (ddpo/data.py), not the DPO one


LOSSES = {  # --loss: each loss, then its deviation-weighted twin
    "dpo": Loss(dpo_objective, reference=True),
    "ddpo": Loss(ddpo_objective, reference=True, weighted=True),
    "ipo": Loss(ipo_objective, reference=True),
    "dd-ipo": Loss(deviation_weighted(ipo_objective), reference=True, weighted=True),
    "hinge": Loss(hinge_objective, reference=True),
    "dd-hinge": Loss(deviation_weighted(hinge_objective), reference=True, weighted=True),
    "robust": Loss(robust_objective, reference=True),
    "dd-robust": Loss(deviation_weighted(robust_objective), reference=True, weighted=True),
    "cdpo": Loss(cdpo_objective, reference=True),
    "dd-cdpo": Loss(deviation_weighted(cdpo_objective), reference=True, weighted=True),
    "rpo": Loss(rpo_objective, reference=True),
    "dd-rpo": Loss(deviation_weighted(rpo_objective), reference=True, weighted=True),
    "simpo": Loss(simpo_objective),
    "dd-simpo": Loss(deviation_weighted(simpo_objective), weighted=True),
    # the released code cut ORPO/DORPO to 512 tokens, the prompt to its last 128, by its own rule
    "orpo": Loss(orpo_objective, truncation=(512, 128), orpo_rule=True),
    "dorpo": Loss(dorpo_objective, weighted=True, truncation=(512, 128), orpo_rule=True),
    "sft": Loss(sft_objective, rejected=False),
    "dd-sft": Loss(deviation_weighted(sft_objective), weighted=True, rejected=False),
}
