"""Set-up and collectives for torchrun: one process or many, data parallel or FSDP2.

    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --batch-size 2 --grad-accum 4
    torchrun --nproc_per_node 8 -m ddpo.train --data pairs.jsonl --loss ddpo --fsdp --model Qwen/Qwen2.5-7B-Instruct

Data parallel (`data_parallel`): every rank holds the whole model; torch's DistributedDataParallel sums the gradients
in buckets during the backward of an optimiser step's last micro-batch (`no_sync` before it). FSDP2
(`shard`): one unit per decoder layer plus a root unit around the whole log-prob call; gradients summed, not
averaged, so the loss scaling is that of one process. print0 prints on rank 0 only.
"""

import contextlib
import faulthandler
import gc
import math
import os
import resource

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ddpo.data import DataError
from ddpo.files import refusal, refused_at

EXIT_TIMEOUT = 120  # seconds a rank may take to end its process group before it is ended with its threads' stacks


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


def agree(world, read):
    """Run read(), a rank's checks and reading of its input, which returns (what it read, what every rank must share:
    the flags, the data's digest, the models' identities); returns what it read. Under torchrun the ranks exchange
    the outcome once, so a rank's error (a DataError or SystemExit: one line) or a shared part unlike rank 0's stops
    every rank together with one line, before any model loads: ranks whose data differ would train apart until
    their collectives desync and hang."""
    if world == 1:
        return read()[0]
    try:
        (result, shared), failure = read(), None
    except (DataError, SystemExit) as e:
        result, shared, failure = None, None, str(e)
    except OSError as e:  # a file system's refusal (files.refusal); anything else is a bug: its traceback
        if not refusal(e):
            raise
        result, shared, failure = None, None, refused_at(e)
    gathered = [None] * world
    dist.all_gather_object(gathered, (failure, shared))
    for rank, (error, _) in enumerate(gathered):
        if error:
            raise DataError(f"rank {rank}: {error}")
    first = gathered[0][1]
    for rank, (_, other) in enumerate(gathered):
        if (differ := [f"{key} {first.get(key)!r} on rank 0, {other.get(key)!r} on rank {rank}"
                       for key in {**first, **other} if first.get(key) != other.get(key)]):
            raise DataError(f"torchrun: the ranks read different inputs: {'; '.join(differ)}; give every rank the "
                            "same data, models and flags")
    return result


def shutdown_distributed(world):
    """End torchrun's process group (after a successful run; a failing rank just exits and torchrun stops the rest),
    once the modules that hold it are freed. The order matters: freed from DDP's reducer (C++, which keeps the GIL),
    the group's destructor joins gloo's worker threads while one of them may be waiting for the GIL to free a
    collective's tensor, and the rank hangs forever (seen about once in 4 two-rank runs). Freed by
    destroy_process_group instead, the destructor releases the GIL first. Should the teardown hang anyway, the rank
    is ended after EXIT_TIMEOUT seconds (exit code 1) with every thread's stack on stderr: faulthandler's timer runs
    without the GIL, so torchrun never waits forever."""
    if world > 1:
        faulthandler.dump_traceback_later(EXIT_TIMEOUT, exit=True)
        gc.collect()  # a DDP wrapper kept by a reference cycle would free its reducer later, holding the GIL
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


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
    # also the root: outside a pass, every parameter is a shard
    fully_shard(logps, mesh=mesh, reshard_after_forward=True)
    for unit in logps.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def full_state(policy, optimizer):
    """FSDP: gather the full weights and optimiser state (None: the weights alone) on rank 0's CPU (a collective:
    every rank calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(policy, options=options),
            optimizer and get_optimizer_state_dict(policy, optimizer, options=options))


def data_parallel(logps, device):
    """torch's DistributedDataParallel around the whole log-prob call (a SequenceLogps, so the fused head is inside):
    bucketed all-reduce overlapped with the backward. Gradients are summed over the ranks, not averaged: the loss is
    already divided by the pairs of the whole step."""
    ddp = DistributedDataParallel(logps, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=False)
    ddp.register_comm_hook(None, sum_gradients)
    return ddp


def sum_gradients(state, bucket):
    """DDP's default hook without its division by the world size."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def no_sync(module, last):
    """DDP accumulates micro-batches locally and all-reduces in the backward of the last; anything else syncs as it
    does (FSDP reduce-scatters in every backward)."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) and not last else contextlib.nullcontext()


def rank_share(step_batches, rank, world):
    """This rank's micro-batches of an optimiser step, padded with None to as many as every rank runs: the
    collectives of DDP and FSDP pair up passes, so a rank short of micro-batches runs one at weight 0."""
    mine = step_batches[rank::world]
    return mine + [None] * (math.ceil(len(step_batches) / world) - len(mine))


def gather_metrics(sums, used_weights, world):
    """Metric sums (summed) and chosen weights (concatenated) of every rank."""
    if world == 1:
        return sums, used_weights
    gathered = [None] * world
    dist.all_gather_object(gathered, (sums, used_weights))
    keys = dict.fromkeys(key for s, _ in gathered for key in s)
    return {key: sum(s.get(key, 0.0) for s, _ in gathered) for key in keys}, [w for _, ws in gathered for w in ws]
