"""Preference tuning in one plain loop: DPO, DDPO, ORPO and DORPO.

    python -m ddpo.train --data pairs.jsonl --loss ddpo --output-dir runs/ddpo
    python -m ddpo.train --data pairs.jsonl --loss dorpo --dorpo-form per-example --model HuggingFaceTB/SmolLM2-135M-Instruct
    python -m ddpo.train --data pairs.jsonl --output-dir runs/ddpo --resume      # continue from the newest checkpoint
    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --batch-size 2 --grad-accum 4
    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --fsdp --model Qwen/Qwen2.5-7B-Instruct

Under torchrun (CUDA: nccl, CPU: gloo) every rank holds the whole model; each optimiser step's micro-batches are
dealt out to the ranks and the gradients summed with one all-reduce before the clip and the update: the arithmetic
of DistributedDataParallel, equal to one process running all the micro-batches (tested to 1e-5). With --fsdp the
ranks hold shards instead (FSDP2: parameters, gradients and optimiser state), gradients are reduce-scattered in the
backward, and the arithmetic is the same (tested to 1e-5, with resume). Rank 0 logs and saves; metrics are gathered
from all ranks. Global batch = batch_size x grad_accum x world size.

One optimiser step = grad_accum micro-batches of batch_size pairs. Each micro-batch runs the policy once over
[chosen; rejected] (right-padded), gathers the hidden states at completion positions only, and turns them into
log-probs with the fused head (kernels/logprobs.py: Triton on CUDA, chunked PyTorch on CPU; never a (B, T, V)
tensor). DPO/DDPO take reference log-probs from a frozen copy of the starting model in the same layout.
Every loss is sum(per-pair losses) / (pairs in the step), so accumulation is exact. Dropout is off.

Outputs in --output-dir: checkpoint-<step>/ (Hugging Face model + tokenizer, trainer_state.pt with optimiser,
scheduler, step and RNG, train_config.json), metrics.jsonl (one line per log step) and train_config.json (every flag
and the sha256 of the data). Checkpoints are written to a temporary directory and renamed into place
(ddpo/checkpoint.py); a run holds <output_dir>/.lock while it writes there, so a second run into the same directory
is refused, and removes the temporaries a killed run left there when it starts.

Flags are checked before anything loads: numeric ranges at parse time, then model paths, the output directory and
the data. A step whose loss, gradient norm or any logged metric is not finite (NaN or inf: a huge 'weight' in the
data, a --beta or --lr too large, a model that overflows) stops the run with an error naming the step, before the
optimiser step and before any checkpoint of it, so no NaN reaches the weights or metrics.jsonl.

--resume continues from the newest checkpoint with its weights, optimiser state, RNG and step. It refuses flags
that differ from the checkpoint's train_config.json (loss, data content, beta, model, LoRA, seed, ...: the error
lists them) except checkpoint.MAY_CHANGE: --max-steps / --epochs (the schedule's lambda then uses the new total
from the resumed step on), logging and saving cadence, --keep-checkpoints, --device, --precompute-ref and other ways
to run the same arithmetic.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ddpo.checkpoint import (check_resumable, checkpoints, load_state, output_lock, run_config, save_checkpoint,
                             set_rng_state, trim_metrics)
from ddpo.config import add_config_args
from ddpo.data import (DataError, atomic_write, check_output_dir, in_range, load_pairs, make_batch, optimizer_steps,
                       remove_temporaries, response_pools, tokenize_pairs)
from ddpo.deviation import METRICS, chosen_weights, deviation_weights
from ddpo.embedders import DEFAULT_EMBEDDERS, check_embedder, load_embedder
from ddpo.distributed import all_reduce_grads, full_state, peak_memory_gb, print0, setup_distributed, shard
from ddpo.lean import use_lean
from ddpo.lora import add_lora, load_adapter
from ddpo.losses import (ddpo_loss, deviation_dorpo_loss, deviation_dpo_loss, dorpo_loss, dpo_loss, orpo_loss,
                         sft_loss)
from ddpo.models import (DEFAULT_MODEL, SequenceLogps, check_fusable, check_model_path, disable_dropout, load_model,
                         load_tokenizer, use_segment_attention)
from ddpo.reference import Reference, check_packing


@dataclass
class TrainConfig:
    data: str = field(default="", metadata={"help": "pairs JSONL file or directory of JSONL files (required)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "hub name, local directory or packaged:<name>"})
    ref_model: str = field(default="", metadata={"help": "reference model for DPO/DDPO (default: --model, frozen)"})
    output_dir: str = field(default="runs/train", metadata={"help": "checkpoints, metrics.jsonl, train_config.json"})
    loss: str = field(default="ddpo", metadata={"help": "dpo | ddpo | orpo | dorpo | sft (NLL of the chosen responses, "
                                                         "the paper's stage before DPO)",
                                                 "choices": ["dpo", "ddpo", "orpo", "dorpo", "sft"]})
    beta: float = field(default=0.1, metadata={"help": "DPO/DDPO inverse temperature (paper: 0.1)",
                                             "type": in_range(float, 0, above=True)})
    orpo_lambda: float = field(default=0.25, metadata={"help": "weight of the ORPO/DORPO odds-ratio term",
                                                    "type": in_range(float, 0)})
    dorpo_form: str = field(default="released", metadata={
        "help": "released: mean(w)*NLL + lambda*mean(-logsigmoid(w*Delta)); per-example: mean(w*(NLL + lambda*L_OR))",
        "choices": ["released", "per-example"]})
    deviation: str = field(default="none", metadata={
        "help": "none: weights from the data's 'weight'; semantic|style|both: compute them in each step from "
                "embeddings of every prompt's pool (fused kernel; batches hold whole prompts)",
        "choices": ["none", "semantic", "style", "both"]})
    semantic_embedder: str = field(default=DEFAULT_EMBEDDERS["semantic"], metadata={"help": "for --deviation semantic|both"})
    style_embedder: str = field(default=DEFAULT_EMBEDDERS["style"], metadata={"help": "for --deviation style|both"})
    weight_field: str = field(default="weight", metadata={
        "help": "the data's field holding each pair's weight (--deviation none), e.g. a score another tool wrote; "
                "optional under the default name, required in every record under any other"})
    min_weight: float = field(default=0.0, metadata={"help": "clamp chosen weights from below, e.g. 0.2 (paper ablation)",
                                                   "type": in_range(float, 0)})
    lr: float = field(default=5e-6, metadata={"help": "peak learning rate (paper: 5e-6)", "type": in_range(float, 0, above=True)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "type": in_range(float, 0)})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps", "type": in_range(int, 0)})
    schedule: str = field(default="linear", metadata={"help": "decay after warm-up", "choices": ["linear", "cosine", "constant"]})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)", "type": in_range(float, 0)})
    epochs: float = field(default=3.0, metadata={"help": "passes over the pairs (paper: 3); ignored if max_steps > 0",
                                               "type": in_range(float, 0, above=True)})
    max_steps: int = field(default=0, metadata={"help": "optimiser steps; 0 = derive from epochs", "type": in_range(int, 0)})
    batch_size: int = field(default=2, metadata={"help": "pairs per micro-batch", "type": in_range(int, 1)})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step", "type": in_range(int, 1)})
    max_length: int = field(default=-1, metadata={"help": "max prompt+completion tokens; completions keep their start "
                                                           "(0 = off; -1 = as released: off for dpo/ddpo/sft, 512 for "
                                                           "orpo/dorpo)", "type": in_range(int, -1)})
    max_prompt_length: int = field(default=-1, metadata={"help": "max prompt tokens; prompts keep their end (0 = off; "
                                                                  "-1 = as released: off for dpo/ddpo/sft, 128 for "
                                                                  "orpo/dorpo)", "type": in_range(int, -1)})
    seed: int = field(default=42, metadata={"help": "seed of data order and initialisation", "type": in_range(int, 0, 2**32 - 1)})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 autocast on CUDA, fp32 on CPU", "choices": ["auto", "float32", "bfloat16"]})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    packing: bool = field(default=True, metadata={"help": "padding-free micro-batches: sequences packed in one row "
                                                          "(checked against padding on the first pairs at start)"})
    precompute_ref: bool = field(default=False, metadata={"help": "DPO/DDPO: reference log-probs in one pass before "
                                                                  "training, cached on disk; the reference model is then freed"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard parameters, gradients and optimiser "
                                                        "state over the ranks (FSDP2, one unit per decoder layer), for "
                                                        "models that do not fit one device; full fine-tuning only"})
    lean: bool = field(default=True, metadata={"help": "policy SwiGLU MLPs and RMSNorms save fewer activations and "
                                                        "recompute the rest in the backward (ddpo/lean.py; same "
                                                        "arithmetic)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning; paper: 128); the reference "
                                                      "is then the base weights with adapters off", "type": in_range(int, 0)})
    lora_alpha: float = field(default=256.0, metadata={"help": "LoRA alpha (scale alpha / r)", "type": in_range(float, 0, above=True)})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input", "type": in_range(float, 0, 1, below=True)})
    lora_targets: str = field(default="q_proj,v_proj", metadata={"help": "comma-separated nn.Linear names to adapt"})
    merge_lora: bool = field(default=True, metadata={"help": "also save merged weights (transformers-loadable) "
                                                             "in every LoRA checkpoint"})
    kernels: str = field(default="auto", metadata={"help": "log-prob head: auto (Triton on CUDA), triton, torch (chunked)", "choices": ["auto", "triton", "torch"]})
    log_every: int = field(default=1, metadata={"help": "log every N steps", "type": in_range(int, 1)})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)", "type": in_range(int, 0)})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in output_dir, the newest always (0 = all)",
                                                       "type": in_range(int, 0)})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir, with "
                                                          "its settings (only --max-steps/--epochs, cadence, device and "
                                                          "how it runs may change)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the embedders' own code from their directory "
                                                                     "or hub repo (--deviation with jinaai/jina-"
                                                                     "embeddings-v3); only for models you trust"})


GROUPS = {  # headers of --help
    "objective": ["loss", "beta", "orpo_lambda", "dorpo_form", "deviation", "semantic_embedder", "style_embedder",
                  "trust_remote_code", "weight_field", "min_weight"],
    "optimisation": ["lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm", "epochs", "max_steps",
                     "batch_size", "grad_accum", "seed"],
    "sequences": ["max_length", "max_prompt_length", "packing"],
    "speed and memory": ["dtype", "device", "kernels", "precompute_ref", "lean", "gradient_checkpointing", "fsdp"],
    "LoRA": ["lora_r", "lora_alpha", "lora_dropout", "lora_targets", "merge_lora"],
    "checkpoints and logs": ["log_every", "save_every", "keep_checkpoints", "resume"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cfg = TrainConfig(**vars(add_config_args(parser, TrainConfig, GROUPS).parse_args(argv)))
    if not cfg.data:
        parser.error("--data is required")
    odds = cfg.loss in ("orpo", "dorpo")  # the released code cut ORPO/DORPO to 512 tokens, the prompt to its last 128
    cfg.max_length = (512 if odds else 0) if cfg.max_length == -1 else cfg.max_length
    cfg.max_prompt_length = (128 if odds else 0) if cfg.max_prompt_length == -1 else cfg.max_prompt_length
    if cfg.max_length and cfg.max_prompt_length >= cfg.max_length:
        parser.error(f"--max-prompt-length ({cfg.max_prompt_length}) must be below --max-length ({cfg.max_length})")
    check_device(parser, cfg)
    return cfg


def check_device(parser, cfg):
    """--device names a device that is there, and --kernels triton has one to run on."""
    try:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
    except RuntimeError:
        parser.error(f"argument --device: unknown device {cfg.device!r}: use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: {cfg.device}: only cpu and cuda are supported")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"argument --device: {cfg.device}, but {torch.cuda.device_count()} GPUs are visible")
    if cfg.kernels == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("argument --kernels: triton on the CPU runs only under TRITON_INTERPRET=1 (set before start); "
                     "use --kernels torch")


def lr_lambda(cfg, total_steps):
    def f(step):
        if step < cfg.warmup_steps:  # from 0, as Hugging Face's schedules: the first step's lr is 0
            return step / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return f


def step_losses(cfg, policy_logps, ref, index, pairs, weights, weights_mean, pad_token_id, device, use_triton, deviation=None):
    """Per-pair losses of one micro-batch. Returns (losses (B,), chosen weights (B,), metric sums over its pairs).

    index: the pairs' positions in the data (for precomputed reference log-probs). weights (B,) are the data's chosen
    weights; with `deviation` = (embeddings, group, chosen_index) of the micro-batch's pools they are computed here
    instead, by the fused kernel. policy_logps: the policy as a SequenceLogps module.
    """
    if cfg.loss == "sft":  # the chosen responses alone
        batch = make_batch(pairs, pad_token_id, device, cfg.packing, rejected=False)
        logps, counts = policy_logps(batch)  # (B,)
        chosen_mean = logps / counts
        metrics = {"logps/chosen": chosen_mean.detach().sum(), "tokens": torch.as_tensor(int(counts.sum()))}
        return sft_loss(chosen_mean), weights.detach(), metrics
    batch = make_batch(pairs, pad_token_id, device, cfg.packing)
    logps, counts = policy_logps(batch)  # (2B,)
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)
    metrics = {}
    if cfg.loss in ("dpo", "ddpo"):
        ref_chosen_logps, ref_rejected_logps = ref(batch, index)
        args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, cfg.beta)
        if cfg.loss == "dpo":
            losses, chosen_rewards, rejected_rewards = dpo_loss(*args)
        elif deviation is None:
            losses, chosen_rewards, rejected_rewards = ddpo_loss(*args, chosen_weights=weights)
        else:
            losses, chosen_rewards, rejected_rewards, weights = deviation_dpo_loss(
                *args, *deviation, min_weight=cfg.min_weight, use_triton=use_triton)
    else:
        chosen_counts, rejected_counts = counts.chunk(2)
        chosen_mean = policy_chosen_logps / chosen_counts  # ORPO uses per-token averages
        rejected_mean = policy_rejected_logps / rejected_counts
        if cfg.loss == "orpo":
            losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen_mean, rejected_mean, -chosen_mean, cfg.orpo_lambda)
        elif deviation is None:
            losses, chosen_rewards, rejected_rewards, log_odds = dorpo_loss(
                chosen_mean, rejected_mean, -chosen_mean, cfg.orpo_lambda, weights, cfg.dorpo_form, weights_mean)
        else:
            losses, chosen_rewards, rejected_rewards, log_odds, weights = deviation_dorpo_loss(
                chosen_mean, rejected_mean, -chosen_mean, cfg.orpo_lambda, *deviation, form=cfg.dorpo_form,
                min_weight=cfg.min_weight, weights_mean=weights_mean, use_triton=use_triton)
        policy_chosen_logps, policy_rejected_logps = chosen_mean, rejected_mean
        metrics["nll_loss"] = -chosen_mean.detach().sum()
        metrics["log_odds_ratio"] = log_odds.sum()
    margins = chosen_rewards - rejected_rewards
    metrics.update({
        "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": margins.sum(), "rewards/accuracies": (margins > 0).float().sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(), "logps/rejected": policy_rejected_logps.detach().sum(),
    })
    metrics["tokens"] = torch.as_tensor(batch[0].numel()) if cfg.packing else batch[1].sum()  # real tokens
    return losses, weights.detach(), metrics


class InStepDeviation:
    """Embeddings of every prompt's pool, computed once; hands the kernel the pools of a micro-batch's prompts."""

    def __init__(self, cfg, pairs, device):
        texts, self.text_prompt, self.pair_prompt, self.pair_chosen = response_pools(pairs)
        names = {"semantic": cfg.semantic_embedder, "style": cfg.style_embedder}
        print0(f"embedding {len(texts)} responses of {int(self.pair_prompt.max()) + 1} prompts "
              f"({', '.join(names[m] for m in METRICS[cfg.deviation])})", flush=True)
        embeddings = [load_embedder(names[m], trust_remote_code=cfg.trust_remote_code)(texts)
                      for m in METRICS[cfg.deviation]]
        weights, _ = deviation_weights(embeddings, self.text_prompt)  # what the kernel computes, for DORPO's step mean
        self.chosen_weights = chosen_weights(weights, self.pair_chosen, cfg.min_weight).float()
        self.embeddings = [e.to(device) for e in embeddings]
        self.device = device

    def __call__(self, batch):
        prompts = self.pair_prompt[batch].unique()
        rows = torch.isin(self.text_prompt, prompts).nonzero()[:, 0]  # every response of these prompts
        local = torch.full_like(self.text_prompt, -1)
        local[rows] = torch.arange(len(rows))
        group = torch.searchsorted(prompts, self.text_prompt[rows])
        chosen = local[self.pair_chosen[batch]]
        return [e[rows.to(self.device)] for e in self.embeddings], group.to(self.device), chosen.to(self.device)


def pair_weights(cfg, pairs):
    """Chosen weights of the pairs: the data's `weight` (1 when absent) for DDPO/DORPO, 1 for DPO/ORPO."""
    if cfg.loss in ("dpo", "orpo", "sft"):
        return torch.ones(len(pairs))
    w = torch.tensor([1.0 if p.weight is None else p.weight for p in pairs])
    return w.clamp(min=cfg.min_weight)


