"""The whole method, offline, end to end: sample -> score -> weighted pairs -> DPO and DDPO -> sample -> evaluate.

    python -m ddpo.pipeline                          # the default run on the packaged models (2 CPU cores: ~3.5 min)
    python -m ddpo.pipeline --quick --work-dir /tmp/p # a minute-long smoke run
    python -m ddpo.pipeline --model HuggingFaceTB/SmolLM2-1.7B-Instruct --train-prompts 130 --eval-prompts 32 --n 8

1. the starting model writes --n stories for each of the first --train-prompts prompts of ddpo/data/prompts_train.jsonl
2. ddpo.prepare scores them (offline proxy), embeds them (packaged all-MiniLM-L6-v2 + the stylometric profile) and
   pairs them (released gap rule), each pair weighted by the deviation of its chosen story
3. ddpo.train trains DPO and DDPO from the same start, same pairs, seed and steps; every --monitor-every steps and
   at the last it samples 4 stories of 48 tokens for each of the first --monitor-prompts held-out prompts and logs
   their diversity and quality in <arm>/metrics.jsonl (ddpo/monitor.py; about 7% of the default run's time)
4. both write --n stories for each of the first --eval-prompts held-out prompts of ddpo/data/prompts_eval.jsonl
5. ddpo.evaluate prints the comparison table, DDPO's paired differences to DPO, and writes the plot; ddpo.curves
   draws both runs' training curves and sampled trajectories into <work-dir>/eval/curves.png
Every stage writes into --work-dir and is skipped when its output is already there, so a stopped run resumes.
Checkpoints hold the model only (ddpo.train --save-only-model; --train-flags=--no-save-only-model keeps the
optimiser state): to train the arms longer, use another --work-dir.
experiments/ builds its comparisons from the same functions (`run_arms`).
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from importlib import resources

from ddpo import curves, evaluate, generate, prepare
from ddpo import train as trainer
from ddpo.checkpoint import checkpoint_path
from ddpo.config import add_config_args, flag, given, in_range
from ddpo.files import atomic_write, check_output_dir, one_line_errors
from ddpo.embedders import DEFAULT_EMBEDDERS
from ddpo.losses import LOSSES
from ddpo.malloc import keep_freed_memory
from ddpo.models import DEFAULT_MODEL


MONITOR = {"samples": 4, "max_new_tokens": 48}  # of the evaluations during training: cheap enough to leave on



@dataclass
class PipelineConfig:
    work_dir: str = flag("runs/pipeline", "every stage's output; a stage whose output is there is skipped")
    model: str = flag(DEFAULT_MODEL, "start model: hub name, local directory or packaged:<name>")
    train_prompts: int = flag(24, "first prompts of ddpo/data/prompts_train.jsonl (130) to sample pools for",
                              type=in_range(int, 1))
    eval_prompts: int = flag(12, "first held-out prompts of ddpo/data/prompts_eval.jsonl (32)", type=in_range(int, 2))
    n: int = flag(4, "responses per training prompt (its pool)", type=in_range(int, 2))
    eval_n: int = flag(0, "samples per held-out prompt (0 = --n)", type=in_range(int, 0))
    max_new_tokens: int = flag(100, "tokens per sampled response", type=in_range(int, 1))
    steps: int = flag(10, "optimiser steps of every arm", type=in_range(int, 1))
    batch_size: int = flag(4, "pairs per step", type=in_range(int, 1))
    lr: float = flag(1e-5, "peak learning rate", type=in_range(float, 0, above=True))
    beta: float = flag(0.1, "DPO/DDPO beta", type=in_range(float, 0, above=True))
    gap: float = flag(1.0, "gap pairing: minimum proxy-score gap before falling back", type=in_range(float, 0))
    semantic_embedder: str = flag(DEFAULT_EMBEDDERS["semantic"], "semantic embedder of weights and evaluation")
    trust_remote_code: bool = flag(False, "run the embedders' own code (e.g. jinaai/jina-embeddings-v3)")
    dtype: str = flag("auto", "--dtype of sampling and training: auto is bf16 where native, else fp32",
                      choices=["auto", "float32", "bfloat16"])
    train_flags: str = flag("", 'extra ddpo.train flags for every arm, e.g. "--lora-r 128 --gradient-checkpointing"')
    monitor_prompts: int = flag(2, f"held-out prompts sampled during training ({MONITOR['samples']} samples each; "
                                "0 = off)", type=in_range(int, 0))
    monitor_every: int = flag(5, "steps between those evaluations (and at the last step)", type=in_range(int, 1))
    seed: int = flag(0, "seed of sampling, pairing and training", type=in_range(int, 0))
    quick: bool = flag(False, "tiny sizes for a smoke test (every size not given on the command line)")


GROUPS = {"sizes": ["train_prompts", "eval_prompts", "n", "eval_n", "max_new_tokens", "quick"],
          "training": ["steps", "batch_size", "lr", "beta", "gap", "train_flags", "seed", "monitor_prompts",
                       "monitor_every"],
          "models": ["model", "semantic_embedder", "trust_remote_code", "dtype"]}
OWN_TRAIN_FLAGS = {"--model": "--model", "--data": None, "--output-dir": "--work-dir", "--loss": None,
                   "--max-steps": "--steps", "--batch-size": "--batch-size", "--lr": "--lr", "--beta": "--beta",
                   "--seed": "--seed", "--dtype": "--dtype", "--resume": None}  # ddpo.train flags train_arm sets
QUICK = dict(train_prompts=3, eval_prompts=2, n=3, max_new_tokens=24, steps=2, batch_size=2)


@dataclass
class Arm:
    """One trained model: a loss, the ddpo.prepare flags of its pairs and extra ddpo.train flags."""
    loss: str
    prepare: list = field(default_factory=lambda: ["--deviation", "both"])
    train: list = field(default_factory=list)


def packaged_prompts(split):
    return str(resources.files("ddpo") / "data" / f"prompts_{split}.jsonl")


def prompt_lines(split):
    """The JSONL lines of a packaged prompt split (train: 130, eval: 32)."""
    with open(packaged_prompts(split)) as f:
        return [line for line in f if line.strip()]


def first_prompts(split, count, path):
    lines = prompt_lines(split)
    if count > len(lines):
        raise SystemExit(f"error: --{split}-prompts {count}: ddpo/data/prompts_{split}.jsonl holds {len(lines)}")
    lines = lines[:count]
    if not os.path.exists(path):
        atomic_write(path, "".join(lines))
    return path


def sample(cfg, model, prompts, output, n=None, extra=()):
    generate.main(["--model", model, "--prompts", prompts, "--output", output, "--n", str(n or cfg.n),
                   "--max-new-tokens", str(cfg.max_new_tokens), "--seed", str(cfg.seed), "--dtype", cfg.dtype, *extra])
    return output


def remote_code(cfg):
    return ["--trust-remote-code"] if cfg.trust_remote_code else []


def make_pairs(cfg, responses, flags, output):
    if not os.path.exists(output):
        prepare.prepare(prepare.parse_args(["--input", responses, "--output", output, "--score", "proxy",
                                            "--gap", str(cfg.gap), "--seed", str(cfg.seed),
                                            "--semantic-embedder", cfg.semantic_embedder, *remote_code(cfg), *flags]))
    return output


def monitor_flags(cfg):
    """ddpo.train's flags of the sampled evaluations during training (none with --monitor-prompts 0)."""
    if not cfg.monitor_prompts:
        return []
    prompts = first_prompts("eval", cfg.monitor_prompts, os.path.join(cfg.work_dir, "prompts_monitor.jsonl"))
    return ["--eval-prompts", prompts, "--eval-every", str(cfg.monitor_every), "--eval-samples",
            str(MONITOR["samples"]), "--eval-max-new-tokens", str(MONITOR["max_new_tokens"]), "--semantic-embedder",
            cfg.semantic_embedder, *remote_code(cfg)]


