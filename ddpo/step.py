"""One optimiser step of preference tuning, shared by ddpo.train (fixed pairs) and ddpo.online (fresh pools):

    weights = chosen_weights(cfg, pairs)                  # once: the data's 'weight', or the pools' deviation
    sums, used, grad_norm, lr = update(cfg, forward, ref, pairs, weights, step_batches, ...)

A micro-batch reads as the DPO reference does: its pairs' policy log-probs (one forward over [chosen; rejected]),
the reference's beside them, then the objective of --loss (ddpo.losses.LOSSES), whose per-pair losses the chosen
weights multiply. The log-prob head is reached through one helper, `policy_objective`: with --fused-loss it hands
the head each group of pairs' objective, so the logits are computed once and the loss's gradients in the forward
(kernels/logprobs.py); with --no-fused-loss it returns the log-probs and the objective runs after (same numbers).
Every loss is sum(per-pair losses) / (pairs in the step), so accumulation over micro-batches and ranks is exact.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ddpo.checkpoint import save
from ddpo.data import make_batch
from ddpo.deviation import METRICS
from ddpo.distributed import gather_metrics, no_sync, peak_memory_gb, print0, rank_share
from ddpo.embedders import load_embedder, pool_weights
from ddpo.losses import LOSSES, Logps, concat


def embedders(cfg):
    """{metric: embedder name} of --deviation (empty without it, or for a loss without weights)."""
    if not LOSSES[cfg.loss].weighted:
        return {}
    return {metric: getattr(cfg, f"{metric}_embedder") for metric in METRICS[cfg.deviation]}


def chosen_weights(cfg, pairs):
    """The chosen weight of every pair (P,), computed once: 1 for unweighted losses; with --deviation the weights of
    the pairs' pools (embedders.pool_weights); else the data's 'weight' (1 when absent); clamped at --min-weight."""
    if not LOSSES[cfg.loss].weighted:
        return torch.ones(len(pairs))
    if (names := embedders(cfg)):
        print0(f"deviation weights of the pairs' pools ({', '.join(names.values())})", flush=True)
        embed = [load_embedder(name, trust_remote_code=cfg.trust_remote_code) for name in names.values()]
        return pool_weights(pairs, embed, cfg.min_weight)
    weights = torch.tensor([1.0 if p.weight is None else p.weight for p in pairs])
    return weights.clamp(min=cfg.min_weight)


def pairs_objective(loss, hp, weights, ref_logps, at, policy, counts, **kwargs):
    """The Objective of the pairs at positions `at` (k,) of a micro-batch: their policy log-probs and token counts
    [chosen; rejected] (2k,) or (k,), the reference's (chosen, rejected) of the whole micro-batch, its weights (B,)."""
    k = len(at)
    logps = Logps(policy[:k], counts[:k])
    if loss.rejected:
        logps.policy_rejected_logps, logps.rejected_counts = policy[k:], counts[k:]
    if loss.reference:
        logps.ref_chosen_logps, logps.ref_rejected_logps = ref_logps[0][at], ref_logps[1][at]
    return loss.objective(logps, weights[at], hp, **kwargs)


def policy_objective(policy_logps, batch, n_pairs, objective, fused):
    """The Objective of a micro-batch's n_pairs pairs, and its summed loss to differentiate. objective(at, policy,
    counts) is pairs_objective bound to the micro-batch. fused (and gradients wanted): the head computes each group
    of pairs' objective in its forward (ddpo/models.py: sequence_logps); else the head, then the objective."""
    if fused and torch.is_grad_enabled():
        parts = []

        def group_loss(at, policy, counts):  # one group of pairs: its Objective kept, its loss summed
            parts.append(objective(at, policy, counts))
            return parts[-1].losses.sum()

        total, _, _ = policy_logps(batch, pair_loss=group_loss, pairs=n_pairs)
        return concat(parts), total
    policy, counts = policy_logps(batch)  # (2B,): [chosen; rejected], or (B,): the chosen alone
    out = objective(torch.arange(n_pairs, device=policy.device), policy, counts)
    return out, out.losses.sum()


def micro_batch(cfg, policy_logps, ref, pairs, index, weights, pad_token_id, device, weights_mean=None):
    """The pairs at positions `index` (weights: every pair's chosen weight; weights_mean: the step's mean, which
    DORPO's released form takes). Returns (Objective, metric sums over its pairs, the summed loss to differentiate)."""
    loss = LOSSES[cfg.loss]
    share = getattr(policy_logps, "module", policy_logps).share_prompts  # (DDP holds it as .module)
    batch = make_batch([pairs[j] for j in index], pad_token_id, device, cfg.packing, loss.rejected, share)
    ref_logps = ref(batch, index) if loss.reference else None
    weights = weights[index].to(device)
    if weights_mean is None:
        weights_mean = weights.mean()

    def objective(at, policy, counts):
        return pairs_objective(loss, cfg, weights, ref_logps, at, policy, counts, weights_mean=weights_mean)

    out, total = policy_objective(policy_logps, batch, len(index), objective, cfg.fused_loss)
    metrics = {"loss": out.losses.detach().sum(), **out.metrics, "tokens": torch.as_tensor(batch.tokens)}
    if out.chosen_rewards is not None:
        margins = out.chosen_rewards - out.rejected_rewards
        metrics.update({"rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
                        "rewards/margins": margins.sum(), "rewards/accuracies": (margins > 0).float().sum()})
    return out, metrics, total


