"""Preference tuning in one plain loop: DPO, DDPO, ORPO, DORPO, and IPO, hinge, robust and conservative DPO, SimPO,
RPO and SFT, each with its deviation-weighted twin (dd-ipo, dd-hinge, dd-robust, dd-cdpo, dd-simpo, dd-rpo, dd-sft).

    python -m ddpo.train --data pairs.jsonl --loss ddpo --output-dir runs/ddpo
    python -m ddpo.train --data pairs.jsonl --loss dd-ipo --deviation both \
        --output-dir runs/dd-ipo   # weights from the pools
    python -m ddpo.train --data pairs.jsonl --loss simpo --beta 2.0 --simpo-gamma 0.5 --output-dir runs/simpo
    python -m ddpo.train --data pairs.jsonl --loss dorpo --dorpo-form per-example \
        --model HuggingFaceTB/SmolLM2-135M-Instruct
    python -m ddpo.train --data pairs.jsonl --output-dir runs/ddpo --resume      # continue from the newest checkpoint
    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --batch-size 2 --grad-accum 4
    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --fsdp --model Qwen/Qwen2.5-7B-Instruct

Under torchrun (CUDA: nccl, CPU: gloo) every rank holds the whole model inside torch's DistributedDataParallel; each
optimiser step's micro-batches are dealt out to the ranks, which accumulate locally and sum their gradients in
buckets during the backward of their last micro-batch (ddpo/distributed.py): equal to one process running all the
micro-batches (tested to 1e-5). With --fsdp the ranks hold shards instead (FSDP2: parameters, gradients and
optimiser state), gradients are reduce-scattered in the backward, and the arithmetic is the same (tested to 1e-5,
with resume). Rank 0 logs and saves; metrics are gathered from all ranks. Before any model loads the ranks compare
their flags, data digests and models, and a rank's bad input stops all of them (distributed.agree). Global batch =
batch_size x grad_accum x world size.

One optimiser step = grad_accum micro-batches of batch_size pairs. Each micro-batch runs the policy once over
[chosen; rejected] (packed in one row, each pair's prompt once where segment attention runs; --no-packing:
right-padded rows), gathers the hidden states at completion positions only, and turns them into
log-probs with the fused head (kernels/logprobs.py: Triton on CUDA, chunked PyTorch on CPU; never a (B, T, V)
tensor). The losses with a reference (DPO, IPO, hinge, robust, cDPO, RPO and their twins) take reference log-probs
from a frozen copy of the starting model in the same layout (ddpo/reference.py). The objective of --loss and what it
needs come from the table ddpo.losses.LOSSES; a weighted loss (ddpo, dorpo, dd-*) multiplies each pair's loss by its
chosen weight, computed once before training: the data's 'weight' (--weight-field), or with --deviation from the
embeddings of each prompt's pool (ddpo/step.py: chosen_weights). The step itself is ddpo/step.py's. Every loss is
sum(per-pair losses) / (pairs in the step), so accumulation is exact. Dropout is off. With --fused-loss (default)
the head computes each group of pairs' loss and its gradients in its forward (the logits once, not again in the
backward); --no-fused-loss runs the head and then the loss, the same numbers (tested).

Outputs in --output-dir: checkpoint-<step>/ (Hugging Face model + tokenizer, trainer_state.pt with optimiser,
scheduler, step and RNG unless --save-only-model, train_config.json), metrics.jsonl (one line per log step) and
train_config.json (every flag and the sha256 of the data). Checkpoints are written to a temporary directory and
renamed into place (ddpo/checkpoint.py); a run holds <output_dir>/.lock while it writes there, so a second run into
the same directory is refused, and removes the temporaries a killed run left there when it starts. With
--eval-data / --eval-prompts, every --eval-every steps and at the last an evaluation row follows the step's row
(held-out pairs under the training objective, the diversity and quality of sampled responses in eval_samples/;
ddpo/monitor.py), and --report-to tensorboard|wandb sends every row there too.

Flags are checked before anything loads: numeric ranges at parse time, then model paths, the output directory and
the data. A step whose loss, gradient norm or any logged metric is not finite (NaN or inf: a huge 'weight' in the
data, a --beta or --lr too large, a model that overflows) stops the run with an error naming the step, before the
optimiser step and before any checkpoint of it, so no NaN reaches the weights or metrics.jsonl.

--resume continues from the newest checkpoint with its weights, optimiser state, RNG and step. It refuses flags
that differ from the checkpoint's train_config.json (loss, data content, beta, what the model is, LoRA, seed, ...:
the error lists them; a setting the checkpoint's config lacks is refused too) except checkpoint.MAY_CHANGE:
--max-steps / --epochs (the schedule's lambda then uses the new total from the resumed step on), logging and saving
cadence, --keep-checkpoints, --device, --precompute-ref and other ways to run the same arithmetic.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ddpo.checkpoint import open_output_dir, output_lock, restore, run_config
from ddpo.config import add_config_args, flag, in_range
from ddpo.data import DataError, load_pairs, optimizer_steps, tokenize_pairs
from ddpo.files import atomic_write, check_output_dir, one_line_errors
from ddpo.distributed import agree, data_parallel, print0, setup_distributed, shutdown_distributed
from ddpo.embedders import DEFAULT_EMBEDDERS, check_embedder
from ddpo.losses import LOSSES
from ddpo.malloc import keep_freed_memory
from ddpo.models import (DEFAULT_MODEL, autocast_context, autocast_dtype, check_causal_lm, check_vocabulary,
                         load_policy, load_tokenizer)
from ddpo.monitor import Monitor, Reporter, check_flags, read_held_out, report_targets
from ddpo.reference import check_packing, load_reference
from ddpo.sources import PAIR_FIELDS, field_map
from ddpo.step import PRINTED, chosen_weights, embedders, evaluate_and_save, log_row, update


@dataclass
class TrainConfig:
    data: str = flag("", "pairs: JSONL or parquet (file or directory), save_to_disk directory or Hub ORG/NAME[:split]")
    model: str = flag(DEFAULT_MODEL, "hub name, local directory or packaged:<name>")
    ref_model: str = flag("", "reference of the losses that have one (default: --model, frozen)")
    output_dir: str = flag("runs/train", "checkpoints, metrics.jsonl, train_config.json")
    loss: str = flag("ddpo", "a loss of ddpo.losses.LOSSES; ddpo, dorpo, dd-<loss>: weighted by the chosen weight "
                     "(README: Losses)", choices=list(LOSSES))
    beta: float = flag(0.1, "DPO's inverse temperature; IPO's tau; SimPO's reward scale (paper: 0.1)",
                       type=in_range(float, 0, above=True))
    orpo_lambda: float = flag(0.25, "weight of the ORPO/DORPO odds-ratio term", type=in_range(float, 0))
    dorpo_form: str = flag("released", "released: mean(w) NLL + lambda mean(-logsigmoid(w Delta)); "
                           "per-example: mean(w (NLL + lambda L_OR))", choices=["released", "per-example"])
    label_smoothing: float = flag(0.1, "robust, cdpo: probability that a preference is flipped (TRL: 0.1)",
                                  type=in_range(float, 0, 0.5, below=True))
    simpo_gamma: float = flag(0.5, "simpo: target reward margin gamma (TRL's default)", type=in_range(float, 0))
    rpo_alpha: float = flag(1.0, "rpo: weight of the chosen NLL per token (RPO paper: 1)", type=in_range(float, 0))
    deviation: str = flag("none", "chosen weights: none = the data's weight field; else computed once from the pools' "
                          "embeddings", choices=["none", "semantic", "style", "both"])
    semantic_embedder: str = flag(DEFAULT_EMBEDDERS["semantic"], "for --deviation semantic|both")
    style_embedder: str = flag(DEFAULT_EMBEDDERS["style"], "for --deviation style|both")
    weight_field: str = flag("weight", "the data's field of each pair's weight (--deviation none); "
                             "required under another name")
    prompt_field: str = flag("prompt", "the data's column of the prompt (--data, --eval-data, --eval-prompts)")
    chosen_field: str = flag("chosen", "the data's column of the chosen response")
    rejected_field: str = flag("rejected", "the data's column of the rejected response")
    min_weight: float = flag(0.0, "clamp chosen weights from below, e.g. 0.2 (paper ablation)", type=in_range(float, 0))
    lr: float = flag(5e-6, "peak learning rate (paper: 5e-6)", type=in_range(float, 0, above=True))
    weight_decay: float = flag(0.0, "AdamW weight decay", type=in_range(float, 0))
    warmup_steps: int = flag(0, "linear warm-up steps", type=in_range(int, 0))
    schedule: str = flag("linear", "decay after warm-up", choices=["linear", "cosine", "constant"])
    max_grad_norm: float = flag(1.0, "gradient clipping (0 = off)", type=in_range(float, 0))
    epochs: float = flag(3.0, "passes over the pairs (paper: 3); ignored if max_steps > 0",
                        type=in_range(float, 0, above=True))
    max_steps: int = flag(0, "optimiser steps; 0 = derive from epochs", type=in_range(int, 0))
    batch_size: int = flag(2, "pairs per micro-batch", type=in_range(int, 1))
    grad_accum: int = flag(1, "micro-batches per optimiser step", type=in_range(int, 1))
    max_length: int = flag(-1, "max prompt+completion tokens (0 = off; -1 = released: 512 for orpo/dorpo, else off)",
                          type=in_range(int, -1))
    max_prompt_length: int = flag(-1, "max prompt tokens, keeping the end (0 = off; -1 = released: 128 for orpo/dorpo)",
                                 type=in_range(int, -1))
    seed: int = flag(42, "seed of data order and initialisation", type=in_range(int, 0, 2**32 - 1))
    dtype: str = flag("auto", "auto: bf16 autocast where bf16 matmuls are native (CUDA, AVX512-BF16, AMX), else fp32",
                      choices=["auto", "float32", "bfloat16"])
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    packing: bool = flag(True, "padding-free micro-batches: sequences packed in one row")
    precompute_ref: bool = flag(False, "reference log-probs in one pass before training, cached on disk")
    fsdp: bool = flag(False, "under torchrun: shard the model and optimiser over the ranks (FSDP2; full fine-tuning)")
    lean: bool = flag(True, "policy MLPs and RMSNorms save fewer activations (ddpo/lean.py; same arithmetic)")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward")
    fused_loss: bool = flag(True, "the loss computed inside the log-prob head (3 matmuls instead of 4)")
    lora_r: int = flag(0, "LoRA rank (0 = full fine-tuning; paper: 128); the reference: adapters off",
                      type=in_range(int, 0))
    lora_alpha: float = flag(256.0, "LoRA alpha (scale alpha / r)", type=in_range(float, 0, above=True))
    lora_dropout: float = flag(0.0, "dropout on the LoRA input", type=in_range(float, 0, 1, below=True))
    lora_targets: str = flag("q_proj,v_proj", "comma-separated nn.Linear names to adapt")
    merge_lora: bool = flag(True, "also save merged weights (transformers-loadable) in every LoRA checkpoint")
    kernels: str = flag("auto", "log-prob head: auto (Triton on CUDA), triton, torch (chunked)",
                        choices=["auto", "triton", "torch"])
    log_every: int = flag(1, "log every N steps", type=in_range(int, 1))
    save_every: int = flag(0, "checkpoint every N steps (0 = only at the end)", type=in_range(int, 0))
    save_only_model: bool = flag(False, "checkpoints without trainer_state.pt: smaller, but --resume refuses them")
    keep_checkpoints: int = flag(2, "checkpoints kept, the newest always (0 = all)", type=in_range(int, 0))
    resume: bool = flag(False, "continue from the newest checkpoint in output_dir, with its settings")
    trust_remote_code: bool = flag(False, "run the embedders' own code (e.g. jina-embeddings-v3); only code you trust")
    # evaluation and reporting (ddpo/monitor.py)
    eval_data: str = flag("", "held-out pairs: the objective on them at every evaluation (eval_loss, eval_rewards/*)")
    eval_prompts: str = flag("", "held-out prompts: samples and ddpo.evaluate's metrics at every evaluation")
    eval_every: int = flag(0, "evaluate every N steps and at the last (0 = at the last only)", type=in_range(int, 0))
    eval_samples: int = flag(4, "responses per --eval-prompts prompt (2+: diversity)", type=in_range(int, 2))
    eval_max_new_tokens: int = flag(64, "tokens per sampled response", type=in_range(int, 1))
    eval_quality: str = flag("proxy", "quality of the samples: proxy or reward-model:PATH")
    report_to: str = flag("none", "also send metrics to: none, tensorboard, wandb or tensorboard,wandb",
                          type=report_targets)


GROUPS = {  # headers of --help
    "objective": ["loss", "beta", "orpo_lambda", "dorpo_form", "label_smoothing", "simpo_gamma", "rpo_alpha",
                  "deviation", "semantic_embedder", "style_embedder", "trust_remote_code", "weight_field",
                  "min_weight"],
    "data columns": ["prompt_field", "chosen_field", "rejected_field"],
    "optimisation": ["lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm", "epochs", "max_steps",
                     "batch_size", "grad_accum", "seed"],
    "sequences": ["max_length", "max_prompt_length", "packing"],
    "speed and memory": ["dtype", "device", "kernels", "fused_loss", "precompute_ref", "lean", "gradient_checkpointing",
                         "fsdp"],
    "LoRA": ["lora_r", "lora_alpha", "lora_dropout", "lora_targets", "merge_lora"],
    "checkpoints and logs": ["log_every", "save_every", "save_only_model", "keep_checkpoints", "resume"],
    "evaluation and reporting": ["eval_data", "eval_prompts", "eval_every", "eval_samples", "eval_max_new_tokens",
                                 "eval_quality", "report_to"],
}


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cfg = TrainConfig(**vars(add_config_args(parser, TrainConfig, GROUPS).parse_args(argv)))
    if not cfg.data:
        parser.error("--data is required")
    max_length, max_prompt_length = LOSSES[cfg.loss].truncation  # -1: as the released code truncated this loss
    cfg.max_length = max_length if cfg.max_length == -1 else cfg.max_length
    cfg.max_prompt_length = max_prompt_length if cfg.max_prompt_length == -1 else cfg.max_prompt_length
    if cfg.max_length and cfg.max_prompt_length >= cfg.max_length:
        parser.error(f"--max-prompt-length ({cfg.max_prompt_length}) must be below --max-length ({cfg.max_length})")
    check_device(parser, cfg)
    check_flags(parser, cfg, argv)
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


def check_paths(cfg):
    """Model and embedder paths and the output directory, before anything loads or is written. Returns the model's
    config (None: not readable before loading)."""
    config = check_causal_lm(cfg.model)
    if cfg.ref_model:
        check_vocabulary(config, check_causal_lm(cfg.ref_model, "--ref-model"), cfg.ref_model, "--ref-model")
    for metric, name in embedders(cfg).items():
        check_embedder(name, f"--{metric}-embedder")
    check_output_dir(cfg.output_dir)
    return config


def arithmetic_models(cfg):
    """The model flags whose content the updates depend on, which --resume compares by content: the policy, its
    reference, online's base model and the embedders of --deviation (the evaluations' embedders may change)."""
    return {"model", "ref_model", "base_model", *(f"{metric}_embedder" for metric in embedders(cfg))}


def read_inputs(cfg, world):
    """The flags' paths checked and the data and held-out data read, each file once (a FIFO can be read once only):
    ((pairs, held-out data, the run's config), what every rank must share: the config and the held-out digest)."""
    check_paths(cfg)
    data, held_out_data = hashlib.sha256(), hashlib.sha256()
    pairs = load_pairs(cfg.data, weight_field=cfg.weight_field, fields=field_map(cfg, PAIR_FIELDS), digest=data)
    held_out = read_held_out(cfg, held_out_data)  # --eval-data, --eval-prompts
    config = run_config(cfg, data.hexdigest(), world, arithmetic_models(cfg))
    return (pairs, held_out, config), {**config, "held_out_sha256": held_out_data.hexdigest()}


def train(cfg):
    rank, world, device = setup_distributed(cfg)
    try:
        # 1. paths and data first: bad input fails here (on every rank together), before a model is loaded or
        # anything is written
        pairs, held_out, config = agree(world, lambda: read_inputs(cfg, world))
        with output_lock(cfg.output_dir) if rank == 0 else contextlib.nullcontext():
            return train_locked(cfg, rank, world, device, pairs, held_out, config)
    except BaseException as e:  # under torchrun a stop (a non-finite step, bad data) keeps train_locked's frame, and
        if world > 1:  # the DDP wrapper in it, alive in its traceback: its locals are freed here (one process keeps
            traceback.clear_frames(e.__traceback__)  # them for a debugger)
        raise
    finally:
        shutdown_distributed(world)  # once train_locked's DDP wrapper is freed


def train_locked(cfg, rank, world, device, pairs, held_out, config):
    # 2. the output directory: a checkpoint there is resumed from (--resume) or refused
    last_checkpoint, state = open_output_dir(cfg, rank, config)
    resume_from = last_checkpoint if state else None

    # 3. tokens, weights, models
    tokenizer = load_tokenizer(cfg.model)
    stats = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length, LOSSES[cfg.loss].orpo_rule)
    print0(f"data: {stats['pairs']} pairs from {cfg.data}; truncated {stats['prompts_truncated']} prompts "
           f"(keep end, max {cfg.max_prompt_length}) and {stats['completions_truncated']} completions "
           f"(keep start, max total {cfg.max_length}"
           f"{'; the released ORPO rule' if LOSSES[cfg.loss].orpo_rule else ''})", flush=True)
    weights = chosen_weights(cfg, pairs)  # once: fixed data, frozen embedders
    if LOSSES[cfg.loss].weighted and cfg.deviation == "none" and all(p.weight is None for p in pairs):
        print0(f"warning: no pair has a 'weight': every weight is 1 and {cfg.loss} equals its unweighted loss",
               flush=True)
    if cfg.deviation != "none" and not LOSSES[cfg.loss].weighted:
        print0(f"warning: --deviation {cfg.deviation} is ignored: {cfg.loss} takes no weights (its weighted twin does)",
               flush=True)
    amp_dtype = autocast_dtype(cfg.dtype, device)  # None: fp32
    autocast = autocast_context(device, amp_dtype)
    torch.manual_seed(cfg.seed)
    policy, policy_logps, params = load_policy(cfg, device, world, resume_from)
    ref = load_reference(cfg, policy_logps, device, world) if LOSSES[cfg.loss].reference else None
    if cfg.packing:
        check_packing(cfg, policy_logps, ref, pairs, tokenizer.pad_token_id, device, LOSSES[cfg.loss].rejected)
    monitor = Monitor(cfg, held_out, rank, world, device, tokenizer, policy, policy_logps, ref, amp_dtype)
    if ref and cfg.precompute_ref:
        with autocast():
            ref.precompute(cfg, pairs, tokenizer.pad_token_id, device, amp_dtype, save=rank == 0)
    forward = data_parallel(policy_logps, device) if world > 1 and not cfg.fsdp else policy_logps

    # 4. the plan of steps, optimiser, schedule; resume
    # [(epoch position, [micro-batch of pair indices])]
    plan = optimizer_steps(len(pairs), cfg.batch_size, cfg.grad_accum * world, cfg.seed, cfg.epochs, cfg.max_steps)
    total_steps = len(plan)
    if not total_steps:
        raise DataError(f"--epochs {cfg.epochs:g}: {len(pairs)} pairs in steps of "
                        f"{cfg.batch_size * cfg.grad_accum * world} make no optimiser step; "
                        "raise --epochs or set --max-steps")
    if state and state["step"] > total_steps:  # nothing to train, and the checkpoint's run is longer than asked
        raise DataError(f"--max-steps/--epochs: the plan has {total_steps} steps, but {resume_from} is at step "
                        f"{state['step']}; ask for more steps to resume it")
    steps_per_epoch = sum(position <= 1 for position, _ in plan)  # of the first epoch, for the log
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one pass per tensor
    for group in optimizer.param_groups:  # the schedule's base, which LambdaLR reads when it starts at a resumed step
        group["initial_lr"] = cfg.lr
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start_step = restore(state, policy, optimizer, cfg.fsdp, metrics_path if rank == 0 else None) if state else 0
    if state:
        print0(f"resumed from {resume_from} at step {start_step}", flush=True)
    elif rank == 0:
        open(metrics_path, "w").close()
    # the schedule's lambda for this run's total, from the resumed step on
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps), last_epoch=start_step - 1)
    if rank == 0:
        atomic_write(os.path.join(cfg.output_dir, "train_config.json"), json.dumps(config, indent=2))
    reporter = Reporter(cfg, start_step, tqdm.write) if rank == 0 else None  # metrics.jsonl, --report-to

    # 5. the loop: each rank runs its share of the step's micro-batches; gradients summed over ranks; clip, update
    print0(f"training {cfg.loss} on {device}{f' x {world} ranks' if world > 1 else ''} "
           f"({'bf16 autocast' if amp_dtype else 'fp32'}, {'Triton' if policy_logps.use_triton else 'chunked PyTorch'} "
           f"log-prob head): {total_steps} steps of up to {cfg.batch_size * cfg.grad_accum * world} pairs "
           f"({steps_per_epoch} steps/epoch)", flush=True)
    path = last_checkpoint
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=cfg.loss, dynamic_ncols=True,
               disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        epoch, step_batches = plan[step]
        # every rank's micro-batches, gradients summed over ranks, clipped; a non-finite step stops before its update
        sums, used_weights, grad_norm, lr = update(cfg, forward, ref, pairs, weights, step_batches, rank, world,
                                                   autocast, device, tokenizer.pad_token_id, params, optimizer,
                                                   scheduler, step + 1, path)
        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == total_steps):
            n_pairs = sum(len(b) for b in step_batches)
            row = {"step": step + 1, "epoch": round(epoch, 4),
                   **log_row(sums, n_pairs, used_weights, grad_norm, lr, time.perf_counter() - t0, device)}
            reporter.log(row, f"step {step + 1}/{total_steps} | "
                         + " | ".join(f"{key} {row[key]:.4g}" for key in PRINTED if key in row))
        path = evaluate_and_save(cfg, step + 1, total_steps, epoch, monitor, reporter, path, policy, tokenizer,
                                 optimizer, scheduler, params, rank, world, device)
    print0(f"saved {path}", flush=True)
    if reporter:
        reporter.close()
    return path


def main(argv=None, parse=parse_args, run=train):
    """The command (ddpo.online's too: its parse and run): a DataError is one line."""
    cfg = parse(argv)
    keep_freed_memory()
    one_line_errors(run, cfg)


if __name__ == "__main__":
    main()
