"""ddpo.train's output directory: checkpoints (save, find, prune, resume state), its lock, and metrics on resume.

checkpoint-<step>/ holds the model (with --lora-r: the adapters, and merged weights), the tokenizer, the run's
train_config.json and trainer_state.pt: step, optimiser and scheduler state and the RNG states, all tensors and
plain types, so --resume reads it with torch.load(weights_only=True) and a crafted file cannot run code. A checkpoint
is written to .tmp-checkpoint-<random> and renamed into place; pruning keeps the newest --keep-checkpoints, and never
deletes the newest.

The lock: <output_dir>/.lock, created with O_CREAT | O_EXCL, holds "<pid> <host>" of the run that writes there and is
removed when it ends, also on errors. A lock whose pid is no longer running on this host is stale (the run was
killed) and is taken over with a message; any other lock refuses the run.
"""

import contextlib
import dataclasses
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from ddpo.data import DataError
from ddpo.files import atomic_write, hold_lock, remove_temporaries, torch_save, written
from ddpo.distributed import full_state, print0
from ddpo.lora import merged_copy, save_adapter
from ddpo.models import model_identity

LOCK = ".lock"
SAMPLES_DIR = "eval_samples"  # the evaluations' samples: step-<N>.jsonl (ddpo/monitor.py)
OWN_TEMPORARIES = r"checkpoint(?:-\d+)?|metrics\.jsonl|train_config\.json"  # what train writes atomically
# the flags that name a model: train_config.json records what each names (models.model_identity), which --resume
# compares instead of the name (the last: ddpo.online's)
MODELS = ("model", "ref_model", "semantic_embedder", "style_embedder", "base_model")
# what --resume may change: how long to train (the schedule then follows the new total), logging and saving, and
# how it runs (device, reference cache, kernels, memory savers), what is evaluated and where metrics go (they never
# touch the weights), the paths of the data and models (their content is compared); everything else must equal the
# checkpoint's
MAY_CHANGE = {"max_steps", "epochs", "log_every", "save_every", "save_only_model", "keep_checkpoints", "device",
              "precompute_ref", "resume", "output_dir", "data", "kernels", "fused_loss", "packing", "lean",
              "gradient_checkpointing", "merge_lora", "trust_remote_code", "eval_data", "eval_prompts", "eval_every",
              "eval_samples", "eval_max_new_tokens", "eval_quality", "report_to", "rounds", "prompts",
              *MODELS}  # the last two: online


PREFIX = "checkpoint-"


def checkpoint_path(output_dir, step):
    return os.path.join(output_dir, f"{PREFIX}{step}")