def accumulate(cfg, forward, ref, pairs, weights, step_batches, rank, world, autocast, device, pad_token_id):
    """Forward and backward of this rank's share of an optimiser step's micro-batches (the gradients of
    sum(losses) / pairs in the step accumulate). Returns the metric sums and the chosen weights used."""
    n_pairs = sum(len(b) for b in step_batches)
    weights_mean = weights[sum(step_batches, [])].mean().item()  # DORPO (released) over the whole step
    sums, used_weights = {}, []
    mine = rank_share(step_batches, rank, world)  # None: a pass at weight 0, so that every rank runs as many
    for i, batch in enumerate(mine):
        idle = batch is None
        batch = step_batches[0] if idle else batch
        with no_sync(forward, last=i == len(mine) - 1):  # DDP: the all-reduce runs in the last backward only
            with autocast():
                out, metrics, total = micro_batch(cfg, forward, ref, pairs, batch, weights, pad_token_id, device,
                                                  weights_mean)
            (total / n_pairs * (0.0 if idle else 1.0)).backward()  # sum over pairs / pairs in the step
        if not idle:
            used_weights.append(out.chosen_weights.detach().float().cpu())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.item()
    return sums, used_weights


def non_finite(step, sums, grad_norm, last_checkpoint):
    """The error for a step with a NaN or inf among its loss, gradient norm and metrics, or None."""
    bad = {k: v for k, v in {**sums, "grad_norm": grad_norm}.items() if not math.isfinite(v)}
    if not bad:
        return None
    return (f"error: step {step}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())}; stopped before its "
            f"update and checkpoint (last checkpoint: {last_checkpoint or 'none'}). Likely causes: a huge 'weight' in "
            "the data, --beta or --lr too large, or a model whose logits overflow")


def update(cfg, forward, ref, pairs, weights, step_batches, rank, world, autocast, device, pad_token_id, params,
           optimizer, scheduler, step, last_checkpoint):
    """One optimiser step: accumulate every rank's micro-batches, clip, refuse a non-finite step before its update,
    update. Returns the metric sums and chosen weights of every rank, the gradient norm and the step's lr."""
    sums, used_weights = accumulate(cfg, forward, ref, pairs, weights, step_batches, rank, world, autocast, device,
                                    pad_token_id)
    sums, used_weights = gather_metrics(sums, used_weights, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
    if (error := non_finite(step, sums, grad_norm, last_checkpoint)):
        raise SystemExit(error)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, used_weights, grad_norm, lr


def finite_weights(params, world, device):
    """Whether every trained weight is finite, on every rank."""
    local = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in params)
    ok = torch.tensor(float(local), device=device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def evaluate_and_save(cfg, n, total, epoch, monitor, reporter, last, policy, tokenizer, optimizer, scheduler, params,
                      rank, world, device):
    """After the update of step (ddpo.online: round) n of total: the evaluation when due, then a checkpoint every
    --save-every and at the last. Returns the newest checkpoint's path."""
    saving = (cfg.save_every and n % cfg.save_every == 0) or n == total
    # a finite gradient can still overflow the weights (a huge --lr): never a checkpoint of them
    if saving and not finite_weights(params, world, device):
        raise SystemExit(f"error: step {n}: the update made weights non-finite; stopped before its checkpoint (last "
                         f"checkpoint: {last or 'none'}). Likely cause: --lr too large")
    monitor.after_step(n, total, epoch, last, reporter)  # held-out pairs, samples: when due
    return save(cfg, n, policy, tokenizer, optimizer, scheduler, rank, world) if saving else last


PRINTED = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "weights/mean", "lr", "step_time_s",
           "peak_mem_gb")  # of a metrics row, on the log line


def log_row(sums, n_pairs, used_weights, grad_norm, lr, dt, device):
    """A metrics.jsonl row's training metrics: metric sums per pair, the chosen weights used, speed and memory."""
    used_weights = torch.cat(used_weights)
    return {**{key: value / n_pairs for key, value in sums.items() if key != "tokens"},
            "weights/mean": used_weights.mean().item(), "weights/min": used_weights.min().item(),
            "weights/max": used_weights.max().item(), "grad_norm": grad_norm, "lr": lr, "step_time_s": dt,
            "tokens_per_s": sums["tokens"] / dt, "peak_mem_gb": peak_memory_gb(device)}
