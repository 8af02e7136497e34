"""Set-up and collectives for torchrun: one process or many, data parallel or FSDP2.

    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --batch-size 2 --grad-accum 4
    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --fsdp --model Qwen/Qwen2.5-7B-Instruct

Data parallel: every rank holds the whole model and gradients are summed with one all-reduce before the clip. FSDP2
(`shard`): one unit per decoder layer plus a root unit around the whole log-prob call; gradients summed, not
averaged, so the loss scaling is that of one process. print0 prints on rank 0 only.
"""

import os
import resource

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def print0(*args, **kwargs):
    """print on rank 0 (or without torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def setup_distributed(cfg):
    """(rank, world size, device): one process, or one of torchrun's (WORLD_SIZE, RANK, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        device = torch.device("cuda", local) if device.type == "cuda" and device.index is None else device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.fsdp and world == 1:
        raise SystemExit("--fsdp shards over the ranks of torchrun: launch with torchrun --nproc_per_node N (N > 1)")
    if cfg.fsdp and cfg.lora_r:
        raise SystemExit("--fsdp with --lora-r is not supported: LoRA trains a small part of the model, use plain "
                         "torchrun (data parallel) with --lora-r")
    return rank, world, device


def shard(logps, device, world):
    """FSDP2 over all ranks: one unit per decoder layer; the rest (embeddings, final norm, output layer) in the unit
    of `logps` (a SequenceLogps), gathered around the whole call including the fused head. Parameters are loaded on
    the CPU and each rank's shard moves to `device`. Gradients are summed over the ranks, not averaged: the loss is
    already divided by the pairs of the whole step, as in the data-parallel path."""
    mesh = init_device_mesh(device.type, (world,))
    layers = getattr(logps.model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SystemExit(f"--fsdp: {type(logps.model).__name__} has no decoder .layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(logps, mesh=mesh, reshard_after_forward=True)  # also the root: outside a pass, every parameter is a shard
    for unit in logps.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def full_state(policy, optimizer):
    """FSDP: gather the full weights and optimiser state on rank 0's CPU (a collective: every rank calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy, options=options), get_optimizer_state_dict(policy, optimizer, options=options)


def all_reduce_grads(params):
    """Sum every gradient over the ranks (a rank without a micro-batch contributes zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)
