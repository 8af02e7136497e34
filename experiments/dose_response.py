"""Dose-response: how far must offline DPO train before it narrows the model? (the evidence's first question)

    python experiments/dose_response.py                              # ~/ddpo-runs/dose: the grid below, 2 CPU cores
    python experiments/dose_response.py --quick                      # a smoke run, its own work dir
    python experiments/dose_response.py --doses 1e-4:0.1 3e-4:0.1 --checkpoints 25 50 100 200 400

The start model writes --n stories for each of --train-prompts prompts; ddpo.prepare pairs them (gap rule). One DPO
run per dose (lr:beta) on those pairs, at a constant learning rate, stops at every --checkpoints step; each stop and
the start model write --eval-n stories for each held-out prompt (the 32 of the eval split, or --eval-prompts FILE,
any prompts JSONL), and ddpo.evaluate pairs every run with the start model by prompt. The narrowing is
start - DPO in semantic diversity (positive: DPO narrowed the model), with its paired 95% bootstrap interval over
prompts; style diversity and proxy quality beside it, since a DPO that narrows by breaking the text is not the
regime. Written to <work-dir>/dose.md (one row per stop) and dose.png (each metric's difference to the start model
against steps, one line per dose). Every stage writes into --work-dir and is skipped when its output is there, so
the same command resumes, in a later session too.
Flags are ddpo.pipeline's (--train-prompts, --n, --eval-n, --max-new-tokens, --batch-size, --seed, --dtype, ...).
"""

import argparse
import json
import os
import sys

from ddpo import evaluate
from ddpo import train as trainer
from ddpo.checkpoint import checkpoint_path
from ddpo.data import DataError
from ddpo.files import atomic_write
from ddpo.malloc import keep_freed_memory
from ddpo.pipeline import first_prompts, make_pairs, parse_args, remote_code, sample

WORK_DIR = os.path.join(os.path.expanduser("~"), "ddpo-runs", "dose")
SIZED = ["--train-prompts", "48", "--n", "8", "--eval-prompts", "32", "--eval-n", "4", "--batch-size", "4"]
QUICK = {"doses": ["1e-4:0.1"], "checkpoints": [1, 2]}
METRICS = ("semantic_diversity", "style_diversity", "quality")


def train_to(cfg, pairs, out, lr, beta, steps):
    """DPO at a constant lr up to `steps`, resuming the run's newest checkpoint (which holds the optimiser)."""
    final = checkpoint_path(out, steps)
    if not os.path.exists(final):
        trainer.train(trainer.parse_args([
            "--model", cfg.model, "--data", pairs, "--output-dir", out, "--loss", "dpo", "--max-steps", str(steps),
            "--batch-size", str(cfg.batch_size), "--lr", str(lr), "--beta", str(beta), "--seed", str(cfg.seed),
            "--schedule", "constant", "--keep-checkpoints", "1", "--precompute-ref", "--dtype", cfg.dtype,
            *(["--resume"] if os.path.isdir(out) else []), *cfg.train_flags.split()]))
    return final


