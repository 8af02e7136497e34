"""The whole method, offline, end to end: sample -> score -> weighted pairs -> DPO and DDPO -> sample -> evaluate.

    python -m ddpo.pipeline                          # the default run on the packaged models (2 CPU cores: ~15 min)
    python -m ddpo.pipeline --quick --work-dir /tmp/p # a minute-long smoke run
    python -m ddpo.pipeline --model HuggingFaceTB/SmolLM2-1.7B-Instruct --train-prompts 130 --eval-prompts 32 --n 8

1. the starting model writes --n stories for each of the first --train-prompts prompts of ddpo/data/prompts_train.jsonl
2. ddpo.prepare scores them (offline proxy), embeds them (packaged all-MiniLM-L6-v2 + the stylometric profile) and
   pairs them (released gap rule), each pair weighted by the deviation of its chosen story
3. ddpo.train trains DPO and DDPO from the same start, same pairs, seed and steps
4. both write --n stories for each of the first --eval-prompts held-out prompts of ddpo/data/prompts_eval.jsonl
5. ddpo.evaluate prints the comparison table, DDPO's paired differences to DPO, and writes the plot
Every stage writes into --work-dir and is skipped when its output is already there, so a stopped run resumes.
experiments/ builds its comparisons from the same functions (`run_arms`).
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources

from ddpo import evaluate, generate, prepare
from ddpo import train as trainer
from ddpo.data import atomic_write
from ddpo.embedders import DEFAULT_EMBEDDERS
from ddpo.models import DEFAULT_MODEL


@dataclass
class PipelineConfig:
    work_dir: str = "runs/pipeline"
    model: str = DEFAULT_MODEL
    train_prompts: int = 24
    eval_prompts: int = 12
    n: int = 4
    eval_n: int = 0  # samples per held-out prompt (0 = n)
    max_new_tokens: int = 100
    steps: int = 10
    batch_size: int = 4
    lr: float = 1e-5
    beta: float = 0.1
    gap: float = 1.0
    semantic_embedder: str = DEFAULT_EMBEDDERS["semantic"]
    train_flags: str = ""  # extra ddpo.train flags for every arm, e.g. "--lora-r 128 --gradient-checkpointing"
    seed: int = 0
    quick: bool = False


QUICK = dict(train_prompts=3, eval_prompts=2, n=3, max_new_tokens=24, steps=2, batch_size=2)


@dataclass
class Arm:
    """One trained model: a loss, the ddpo.prepare flags of its pairs and extra ddpo.train flags."""
    loss: str
    prepare: list = field(default_factory=lambda: ["--deviation", "both"])
    train: list = field(default_factory=list)


def packaged_prompts(split):
    return str(resources.files("ddpo") / "data" / f"prompts_{split}.jsonl")


def first_prompts(split, count, path):
    with open(packaged_prompts(split)) as f:
        lines = [line for line in f if line.strip()][:count]
    if not os.path.exists(path):
        atomic_write(path, "".join(lines))
    return path


def sample(cfg, model, prompts, output, n=None, extra=()):
    generate.main(["--model", model, "--prompts", prompts, "--output", output, "--n", str(n or cfg.n),
                   "--max-new-tokens", str(cfg.max_new_tokens), "--seed", str(cfg.seed), *extra])
    return output


def make_pairs(cfg, responses, flags, output):
    if not os.path.exists(output):
        prepare.prepare(prepare.parse_args(["--input", responses, "--output", output, "--score", "proxy",
                                            "--gap", str(cfg.gap), "--seed", str(cfg.seed),
                                            "--semantic-embedder", cfg.semantic_embedder, *flags]))
    return output


def train_arm(cfg, arm, pairs, output_dir):
    final = os.path.join(output_dir, f"checkpoint-{cfg.steps}")
    if not os.path.exists(final):
        trainer.train(trainer.parse_args([
            "--model", cfg.model, "--data", pairs, "--output-dir", output_dir, "--loss", arm.loss,
            "--max-steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
            "--beta", str(cfg.beta), "--seed", str(cfg.seed), "--save-every", "0", "--keep-checkpoints", "1",
            *(["--precompute-ref"] if arm.loss in ("dpo", "ddpo") else []),
            *(["--resume"] if os.path.isdir(output_dir) else []), *cfg.train_flags.split(), *arm.train]))
    return final


def run_arms(cfg, arms, responses=None, eval_prompts=None, include_start=False, baseline="dpo"):
    """Train every arm from the same start on pairs built from the same responses, sample, evaluate (with paired
    differences to the arm named baseline, when there is one).

    Returns the evaluation results {name: metrics}; outputs under cfg.work_dir."""
    os.makedirs(cfg.work_dir, exist_ok=True)
    train_prompts = first_prompts("train", cfg.train_prompts, os.path.join(cfg.work_dir, "prompts_train.jsonl"))
    eval_prompts = eval_prompts or first_prompts("eval", cfg.eval_prompts, os.path.join(cfg.work_dir, "prompts_eval.jsonl"))
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
    return evaluate.run(evaluate.parse_args([*samples.values(), "--names", *samples, "--semantic-embedder",
                                             cfg.semantic_embedder, "--output-dir", os.path.join(cfg.work_dir, "eval"),
                                             *(["--baseline", baseline] if baseline in samples else [])]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in asdict(PipelineConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true", help="tiny settings for a smoke test: " + json.dumps(QUICK))
        else:
            p.add_argument(flag, type=type(value), default=value)
    cfg = PipelineConfig(**vars(p.parse_args(argv)))
    if cfg.quick:
        cfg = PipelineConfig(**{**asdict(cfg), **QUICK})
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    print(f"pipeline: {json.dumps(asdict(cfg))}", flush=True)
    run_arms(cfg, {"dpo": Arm("dpo"), "ddpo": Arm("ddpo")})


if __name__ == "__main__":
    main()