def train_arm(cfg, arm, pairs, output_dir):
    final = checkpoint_path(output_dir, cfg.steps)
    if not os.path.exists(final):
        trainer.train(trainer.parse_args([
            "--model", cfg.model, "--data", pairs, "--output-dir", output_dir, "--loss", arm.loss,
            "--max-steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
            "--beta", str(cfg.beta), "--seed", str(cfg.seed), "--save-every", "0", "--keep-checkpoints", "1",
            "--save-only-model",  # the final checkpoint is sampled from, never resumed
            "--dtype", cfg.dtype,
            *(["--precompute-ref"] if LOSSES[arm.loss].reference else []),
            *(["--resume"] if os.path.isdir(output_dir) else []), *monitor_flags(cfg), *cfg.train_flags.split(),
            *arm.train]))
    return final


def run_arms(cfg, arms, responses=None, eval_prompts=None, include_start=False, baseline="dpo"):
    """Train every arm from the same start on pairs built from the same responses, sample, evaluate (with paired
    differences to the arm named baseline, when there is one).

    Returns the evaluation results {name: metrics}; outputs under cfg.work_dir."""
    keep_freed_memory()  # every stage runs in this process
    check_output_dir(cfg.work_dir, "--work-dir")
    os.makedirs(cfg.work_dir, exist_ok=True)
    train_prompts = first_prompts("train", cfg.train_prompts, os.path.join(cfg.work_dir, "prompts_train.jsonl"))
    eval_prompts = eval_prompts or first_prompts("eval", cfg.eval_prompts,
                                                 os.path.join(cfg.work_dir, "prompts_eval.jsonl"))
    responses = responses or sample(cfg, cfg.model, train_prompts, os.path.join(cfg.work_dir, "responses.jsonl"))
    samples = {}
    if include_start:
        samples["start"] = sample(cfg, cfg.model, eval_prompts, os.path.join(cfg.work_dir, "start_samples.jsonl"),
                                  cfg.eval_n)
    for name, arm in arms.items():
        pairs = make_pairs(cfg, responses, arm.prepare, os.path.join(cfg.work_dir, "pairs-" + "_".join(
            a.lstrip("-") for a in arm.prepare) + ".jsonl"))
        checkpoint = train_arm(cfg, arm, pairs, os.path.join(cfg.work_dir, name))
        samples[name] = sample(cfg, checkpoint, eval_prompts, os.path.join(cfg.work_dir, name, "samples.jsonl"),
                               cfg.eval_n)
    results = evaluate.run(evaluate.parse_args([*samples.values(), "--names", *samples, "--semantic-embedder",
                                                cfg.semantic_embedder, "--output-dir",
                                                os.path.join(cfg.work_dir, "eval"), *remote_code(cfg),
                                                *(["--baseline", baseline] if baseline in samples else [])]))
    curves.run(curves.parse_args([os.path.join(cfg.work_dir, name) for name in arms] + [
        "--names", *arms, "--output", os.path.join(cfg.work_dir, "eval", "curves.png")]))
    return results


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cfg = PipelineConfig(**vars(add_config_args(p, PipelineConfig, GROUPS).parse_args(argv)))
    if cfg.quick:  # sizes given on the command line win over --quick's
        cfg = PipelineConfig(**{**asdict(cfg), **{k: v for k, v in QUICK.items() if not given(argv, k)}})
    train_flags = ["--" + f.name.replace("_", "-") for f in fields(trainer.TrainConfig)]
    for token in cfg.train_flags.split():  # what every arm sets itself would silently replace it in all of them
        flag = token.split("=")[0]
        # ddpo.train reads a unique prefix of a flag as the flag (--los is --loss)
        meant = [flag] if flag in train_flags else [f for f in train_flags if f.startswith(flag) and flag[2:]]
        if len(meant) == 1 and meant[0] in OWN_TRAIN_FLAGS:
            own = meant[0]
            p.error(f"argument --train-flags: {own} is set by the pipeline for each arm"
                    + (f"; use the pipeline's {OWN_TRAIN_FLAGS[own]}" if OWN_TRAIN_FLAGS[own] else ""))
    if cfg.eval_n == 1:
        p.error("argument --eval-n: diversity needs at least 2 samples per prompt (0 = --n)")
    if cfg.monitor_prompts > (held_out := len(prompt_lines("eval"))):
        p.error(f"argument --monitor-prompts: {cfg.monitor_prompts}, but ddpo/data/prompts_eval.jsonl holds {held_out}")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    print(f"pipeline: {json.dumps(asdict(cfg))}", flush=True)
    # the stages run as functions: their one-line errors are printed as the commands print them
    one_line_errors(run_arms, cfg, {"dpo": Arm("dpo"), "ddpo": Arm("ddpo")})


if __name__ == "__main__":
    main()