def plot(rows, path, xlabel="DPO steps", title="DPO - start"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    stops = sorted({r["steps"] for r in rows})
    for ax, m in zip(axes, METRICS):
        for dose in dict.fromkeys(r["dose"] for r in rows):
            mine = [r for r in rows if r["dose"] == dose]
            x = [r["steps"] for r in mine]
            y = [r[m]["diff"] for r in mine]
            err = [[r[m]["diff"] - r[m]["ci95"][0] for r in mine], [r[m]["ci95"][1] - r[m]["diff"] for r in mine]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=dose)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(stops, [str(x) for x in stops])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_title(f"{m}: {title} (paired 95%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--doses", nargs="+", default=["3e-5:0.1", "1e-4:0.1", "1e-4:0.5"], help="lr:beta of each run")
    extra.add_argument("--checkpoints", type=int, nargs="+", default=[25, 50, 100, 200], help="steps sampled at")
    extra.add_argument("--eval-prompts", dest="eval_file", help="held-out prompts JSONL (default: the eval split)")
    own, rest = extra.parse_known_args(argv)
    quick = "--quick" in rest
    if quick:
        own.doses, own.checkpoints = QUICK["doses"], QUICK["checkpoints"]
    work_dir = [] if any(a.startswith("--work-dir") for a in rest) else ["--work-dir", WORK_DIR + "-quick" * quick]
    cfg = parse_args(work_dir + ([] if quick else SIZED) + rest)
    keep_freed_memory()
    os.makedirs(cfg.work_dir, exist_ok=True)
    # 1. the start model's pools, its pairs and its held-out samples
    train_prompts = first_prompts("train", cfg.train_prompts, os.path.join(cfg.work_dir, "prompts_train.jsonl"))
    heldout = own.eval_file or first_prompts("eval", cfg.eval_prompts, os.path.join(cfg.work_dir, "prompts_eval.jsonl"))
    responses = sample(cfg, cfg.model, train_prompts, os.path.join(cfg.work_dir, "responses.jsonl"))
    # weighted (DPO reads no weight), so that the DDPO arms of the comparison train on the very same pairs
    pairs = make_pairs(cfg, responses, ["--deviation", "both"], os.path.join(cfg.work_dir, "pairs.jsonl"))
    samples = {"start": sample(cfg, cfg.model, heldout, os.path.join(cfg.work_dir, "start.jsonl"), cfg.eval_n)}
    # 2. each dose trains on, stopping to sample at every checkpoint
    for dose in own.doses:
        lr, beta = (float(v) for v in dose.split(":"))
        out = os.path.join(cfg.work_dir, f"dpo-lr{lr:g}-beta{beta:g}")
        for steps in sorted(own.checkpoints):
            name = f"{dose}@{steps}"
            path = os.path.join(out, f"samples-{steps}.jsonl")
            # while the stop's checkpoint is there, generate finishes a partial samples file (or does nothing)
            if not os.path.exists(path) or os.path.exists(checkpoint_path(out, steps)):
                sample(cfg, train_to(cfg, pairs, out, lr, beta, steps), heldout, path, cfg.eval_n)
            samples[name] = path
    # 3. every stop paired with the start model
    results = evaluate.run(evaluate.parse_args([*samples.values(), "--names", *samples, "--baseline", "start",
                                                "--semantic-embedder", cfg.semantic_embedder, *remote_code(cfg),
                                                "--output-dir", os.path.join(cfg.work_dir, "eval")]))
    rows = [{"dose": name.split("@")[0], "steps": int(name.split("@")[1]),
             **{m: results[name]["vs_baseline"][m] for m in METRICS}} for name in samples if name != "start"]
    lines = ["| lr:beta | steps | start - DPO semantic diversity | start - DPO style diversity | quality vs start |",
             "|---|---|---|---|---|"]
    for r in rows:
        sem, sty = r["semantic_diversity"], r["style_diversity"]
        narrow = [f"{-d['diff']:+.4f} [{-d['ci95'][1]:+.4f}, {-d['ci95'][0]:+.4f}] (p={d['p_value']:.2g})"
                  for d in (sem, sty)]
        lines.append(f"| {r['dose']} | {r['steps']} | {narrow[0]} | {narrow[1]} | {evaluate.relative(r['quality'])} |")
    start = results["start"]
    text = (f"# Dose-response of DPO\n\n{json.dumps(vars(cfg))}\ndoses {own.doses}, checkpoints {own.checkpoints}\n\n"
            f"start model: semantic diversity {start['semantic_diversity']['mean']:.4f}, style diversity "
            f"{start['style_diversity']['mean']:.4f}, quality {start['quality']['mean']:.3f} over "
            f"{start['prompts']} held-out prompts\n\n" + "\n".join(lines) + "\n")
    atomic_write(os.path.join(cfg.work_dir, "dose.md"), text)
    atomic_write(os.path.join(cfg.work_dir, "dose.json"), json.dumps(rows, indent=2))
    plot(rows, os.path.join(cfg.work_dir, "dose.png"))
    print(text + f"plot: {os.path.join(cfg.work_dir, 'dose.png')}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
