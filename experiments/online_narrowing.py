"""Does on-policy DPO on a fixed reward narrow the model, and does DDPO narrow it less? (issue 26, the online arm)

    python experiments/online_narrowing.py                      # ~/ddpo-runs/online: 2 arms x 40 rounds, 2 CPU cores
    python experiments/online_narrowing.py --quick              # a smoke run, its own work dir
    python experiments/online_narrowing.py --rounds 80 --eval-every 20 --lr 5e-5 --eval-prompts my_prompts.jsonl

Two ddpo.online runs from the same start model, the same prompts, rounds and sampling: online DPO (--loss dpo
--deviation none) and online DDPO (--loss ddpo --deviation both), both on the proxy reward with gap pairs of each
round's fresh pools, at a constant learning rate. Every --eval-every rounds each run samples --eval-n stories for
each held-out prompt (its --eval-prompts; the sampler and seed of ddpo.generate, whose samples of the start model
are the baseline), and ddpo.evaluate pairs every stop with the start model by prompt: start - arm in semantic and
style diversity (positive: the arm narrowed the model) with paired 95% bootstrap intervals, and quality beside it.
Written to <work-dir>/online.md and online.png; each run resumes from its checkpoint (--save-every = --eval-every),
so the same command continues in a later session.
Flags are ddpo.pipeline's (--train-prompts: the prompts rounds cycle through, --n, --eval-prompts, --eval-n,
--max-new-tokens, --lr, --beta, --gap, --seed, --dtype, ...) plus --rounds, --eval-every, --prompts-per-round.
"""

import argparse
import json
import os
import sys

from dose_response import plot

from ddpo import evaluate, online
from ddpo.checkpoint import checkpoint_path
from ddpo.data import DataError
from ddpo.files import atomic_write
from ddpo.malloc import keep_freed_memory
from ddpo.pipeline import first_prompts, parse_args, remote_code, sample

WORK_DIR = os.path.join(os.path.expanduser("~"), "ddpo-runs", "online")
SIZED = ["--train-prompts", "130", "--n", "4", "--eval-prompts", "32", "--eval-n", "4", "--max-new-tokens", "64",
         "--lr", "1e-4", "--gap", "1.0"]
QUICK = {"rounds": 2, "eval_every": 1, "prompts_per_round": 2}
ARMS = {"dpo": ["--loss", "dpo", "--deviation", "none"], "ddpo": ["--loss", "ddpo", "--deviation", "both"]}
METRICS = ("semantic_diversity", "style_diversity", "quality")


def run_arm(cfg, own, arm, prompts, heldout, out):
    """ddpo.online for one arm up to --rounds, resuming its newest checkpoint."""
    if not os.path.exists(checkpoint_path(out, own.rounds)):
        online.main(["--model", cfg.model, "--prompts", prompts, "--output-dir", out, *ARMS[arm],
                     "--rounds", str(own.rounds), "--prompts-per-round", str(own.prompts_per_round),
                     "--n", str(cfg.n), "--max-new-tokens", str(cfg.max_new_tokens), "--lr", str(cfg.lr),
                     "--beta", str(cfg.beta), "--gap", str(cfg.gap), "--schedule", "constant",
                     "--seed", str(cfg.seed), "--dtype", cfg.dtype, "--semantic-embedder", cfg.semantic_embedder,
                     "--eval-prompts", heldout, "--eval-every", str(own.eval_every),
                     "--eval-samples", str(cfg.eval_n or cfg.n), "--eval-max-new-tokens", str(cfg.max_new_tokens),
                     "--save-every", str(own.eval_every), "--keep-checkpoints", "1", *remote_code(cfg),
                     *(["--resume"] if os.path.isdir(out) else [])])
    return {r: os.path.join(out, "eval_samples", f"step-{r}.jsonl")
            for r in range(own.eval_every, own.rounds + 1, own.eval_every)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--rounds", type=int, default=40)
    extra.add_argument("--eval-every", type=int, default=10)
    extra.add_argument("--prompts-per-round", type=int, default=8)
    extra.add_argument("--eval-prompts", dest="eval_file", help="held-out prompts JSONL (default: the eval split)")
    own, rest = extra.parse_known_args(argv)
    quick = "--quick" in rest
    if quick:
        own.rounds, own.eval_every, own.prompts_per_round = QUICK.values()
    work_dir = [] if any(a.startswith("--work-dir") for a in rest) else ["--work-dir", WORK_DIR + "-quick" * quick]
    cfg = parse_args(work_dir + ([] if quick else SIZED) + rest)
    keep_freed_memory()
    os.makedirs(cfg.work_dir, exist_ok=True)
    prompts = first_prompts("train", cfg.train_prompts, os.path.join(cfg.work_dir, "prompts_train.jsonl"))
    heldout = own.eval_file or first_prompts("eval", cfg.eval_prompts, os.path.join(cfg.work_dir, "prompts_eval.jsonl"))
    # the start model's held-out samples: what each run's evaluation samples at round 0
    samples = {"start": sample(cfg, cfg.model, heldout, os.path.join(cfg.work_dir, "start.jsonl"), cfg.eval_n)}
    for arm in ARMS:
        for r, path in run_arm(cfg, own, arm, prompts, heldout, os.path.join(cfg.work_dir, arm)).items():
            samples[f"{arm}@{r}"] = path
    results = evaluate.run(evaluate.parse_args([*samples.values(), "--names", *samples, "--baseline", "start",
                                                "--semantic-embedder", cfg.semantic_embedder, *remote_code(cfg),
                                                "--output-dir", os.path.join(cfg.work_dir, "eval")]))
    rows = [{"dose": name.split("@")[0], "steps": int(name.split("@")[1]),
             **{m: results[name]["vs_baseline"][m] for m in METRICS}} for name in samples if name != "start"]
    lines = ["| arm | rounds | start - arm semantic diversity | start - arm style diversity | quality vs start |",
             "|---|---|---|---|---|"]
    for r in rows:
        narrow = [f"{-d['diff']:+.4f} [{-d['ci95'][1]:+.4f}, {-d['ci95'][0]:+.4f}] (p={d['p_value']:.2g})"
                  for d in (r["semantic_diversity"], r["style_diversity"])]
        lines.append(f"| {r['dose']} | {r['steps']} | {narrow[0]} | {narrow[1]} | {evaluate.relative(r['quality'])} |")
    start = results["start"]
    text = (f"# Online DPO and DDPO against the start model\n\n{json.dumps(vars(cfg))}\n{json.dumps(vars(own))}\n\n"
            f"start model: semantic diversity {start['semantic_diversity']['mean']:.4f}, style diversity "
            f"{start['style_diversity']['mean']:.4f}, quality {start['quality']['mean']:.3f} over "
            f"{start['prompts']} held-out prompts\n\n" + "\n".join(lines) + "\n")
    atomic_write(os.path.join(cfg.work_dir, "online.md"), text)
    atomic_write(os.path.join(cfg.work_dir, "online.json"), json.dumps(rows, indent=2))
    plot(rows, os.path.join(cfg.work_dir, "online.png"), "rounds", "arm - start")
    print(text + f"plot: {os.path.join(cfg.work_dir, 'online.png')}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