def check_paths(cfg):
    """Model and embedder paths and the output directory, before anything loads or is written."""
    check_model_path(cfg.model)
    if cfg.ref_model:
        check_model_path(cfg.ref_model, "--ref-model")
    names = {"semantic": cfg.semantic_embedder, "style": cfg.style_embedder}
    for metric in METRICS[cfg.deviation] if cfg.loss in ("ddpo", "dorpo") else []:
        check_embedder(names[metric], f"--{metric}-embedder")
    check_output_dir(cfg.output_dir)


def non_finite(step, sums, grad_norm, last_checkpoint):
    """The error for a step with a NaN or inf among its loss, gradient norm and metrics, or None."""
    bad = {k: v for k, v in {**sums, "grad_norm": grad_norm}.items() if not math.isfinite(v)}
    if not bad:
        return None
    return (f"error: step {step}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())}; stopped before its "
            f"update and checkpoint (last checkpoint: {last_checkpoint or 'none'}). Likely causes: a huge 'weight' in "
            "the data, --beta or --lr too large, or a model whose logits overflow")


def train(cfg):
    rank, world, device = setup_distributed(cfg)
    # 1. paths and data first: bad input fails here, before a model is loaded or anything is written
    check_paths(cfg)
    pairs = load_pairs(cfg.data, weight_field=cfg.weight_field)
    with output_lock(cfg.output_dir) if rank == 0 else contextlib.nullcontext():
        return train_locked(cfg, rank, world, device, pairs)


