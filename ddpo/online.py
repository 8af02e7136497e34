"""Online DDPO: deviation-weighted preference tuning on pools the policy samples now, one round after another.

    python -m ddpo.online --prompts ddpo/data/prompts_train.jsonl --loss ddpo --deviation both --output-dir runs/online
    python -m ddpo.online --prompts prompts.jsonl --loss dpo --deviation none --output-dir runs/online-dpo  # online DPO
    python -m ddpo.online --prompts prompts.jsonl --loss dorpo --pairing best-worst --n 8 --rounds 200 \
        --score reward-model:path/to/rm --ref-update-every 50 --output-dir runs/online-dorpo
    python -m ddpo.online --prompts prompts.jsonl --output-dir runs/online --rounds 40 --resume   # go on to round 40
    torchrun --nproc_per_node 8 -m ddpo.online --prompts prompts.jsonl --prompts-per-round 64 --output-dir runs/online

Each round r = 1, 2, ...:
  1. draws --prompts-per-round prompts: the file in a seeded order, a new order each pass, cycling;
  2. samples --n responses per prompt from the current policy with ddpo.generate's sampler and flags (conformative
     decoding with --base-model/--conform-weight), seeded by --seed and r;
  3. scores them (--score: proxy or reward-model:PATH) and embeds them (--semantic-embedder, --style-embedder);
  4. pairs each prompt's pool by ddpo.prepare's rules (--pairing gap|best-worst|divpo|diverse-ns) and weights each
     pair by its chosen response's deviation in the pool of its prompt's pairs, once (the fused kernel's weights,
     kernels/deviation_loss.py; ddpo.prepare's and ddpo.train's weights on the same pairs; DivPO and Diverse-NS pairs:
     weight 1, as ddpo.prepare writes them);
  5. takes --steps-per-round optimiser steps on the round's pairs (each step all of them, in micro-batches of
     --batch-size; ddpo/step.py, ddpo.train's step: any --loss) against the reference: the start model, or with
     --ref-update-every R the policy as it was after every R-th round (iterative DPO);
  6. logs one row to metrics.jsonl ("step" is the round), and every --save-every rounds a checkpoint.

A row: the pool's pool_semantic_diversity, pool_style_diversity (mean cosine distance of each prompt's responses to
one another, averaged over prompts), pool_quality_mean, pool_quality_max (the mean over prompts of their best
score), pairs (kept this round), weights/mean|min|max, the step's loss, rewards/*, logps/* (as ddpo.train's rows,
of the round's last step), grad_norm, lr, and the time split sample_s, score_embed_s, train_s with
sample_tokens_per_s and train tokens_per_s. --eval-prompts/--eval-every (in rounds) as ddpo.train's.

<output-dir>/rounds/round-<r>.jsonl holds the round's pairs in ddpo.prepare's format (prompt, chosen, rejected,
weight, scores, meta), and round-<r>.pools.jsonl every sampled response with its score: a round can be audited,
and replayed (`ddpo.train --data rounds/round-<r>.jsonl --model <checkpoint of round r-1>` takes the same update,
tested). --resume continues from the newest checkpoint exactly: the round counter gives the prompts and the sampling
seeds, and the checkpoint the weights, optimiser state and RNG (with --ref-update-every R, from a checkpoint at a
multiple of R, where the reference equals the checkpoint's weights). Under torchrun each rank samples whole pools
(batches of --sample-batch prompts, dealt out to the ranks), every rank pairs and weights the gathered round, and
the gradients are summed as in ddpo.train (DDP; not --fsdp).
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from ddpo import generate, prepare, train
from ddpo.checkpoint import open_output_dir, output_lock, restore, run_config
from ddpo.config import add_config_args, flag, in_range
from ddpo.data import DataError, Pair, micro_batches, tokenize_pairs
from ddpo.files import atomic_write, remove_temporaries
from ddpo.deviation import METRICS, mean_cosine_distance
from ddpo.distributed import agree, data_parallel, print0, setup_distributed, shutdown_distributed
from ddpo.embedders import check_embedder, load_embedder, pool_weights
from ddpo.losses import LOSSES
from ddpo.models import (autocast_context, autocast_dtype, check_causal_lm, check_model_path, check_vocabulary,
                         load_model, load_policy, load_tokenizer)
from ddpo.monitor import Monitor, Reporter, check_flags, read_held_out, sampling_mode
from ddpo.quality import load_scorer, scorer_spec
from ddpo.reference import load_reference
from ddpo.step import PRINTED, evaluate_and_save, log_row, update
from ddpo.train import GROUPS, TrainConfig, check_device, check_paths, lr_lambda

UNUSED = {"data", "epochs", "max_steps", "precompute_ref", "eval_data", "fsdp", "grad_accum", "chosen_field",
          "rejected_field"}  # of TrainConfig



@dataclass
class OnlineConfig(generate.Sampling, TrainConfig):
    prompts: str = flag("", "prompts in ddpo.generate's format, from any source --data reads (required)")
    rounds: int = flag(20, "rounds to run in all (a resumed run goes on to this many)", type=in_range(int, 1))
    prompts_per_round: int = flag(8, "prompts sampled each round", type=in_range(int, 1))
    n: int = flag(4, "responses per prompt (2+); under torchrun write --samples-per-prompt", type=in_range(int, 2),
                aliases=["--samples-per-prompt"])
    steps_per_round: int = flag(1, "optimiser steps on each round's pairs (1: fully on-policy)", type=in_range(int, 1))
    ref_update_every: int = flag(0, "the reference becomes the policy every R rounds (0: the start model)",
                                type=in_range(int, 0))
    score: str = flag("proxy", "quality of the responses: proxy or reward-model:PATH (ddpo.prepare's --score)")
    pairing: str = flag("gap", "ddpo.prepare's rule, per prompt", choices=prepare.PAIRINGS)
    gap: float = flag(5.0, "gap pairing: minimum score gap before falling back", type=in_range(float, 0))
    rho: float = flag(0.25, "divpo: share of the pool taken as high and low", type=in_range(float, 0, 1, above=True))
    pairs_per_prompt: int = flag(2, "divpo: M, pairs per prompt", type=in_range(int, 1))
    quality_eps: float = flag(0.0, "diverse-ns: chosen score >= rejected score - eps", type=in_range(float, 0))
    length_tolerance: float = flag(0.1, "diverse-ns: |len_c - len_r| / len_r at most this", type=in_range(float, 0))
    deviation: str = flag("both", "metrics whose deviation weights the pairs of a weighted loss", choices=list(METRICS))
    max_new_tokens: int = flag(64, "tokens per response at most", type=in_range(int, 1))
    seed: int = flag(42, "seed of prompt order, sampling, pairing and initialisation", type=in_range(int, 0, 2**32 - 1))
    sample_batch: int = flag(generate.BATCH_PROMPTS, "prompts per sampling batch (the samples depend on it)",
                            type=in_range(int, 1))
    base_model: str = flag("", "conformative decoding: the base model mixed into the sampler")
    conform_weight: float = flag(0.0, "w in p = (1 - w) p_policy + w p_base", type=in_range(float, 0, 1))
    base_prompt_format: str = flag("chat", "how the base model reads the prompt", choices=["chat", "completion"])
    save_every: int = flag(0, "checkpoint every N rounds (0 = only at the end)", type=in_range(int, 0))
    eval_every: int = flag(0, "evaluate every N rounds and at the last (0 = at the last only)", type=in_range(int, 0))
    pool: str = "pairs"  # deviation over the texts of a prompt's pairs, as ddpo.prepare's default (not a flag)


ONLINE = {"online rounds": ["prompts", "rounds", "prompts_per_round", "n", "steps_per_round", "ref_update_every",
                            "score", "pairing", "gap", "rho", "pairs_per_prompt", "quality_eps", "length_tolerance"],
          "sampling": [f.name for f in fields(generate.Sampling) if f.name not in ("n", "seed")]
          + ["sample_batch", "base_model", "conform_weight", "base_prompt_format"]}


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {**ONLINE, **{k: [f for f in v if f not in UNUSED] for k, v in GROUPS.items()}}
    add_config_args(parser, OnlineConfig, groups, skip=UNUSED | {"pool"})
    cfg = OnlineConfig(**vars(parser.parse_args(argv)))
    if not cfg.prompts:
        parser.error("--prompts is required")
    cfg.max_length = 0 if cfg.max_length == -1 else cfg.max_length  # the sampler bounds the responses
    cfg.max_prompt_length = 0 if cfg.max_prompt_length == -1 else cfg.max_prompt_length
    try:
        scorer_spec(cfg.score)
    except ValueError as e:
        parser.error(f"argument --score: {e}")
    if cfg.ref_update_every and cfg.lora_r:
        parser.error("argument --ref-update-every: with --lora-r the reference is the base weights (adapters off)")
    check_device(parser, cfg)
    check_flags(parser, cfg, argv)
    return cfg


def round_prompts(prompts, cfg, r):
    """The prompts of round r (1-based): the file in a seeded order per pass, cycling; from the round number alone."""
    start = (r - 1) * cfg.prompts_per_round
    picked = []
    for k in range(start, start + cfg.prompts_per_round):
        order = list(range(len(prompts)))
        random.Random(cfg.seed * 1_000_003 + k // len(prompts)).shuffle(order)
        picked.append(prompts[order[k % len(prompts)]])
    return picked


def sample_round(cfg, policy, tokenizer, base, prompts, r, rank, world, dtype):
    """Every prompt's cfg.n responses, sampled in batches of --sample-batch dealt out to the ranks, gathered."""
    s = generate.Sampling(**{f.name: getattr(cfg, f.name) for f in fields(generate.Sampling)})
    s.seed = (cfg.seed * 1_000_003 + r) % 2**32  # each round its own draws
    mine = list(range(rank, -(-len(prompts) // cfg.sample_batch), world))
    with sampling_mode(policy), torch.no_grad():
        out = dict(generate.sample(policy, tokenizer, prompts, s, cfg.sample_batch, mine, base, cfg.conform_weight,
                                   cfg.base_prompt_format, dtype))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        out = {k: v for part in gathered for k, v in part.items()}
    return [texts for index in sorted(out) for texts in out[index]]


def pair_round(cfg, prompts, responses, scores, embed, r):
    """ddpo.prepare's pairing of each prompt's pool: Pairs (their `weight`: 1, set later) and prepare-format rows."""
    weighting, ranking = prepare.metric_roles(cfg.pairing, cfg.deviation)
    texts = [t for rs in responses for t in rs]
    deviation = prepare.Deviation({m: embed[m](texts) for m in ranking})
    rng = random.Random(cfg.seed * 1_000_003 + r)
    pairs, rows = [], []
    for g, (p, rs, ss) in enumerate(zip(prompts, responses, scores)):
        pool = {"prompt": p["prompt"], "responses": rs, "scores": ss}
        for c, j, meta in prepare.pair_prompt(cfg, "pool", pool, g * cfg.n, deviation, rng, ranking):
            if not (rs[c].strip() and rs[j].strip()):  # an empty sample (a stop token first) has nothing to learn
                continue
            pairs.append(Pair(p["prompt"], rs[c], rs[j], None, f"round {r}, prompt {p['id']}"))
            rows.append({"prompt": p["prompt"], "chosen": rs[c], "rejected": rs[j], "chosen_score": ss[c],
                         "rejected_score": ss[j], "meta": {"prompt_id": p["id"], "pairing": cfg.pairing, **meta}})
    return pairs, rows, bool(weighting)


def round_weights(cfg, pairs, weighted, embed):
    """The chosen weight of each pair of the round, once: its pool's deviation (the kernel) for a weighted loss and
    a weighting pairing, else 1."""
    if not (pairs and weighted and LOSSES[cfg.loss].weighted and METRICS[cfg.deviation]):
        return torch.ones(len(pairs))
    return pool_weights(pairs, [embed[m] for m in METRICS[cfg.deviation]], cfg.min_weight)


def pool_metrics(responses, scores, embed):
    """The sampled pools' diversity and quality: per prompt, then averaged over prompts."""
    texts = [t for rs in responses for t in rs]
    group = torch.tensor([g for g, rs in enumerate(responses) for _ in rs])
    row = {f"pool_{m}_diversity": mean_cosine_distance(embed[m](texts), group).view(len(responses), -1).mean().item()
           for m in ("semantic", "style")}
    q = torch.tensor(scores, dtype=torch.float64)
    return {**row, "pool_quality_mean": q.mean().item(), "pool_quality_max": q.max(1).values.mean().item()}


def read_inputs(cfg, world):
    """train.read_inputs for the online run: the flags' paths checked, the prompts and held-out data read once;
    ((prompts, held-out data, the run's config), what every rank must share)."""
    model_config = check_paths(cfg)
    for m in ("semantic", "style"):  # both measure every round's pools
        check_embedder(getattr(cfg, f"{m}_embedder"), f"--{m}-embedder")
    if cfg.base_model:
        check_vocabulary(model_config, check_causal_lm(cfg.base_model, "--base-model"), cfg.base_model,
                         "--base-model")
    if cfg.score.startswith("reward-model:"):
        check_model_path(cfg.score.split(":", 1)[1], "--score reward-model:")
    data, held_out_data = hashlib.sha256(), hashlib.sha256()
    prompts = generate.read_prompts(cfg.prompts, cfg.prompt_field, data)
    generate.check_rows(cfg.n, cfg.sample_batch, cfg.prompts_per_round, "--sample-batch")
    held_out = read_held_out(cfg, held_out_data)
    config = run_config(cfg, data.hexdigest(), world, train.arithmetic_models(cfg))
    return (prompts, held_out, config), {**config, "held_out_sha256": held_out_data.hexdigest()}


def online(cfg):
    rank, world, device = setup_distributed(cfg)
    try:
        # paths and prompts first: bad input fails here (on every rank together), before a model loads
        prompts, held_out, config = agree(world, lambda: read_inputs(cfg, world))
        with output_lock(cfg.output_dir) if rank == 0 else contextlib.nullcontext():
            return online_locked(cfg, rank, world, device, prompts, held_out, config)
    finally:
        shutdown_distributed(world)


def online_locked(cfg, rank, world, device, prompts, held_out, config):
    last_checkpoint, state = open_output_dir(cfg, rank, config)
    resume_from = last_checkpoint if state else None
    if state and cfg.ref_update_every and state["step"] % cfg.ref_update_every:
        raise DataError(f"--resume: {resume_from} is at round {state['step']}, not a multiple of --ref-update-every "
                        f"{cfg.ref_update_every}, and the reference of that round was not saved")
    if state and state["step"] >= cfg.rounds:
        raise DataError(f"--rounds {cfg.rounds}: {resume_from} is at round {state['step']}; ask for more rounds")
    rounds_dir = os.path.join(cfg.output_dir, "rounds")
    if rank == 0:
        os.makedirs(rounds_dir, exist_ok=True)
        remove_temporaries(rounds_dir, r"round-\d+(\.pools)?\.jsonl")

    # models: the policy (from the checkpoint), the reference, the optional base model; scorers and embedders
    tokenizer = load_tokenizer(cfg.model)
    amp_dtype = autocast_dtype(cfg.dtype, device)
    autocast = autocast_context(device, amp_dtype)
    torch.manual_seed(cfg.seed)
    policy, policy_logps, params = load_policy(cfg, device, world, resume_from)
    loss = LOSSES[cfg.loss]
    ref = load_reference(cfg, policy_logps, device, world) if loss.reference else None
    if ref and not ref.lora and resume_from and cfg.ref_update_every:
        ref.logps.model.load_state_dict(policy.state_dict())  # the reference of a resumed iterative run
    base = load_model(cfg.base_model, device=device).eval() if cfg.base_model else None
    generate.prompt_limit([m for m in (policy, base) if m is not None], cfg.max_new_tokens)
    scorer = load_scorer(cfg.score)
    embed = {m: load_embedder(getattr(cfg, f"{m}_embedder"), trust_remote_code=cfg.trust_remote_code)
             for m in ("semantic", "style")}
    monitor = Monitor(cfg, held_out, rank, world, device, tokenizer, policy, policy_logps, ref, amp_dtype)
    forward = data_parallel(policy_logps, device) if world > 1 else policy_logps

    # optimiser and schedule over every update of the run; resume
    total = cfg.rounds * cfg.steps_per_round
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = restore(state, policy, optimizer, False, metrics_path if rank == 0 else None) if state else 0
    if rank == 0 and not state:
        open(metrics_path, "w").close()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total),
                                                  last_epoch=start * cfg.steps_per_round - 1)
    if rank == 0:
        atomic_write(os.path.join(cfg.output_dir, "train_config.json"), json.dumps(config, indent=2))
    reporter = Reporter(cfg, start, tqdm.write) if rank == 0 else None

    print0(f"online {cfg.loss} on {device}{f' x {world} ranks' if world > 1 else ''}: rounds {start + 1}..{cfg.rounds} "
           f"of {cfg.prompts_per_round} prompts x {cfg.n} responses, {cfg.steps_per_round} step(s) a round", flush=True)
    path = last_checkpoint
    for r in tqdm(range(start + 1, cfg.rounds + 1), initial=start, total=cfg.rounds, desc=f"online {cfg.loss}",
                  dynamic_ncols=True, disable=rank != 0):
        # 1-2. this round's prompts, sampled from the policy as it is now
        t0 = time.perf_counter()
        batch_prompts = round_prompts(prompts, cfg, r)
        responses = sample_round(cfg, policy, tokenizer, base, batch_prompts, r, rank, world, amp_dtype)
        t1 = time.perf_counter()
        # 3-4. scored, embedded, paired by prepare's rule, weighted once by the pools' deviation
        scores = [scorer([p["prompt"]] * len(rs), rs) for p, rs in zip(batch_prompts, responses)]
        pairs, rows, weighted = pair_round(cfg, batch_prompts, responses, scores, embed, r)
        row = {"step": r, **pool_metrics(responses, scores, embed), "pairs": len(pairs)}
        weights = round_weights(cfg, pairs, weighted, embed)
        t2 = time.perf_counter()
        if rank == 0:
            for out, w in zip(rows, weights.tolist()):
                out["weight"] = w
            atomic_write(os.path.join(rounds_dir, f"round-{r}.jsonl"),
                         "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
            atomic_write(os.path.join(rounds_dir, f"round-{r}.pools.jsonl"), "".join(
                json.dumps({"prompt_id": p["id"], "prompt": p["prompt"], "response": t, "score": s, "sample": j},
                           ensure_ascii=False) + "\n"
                for p, rs, ss in zip(batch_prompts, responses, scores) for j, (t, s) in enumerate(zip(rs, ss))))
        # 5. the round's steps: ddpo.train's step, every step all of the round's pairs (none: every pool was a tie)
        tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length, loss.orpo_rule)
        for k in range(cfg.steps_per_round if pairs else 0):
            step = (r - 1) * cfg.steps_per_round + k + 1
            step_batches = micro_batches(len(pairs), cfg.batch_size, cfg.seed + r, k)
            sums, used, grad_norm, lr = update(cfg, forward, ref, pairs, weights, step_batches, rank, world, autocast,
                                               device, tokenizer.pad_token_id, params, optimizer, scheduler, step, path)
        t3 = time.perf_counter()
        sampled = sum(len(tokenizer(t).input_ids) for rs in responses for t in rs)
        if pairs:
            row.update(log_row(sums, len(pairs), used, grad_norm, lr, t3 - t2, device))
        row.update({"sample_s": t1 - t0, "score_embed_s": t2 - t1, "train_s": t3 - t2,
                    "sample_tokens_per_s": sampled / (t1 - t0)})
        if rank == 0 and (r % cfg.log_every == 0 or r == cfg.rounds):
            reporter.log(row, f"round {r}/{cfg.rounds} | pool_semantic_diversity {row['pool_semantic_diversity']:.4g}"
                         f" | pool_quality_mean {row['pool_quality_mean']:.4g} | pairs {len(pairs)} | "
                         + " | ".join(f"{key} {row[key]:.4g}" for key in PRINTED if key in row))
        # 6. the reference of iterative DPO; evaluation and checkpoint
        if ref and not ref.lora and cfg.ref_update_every and r % cfg.ref_update_every == 0:
            ref.logps.model.load_state_dict(policy.state_dict())
        path = evaluate_and_save(cfg, r, cfg.rounds, r, monitor, reporter, path, policy, tokenizer, optimizer,
                                 scheduler, params, rank, world, device)
    if reporter:
        reporter.close()
    print0(f"saved {path}", flush=True)
    return path


def main(argv=None):
    train.main(argv, parse_args, online)


if __name__ == "__main__":
    main()