def checkpoints(output_dir):
    """[(step, path), ...] of the checkpoints in output_dir, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if not (name.startswith(PREFIX) and name[len(PREFIX):].isdigit()):
            continue
        path = os.path.join(output_dir, name)
        if not re.fullmatch(r"[0-9]+", name[len(PREFIX):]):  # "checkpoint-²": digits to str.isdigit, no step to int
            raise DataError(f"{path}: not a checkpoint name of ddpo.train (checkpoint-<step in 0-9>); remove or "
                            "rename it, or choose another --output-dir")
        if os.path.islink(path) or not os.path.isdir(path):
            raise DataError(f"{path}: is {'a link' if os.path.islink(path) else 'a file'}, and ddpo.train writes "
                            "checkpoints as directories of its own; remove it or choose another --output-dir")
        found.append((int(name[len(PREFIX):]), path))
    return sorted(found)


def run_config(cfg, data_sha256, world, models):
    """What train_config.json records: every flag, the digest of the data's content (its path may move), what each
    model flag the run loads (`models`) names (its files' digest, or a hub name; None for the others) and the world
    size (the plan of steps depends on it)."""
    flags = dataclasses.asdict(cfg)
    used = {name for name in models if flags.get(name) not in (None, "", "stylometric")}
    return {**flags, "data_sha256": data_sha256, "world_size": world,
            **{f"{name}_identity": model_identity(flags[name]) if name in used else None
               for name in MODELS if name in flags}}


def open_output_dir(cfg, rank, config):
    """Remove what a killed run left in cfg.output_dir; refuse a directory with a checkpoint unless --resume, and a
    checkpoint whose config (run_config's) differs from `config`. Returns (the newest checkpoint or None, its trainer
    state when resuming from it or None)."""
    check_own_outputs(cfg.output_dir)
    if rank == 0 and (left := remove_temporaries(cfg.output_dir, OWN_TEMPORARIES)):
        print0(f"removed what an interrupted run left in {cfg.output_dir}: {', '.join(left)}", flush=True)
    found = checkpoints(cfg.output_dir)
    if found and not cfg.resume:
        raise SystemExit(f"{cfg.output_dir} already holds {found[-1][1]}: "
                         "pass --resume, or choose another --output-dir")
    if not found or not cfg.resume:
        return None, None
    check_resumable(found[-1][1], config)
    return found[-1][1], load_state(found[-1][1])


def written_by_train(config_path):
    """Whether `config_path` is a train_config.json that ddpo.train wrote (a JSON object with its keys)."""
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and {"loss", "data_sha256", "output_dir"} <= config.keys()


def check_own_outputs(output_dir):
    """Outputs are never written through links the run did not make, nor over files it did not write: refuse a
    link in place of an output, and a metrics.jsonl without ddpo.train's train_config.json beside it."""
    for name in ("metrics.jsonl", "train_config.json", SAMPLES_DIR):
        path = os.path.join(output_dir, name)
        if os.path.islink(path):
            raise DataError(f"--output-dir {output_dir}: {name} is a link, and ddpo.train writes only files it "
                            "creates; remove it or choose another --output-dir")
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(metrics) and not written_by_train(os.path.join(output_dir, "train_config.json")):
        raise DataError(f"--output-dir {output_dir}: holds a metrics.jsonl that ddpo.train did not write (no "
                        "train_config.json of its own beside it); choose another --output-dir")


def check_resumable(checkpoint, config):
    """DataError naming every setting (outside MAY_CHANGE) in which `config` differs from the checkpoint's."""
    path = os.path.join(checkpoint, "train_config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    if not isinstance(saved, dict):
        raise DataError(f"{path}: not a train_config.json of ddpo.train; remove the checkpoint or start afresh")
    missing = sorted(config.keys() - saved.keys() - MAY_CHANGE)
    extra = sorted(saved.keys() - config.keys() - MAY_CHANGE)
    if missing or extra:  # a setting that cannot be compared is not taken as equal
        unlike = [f"lacks {', '.join(missing)}"] * bool(missing) + [f"has {', '.join(extra)}, unknown"] * bool(extra)
        raise DataError(f"--resume: {path} {' and '.join(unlike)}: written by another version or command; resume "
                        "with that one, or choose another --output-dir")
    differ = [f"{key} {saved[key]!r} there, {value!r} now" for key, value in config.items()
              if key not in MAY_CHANGE and saved[key] != value]
    if differ:
        raise DataError(f"--resume: {checkpoint} was trained with other settings: {'; '.join(differ)}; resume with "
                        "its settings or choose another --output-dir")


def rng_state():
    """Every RNG's state as tensors and plain types (what torch.load(weights_only=True) reads back)."""
    version, state, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": [version, torch.tensor(state, dtype=torch.int64), gauss],
           "numpy": [key, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng):
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state.tolist()), gauss))
    key, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((key, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_state(checkpoint):
    """trainer_state.pt of a checkpoint, read with weights_only=True: a pickled object that is not a tensor or a
    plain value is refused, never run."""
    path = os.path.join(checkpoint, "trainer_state.pt")
    if not os.path.exists(path) and os.path.exists(os.path.join(checkpoint, "train_config.json")):
        raise DataError(f"--resume: {checkpoint} holds the model only (saved with --save-only-model), not the "
                        f"optimiser state to continue from; train from it with --model {checkpoint}, or choose "
                        "another --output-dir")
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: refused: it holds pickled objects other than tensors and plain values "
                        "(not written by ddpo.train)") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise DataError(f"{path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not trainer_state(state):
        raise DataError(f"{path}: not a trainer state of ddpo.train (step, optimizer, scheduler and rng of their "
                        "types); remove the checkpoint to resume from an older one, or choose another --output-dir")
    return state


def trainer_state(state):
    """Whether a loaded trainer_state.pt has what save_checkpoint writes, of its types (rng_state's layout)."""
    if not (isinstance(state, dict) and type(state.get("step")) is int and state["step"] >= 0
            and isinstance(state.get("optimizer"), dict) and isinstance(state.get("scheduler"), dict)
            and isinstance(rng := state.get("rng"), dict)):
        return False
    python, numpy = rng.get("python"), rng.get("numpy")
    return (isinstance(python, list) and [type(x) for x in python[:2]] == [int, torch.Tensor] and len(python) == 3
            and isinstance(numpy, list) and [type(x) for x in numpy] == [str, torch.Tensor, int, int, float]
            and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8)


def save_checkpoint(cfg, step, policy, tokenizer, optimizer_state, scheduler, model_state=None):
    """model_state: the full weights when the policy is sharded (FSDP); None saves the policy's own."""
    final = checkpoint_path(cfg.output_dir, step)
    with written(final, directory=True) as tmp:
        write_checkpoint(cfg, step, tmp, policy, tokenizer, optimizer_state, scheduler, model_state)
        shutil.rmtree(final, ignore_errors=True)  # a killed run's checkpoint of this step, replaced by a whole one
    if cfg.keep_checkpoints > 0:
        older = checkpoints(cfg.output_dir)[:-1]  # never the newest
        for _, old in older[:len(older) + 1 - cfg.keep_checkpoints]:
            shutil.rmtree(old)
    return final


def write_checkpoint(cfg, step, tmp, policy, tokenizer, optimizer_state, scheduler, model_state):
    """A checkpoint's files, into the new directory tmp."""
    if cfg.lora_r:
        save_adapter(policy, tmp, {"base_model": cfg.model, "r": cfg.lora_r, "alpha": cfg.lora_alpha,
                                   "dropout": cfg.lora_dropout, "targets": cfg.lora_targets.split(",")})
        if cfg.merge_lora:
            merged_copy(policy).save_pretrained(tmp, safe_serialization=True)
    else:
        policy.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not cfg.save_only_model:
        torch_save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state()},
                   os.path.join(tmp, "trainer_state.pt"))
    shutil.copyfile(os.path.join(cfg.output_dir, "train_config.json"), os.path.join(tmp, "train_config.json"))
    mode = os.stat(tmp).st_mode & 0o666  # 0666 less the umask, what a new file gets (safetensors writes 0600)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), mode)