def train_locked(cfg, rank, world, device, pairs):
    if rank == 0 and (left := remove_temporaries(cfg.output_dir)):
        print0(f"removed what an interrupted run left in {cfg.output_dir}: {', '.join(left)}", flush=True)
    found = checkpoints(cfg.output_dir)
    if found and not cfg.resume:
        raise SystemExit(f"{cfg.output_dir} already holds {found[-1][1]}: pass --resume, or choose another --output-dir")
    resume_from = found[-1][1] if cfg.resume and found else None
    config = {**run_config(cfg), "world_size": world}  # the plan of steps depends on it (grad_accum x world)
    if resume_from:
        check_resumable(resume_from, config)
        state = load_state(resume_from)
    tokenizer = load_tokenizer(cfg.model)
    stats = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    print0(f"data: {stats['pairs']} pairs from {cfg.data}; truncated {stats['prompts_truncated']} prompts "
          f"(keep end, max {cfg.max_prompt_length}) and {stats['completions_truncated']} completions "
          f"(keep start, max total {cfg.max_length})", flush=True)
    weights = pair_weights(cfg, pairs)
    if cfg.loss in ("ddpo", "dorpo") and cfg.deviation == "none" and all(p.weight is None for p in pairs):
        print0(f"warning: no pair has a 'weight': every weight is 1 and {cfg.loss} equals {cfg.loss[1:]}", flush=True)

    # 2. models
    autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda") else None
    use_triton = {"auto": device.type == "cuda", "triton": True, "torch": False}[cfg.kernels]
    torch.manual_seed(cfg.seed)
    load_device = torch.device("cpu") if cfg.fsdp else device  # FSDP moves each rank's shard to the device
    policy = load_model(cfg.model if cfg.lora_r else resume_from or cfg.model, torch.float32, load_device)
    check_fusable(policy)
    disable_dropout(policy)
    if cfg.lora_r:
        wrapped = add_lora(policy, cfg.lora_targets.split(","), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        if resume_from:
            load_adapter(policy, resume_from)
        print0(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {len(wrapped)} layers: "
            f"{sum(p.numel() for p in policy.parameters() if p.requires_grad):,} trainable parameters")
    if cfg.lean:
        print0("lean activations: {} MLPs, {} RMSNorms".format(*use_lean(policy)))
    policy.train()
    if cfg.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            policy.activation_checkpointing_enable({"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    policy_logps = SequenceLogps(policy, use_triton)
    if cfg.fsdp:
        shard(policy_logps, device, world)
    params = [p for p in policy.parameters() if p.requires_grad]  # before any forward: under FSDP, the shards
    if cfg.packing:
        check_packing(cfg, policy_logps, pairs, tokenizer.pad_token_id, device)
    ref = None
    if cfg.loss in ("dpo", "ddpo") and cfg.lora_r and not cfg.ref_model:
        ref = Reference(policy_logps, lora=True)
    elif cfg.loss in ("dpo", "ddpo"):  # the reference is always the starting model, also when resuming
        # the policy's weight dtype (fp32) under the same autocast: the same model gives the same log-probs
        ref_model = load_model(cfg.ref_model or cfg.model, torch.float32, load_device)
        if cfg.packing:
            use_segment_attention(ref_model)
        disable_dropout(ref_model.eval().requires_grad_(False))
        ref_logps = SequenceLogps(ref_model, use_triton)
        if cfg.fsdp:
            shard(ref_logps, device, world)
        ref = Reference(ref_logps)
        if cfg.precompute_ref:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                ref.precompute(cfg, pairs, tokenizer.pad_token_id, device, autocast_dtype, save=rank == 0)

    deviation = InStepDeviation(cfg, pairs, device) if cfg.deviation != "none" and cfg.loss in ("ddpo", "dorpo") else None
    pair_prompt = deviation.pair_prompt if deviation else None
    if deviation:  # the in-step weights, known ahead: DORPO (released) takes their mean over the whole step
        weights = deviation.chosen_weights

    plan = optimizer_steps(len(pairs), cfg.batch_size, cfg.grad_accum * world, cfg.seed, cfg.epochs, cfg.max_steps,
                           pair_prompt)  # [(epoch position, [micro-batch of pair indices, ...]), ...]
    total_steps = len(plan)
    steps_per_epoch = sum(position <= 1 for position, _ in plan)  # of the first epoch, for the log
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one pass per tensor
    for group in optimizer.param_groups:  # the schedule's base, which LambdaLR reads when it starts at a resumed step
        group["initial_lr"] = cfg.lr

    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start_step = 0
    if resume_from:
        if cfg.fsdp:
            set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        if rank == 0:
            trim_metrics(metrics_path, start_step)
        print0(f"resumed from {resume_from} at step {start_step}", flush=True)
    elif rank == 0:
        open(metrics_path, "w").close()
    # the schedule's lambda for this run's total, from the resumed step on
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps), last_epoch=start_step - 1)
    if rank == 0:
        atomic_write(os.path.join(cfg.output_dir, "train_config.json"), json.dumps(config, indent=2))

    print0(f"training {cfg.loss} on {device}{f' x {world} ranks' if world > 1 else ''} ({'bf16 autocast' if autocast_dtype else 'fp32'}, "
          f"{'Triton' if use_triton else 'chunked PyTorch'} log-prob head): {total_steps} steps of up to "
          f"{cfg.batch_size * cfg.grad_accum * world} pairs ({steps_per_epoch} steps/epoch)", flush=True)
    path = found[-1][1] if found else None
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=cfg.loss, dynamic_ncols=True,
               disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        epoch, step_batches = plan[step]
        n_pairs = sum(len(b) for b in step_batches)
        weights_mean = weights[sum(step_batches, [])].mean().item()  # DORPO (released) over the whole step
        sums, used_weights = {}, []
        mine = step_batches[rank::world]
        if cfg.fsdp:  # FSDP's collectives need the same number of passes on every rank: a rank short of
            mine += [None] * (math.ceil(len(step_batches) / world) - len(mine))  # micro-batches runs one at weight 0
        for batch in mine:
            idle = batch is None
            batch = step_batches[0] if idle else batch
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                losses, chosen_w, metrics = step_losses(cfg, policy_logps, ref, batch, [pairs[j] for j in batch], weights[batch].to(device),
                                                        weights_mean, tokenizer.pad_token_id, device, use_triton,
                                                        deviation(batch) if deviation else None)
            (losses.sum() / n_pairs * (0.0 if idle else 1.0)).backward()  # sum over pairs / pairs in the step
            if idle:
                continue
            metrics["loss"] = losses.detach().sum()
            used_weights.append(chosen_w.float().cpu())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        if world > 1:
            if not cfg.fsdp:  # FSDP has already reduce-scattered the gradients in the backward
                all_reduce_grads(params)
            gathered = [None] * world
            dist.all_gather_object(gathered, (sums, used_weights))
            sums = {key: sum(s.get(key, 0.0) for s, _ in gathered) for key in set().union(*(s for s, _ in gathered))}
            used_weights = [w for _, ws in gathered for w in ws]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if (error := non_finite(step + 1, sums, grad_norm.item(), path)):
            raise SystemExit(error)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == total_steps):
            dt = time.perf_counter() - t0
            row = {"step": step + 1, "epoch": round(epoch, 4)}
            row.update({key: value / n_pairs for key, value in sums.items() if key != "tokens"})
            used_weights = torch.cat(used_weights)
            row.update({"weights/mean": used_weights.mean().item(), "weights/min": used_weights.min().item(),
                        "weights/max": used_weights.max().item(), "grad_norm": grad_norm.item(), "lr": lr,
                        "step_time_s": dt, "tokens_per_s": sums["tokens"] / dt, "peak_mem_gb": peak_memory_gb(device)})
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            bar.write(" | ".join([f"step {step + 1}/{total_steps}"] + [
                f"{key} {row[key]:.4g}" for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen",
                                                      "weights/mean", "lr", "step_time_s", "peak_mem_gb") if key in row]))
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == total_steps:
            path = os.path.join(cfg.output_dir, f"checkpoint-{step + 1}")
            model_state, optimizer_state = full_state(policy, optimizer) if cfg.fsdp else (None, optimizer.state_dict())
            if rank == 0:
                save_checkpoint(cfg, step + 1, policy, tokenizer, optimizer_state, scheduler, model_state)
            if world > 1:
                dist.barrier()
    print0(f"saved {path}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return path


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