def save(cfg, step, policy, tokenizer, optimizer, scheduler, rank, world):
    """save_checkpoint on rank 0 (under --fsdp every rank first gathers the full state), then a barrier. Returns the
    checkpoint's path."""
    optimizer = None if cfg.save_only_model else optimizer
    model_state, optimizer_state = (full_state(policy, optimizer) if cfg.fsdp
                                    else (None, optimizer and optimizer.state_dict()))
    if rank == 0:
        save_checkpoint(cfg, step, policy, tokenizer, optimizer_state, scheduler, model_state)
    if world > 1:
        dist.barrier()
    return checkpoint_path(cfg.output_dir, step)


def restore(state, policy, optimizer, fsdp, metrics_path=None):
    """Optimiser state and RNG from a checkpoint's trainer state; metrics.jsonl (when given: rank 0) trimmed to its
    step. Returns the step."""
    if fsdp:
        set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if metrics_path:
        trim_metrics(metrics_path, state["step"])
    return state["step"]


def trim_metrics(path, last_step):
    """On resume, drop metric lines logged after the checkpoint (they will be logged again), and a torn last line
    (killed mid-write: no newline). Any other line that is not a metrics row is an error naming file:line."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    kept = []
    for lineno, raw in enumerate(data[:data.rfind(b"\n") + 1].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (ValueError, RecursionError):  # also invalid UTF-8
            row = None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise DataError(f"{path}:{lineno}: not a metrics line of ddpo.train; remove it to resume")
        if row["step"] <= last_step:
            kept.append(raw.decode() + "\n")
    atomic_write(path, "".join(kept))


@contextlib.contextmanager
def output_lock(output_dir):
    """Hold <output_dir>/.lock around the body (module docstring). Creates output_dir, and removes it again if the
    run leaves it empty."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    try:
        with hold_lock(os.path.join(output_dir, LOCK), f"--output-dir {output_dir}"):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)  # only if empty
