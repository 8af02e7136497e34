"""Evidence that DDPO works: DDPO-both against DPO on held-out prompts, same pairs and training seeds, sized by a
power analysis; DDPO-sem, DDPO-sty, DivPO and the start model beside them; and the mechanism check.

    python experiments/evidence.py                               # ~/ddpo-runs/evidence: the sized run, 2 CPU cores
    python experiments/evidence.py --power runs/pilot/eval --arm ddpo --baseline dpo    # power from a finished eval
    python experiments/evidence.py --model meta-llama/Llama-3.1-8B-Instruct --train-prompts 98 --eval-prompts 64 \
        --n 8 --eval-n 8 --steps 200 --lr 5e-6 --max-new-tokens 512 --work-dir runs/evidence-8b \
        --train-flags="--lora-r 128 --lora-alpha 256 --gradient-checkpointing"    # one GPU, a few hours; not yet run

Every stage (training responses, pairs, each arm's training and held-out samples, evaluation, the mechanism pool and
its log-probs) writes into --work-dir and is skipped when its output is there: stop at any point, run the same
command again (also in a later session), and it goes on. Flags are ddpo.pipeline's; the defaults below are the
sized settings (experiments/LOG.md has the power analysis that chose them). The run in the LOG (2026-11-23) was
fp32, before --dtype auto became bf16 on CPUs with native bf16 matmuls: add --dtype float32 to repeat it or to go on
with its work dir.

Held-out prompts: the 32 of the eval split, then (for --eval-prompts > 32) training-split prompts from the end,
which the run never trains on. The mechanism check's pool is the first 32 eval prompts x --n responses.
Primary reading: per held-out prompt, DDPO-both minus DPO in semantic diversity, averaged over the training seeds
(--train-seeds), with a paired bootstrap 95% interval over prompts and a sign-flip p-value; proxy quality the same,
also relative to DPO's. Written to <work-dir>/evidence.md with the evaluation table and the mechanism table.
"""

import argparse
import json
import math
import os
import sys

from ddpo.files import atomic_write
from ddpo.evaluate import METRICS, paired, relative, span
from ddpo.pipeline import Arm, parse_args, prompt_lines, run_arms

sys.path.insert(0, os.path.dirname(__file__))
import mechanism  # noqa: E402

WORK_DIR = ["--work-dir", os.path.join(os.path.expanduser("~"), "ddpo-runs", "evidence")]
SIZED = ["--train-prompts", "48", "--n", "8", "--eval-prompts", "64", "--eval-n", "4", "--steps", "32", "--lr", "3e-5",
         "--batch-size", "4"]  # the sized settings; --quick replaces them with its smoke-test sizes


def arms(seeds):
    both = ["--deviation", "both"]  # DPO reads no weight: the same pairs file as DDPO-both
    out = {}
    for s in seeds:
        out[f"dpo-s{s}"] = Arm("dpo", both, ["--seed", str(s)])
        out[f"ddpo-both-s{s}"] = Arm("ddpo", both, ["--seed", str(s)])
    s = seeds[0]
    out[f"ddpo-sem-s{s}"] = Arm("ddpo", ["--deviation", "semantic"], ["--seed", str(s)])
    out[f"ddpo-sty-s{s}"] = Arm("ddpo", ["--deviation", "style"], ["--seed", str(s)])
    out[f"divpo-s{s}"] = Arm("dpo", ["--deviation", "both", "--pairing", "divpo"], ["--seed", str(s)])
    return out


def heldout_prompts(cfg, path):
    """--eval-prompts prompts never trained on: the 32 of the eval split, then training-split prompts from the end
    (the run trains on the first --train-prompts)."""
    lines, unused = prompt_lines("eval"), prompt_lines("train")[cfg.train_prompts:]
    if cfg.eval_prompts > len(lines) + len(unused):
        raise SystemExit(f"error: --eval-prompts {cfg.eval_prompts}: only {len(lines) + len(unused)} prompts are "
                         f"held out with --train-prompts {cfg.train_prompts}")
    lines = (lines + unused[::-1])[:cfg.eval_prompts]
    if not os.path.exists(path):
        atomic_write(path, "".join(lines))
    return path


def per_prompt(eval_dir, name):
    with open(os.path.join(eval_dir, f"{name}.metrics.json")) as f:
        return json.load(f)["per_prompt"]


def pooled_difference(eval_dir, pairs):
    """pairs: [(arm, baseline)], one per training seed -> evaluate.paired of the arms' per-prompt values averaged over
    the seeds against the baselines' (so each prompt's difference is its mean over the seeds): per metric the mean
    difference, its paired bootstrap 95% interval, sign-flip p and per-prompt SD; quality also in % of the baseline."""
    runs = {name: per_prompt(eval_dir, name) for pair in pairs for name in pair}
    keys = sorted(set.intersection(*(set(r["semantic_diversity"]) for r in runs.values())))

    def seed_mean(names):
        return {m: {k: sum(runs[n][m][k] for n in names) / len(names) for k in keys} for m in METRICS}

    return paired(seed_mean([arm for arm, _ in pairs]), seed_mean([base for _, base in pairs]), keys)


def power(diff_mean, diff_sd, prompts, z_alpha=1.96, z_power=0.84):
    """Prompts needed for a paired 95% interval to exclude 0 with 80% power, if the true effect is the observed one."""
    needed = math.ceil(((z_alpha + z_power) * diff_sd / abs(diff_mean)) ** 2) if diff_mean else math.inf
    return {"effect": diff_mean, "per_prompt_sd": diff_sd, "prompts": prompts, "prompts_needed": needed,
            "half_width_now": z_alpha * diff_sd / math.sqrt(prompts)}


def reading(name, d):
    sem, sty = d["semantic_diversity"], d["style_diversity"]
    return (f"{name}: semantic diversity {span(sem['diff'], sem['ci95'], '+.4f')} (p={sem['p_value']:.3g}), style "
            f"diversity {span(sty['diff'], sty['ci95'], '+.4f')}, quality {relative(d['quality'])}, length "
            f"{d['length']['diff']:+.1f} words, over {sem['prompts']} prompts")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1], help="training seeds of DPO and DDPO-both")
    extra.add_argument("--power", help="an eval dir: print the power analysis of --arm against --baseline and stop")
    extra.add_argument("--arm", default="ddpo")
    extra.add_argument("--baseline", default="dpo")
    own, rest = extra.parse_known_args(argv)
    if own.power:
        d = pooled_difference(own.power, [(own.arm, own.baseline)])["semantic_diversity"]
        print(json.dumps(power(d["diff"], d["per_prompt_sd"], d["prompts"]), indent=2))
        return
    quick = "--quick" in rest  # its own work dir: a smoke run's 3 prompts must never become the sized run's stages
    cfg = parse_args([WORK_DIR[0], WORK_DIR[1] + ("-quick" if quick else "")] + ([] if quick else SIZED) + rest)
    seeds = own.train_seeds
    os.makedirs(cfg.work_dir, exist_ok=True)
    heldout = heldout_prompts(cfg, os.path.join(cfg.work_dir, "prompts_heldout.jsonl"))
    run_arms(cfg, arms(seeds), eval_prompts=heldout, include_start=True, baseline=f"dpo-s{seeds[0]}")
    eval_dir = os.path.join(cfg.work_dir, "eval")
    comparisons = {name: [(f"{name}-s{s}", f"dpo-s{s}") for s in (seeds if name == "ddpo-both" else seeds[:1])]
                   for name in ("ddpo-both", "ddpo-sem", "ddpo-sty", "divpo")}
    comparisons["start"] = [("start", f"dpo-s{s}") for s in seeds]
    results = {name: pooled_difference(eval_dir, pairs) for name, pairs in comparisons.items()}
    d = results["ddpo-both"]["semantic_diversity"]
    results["power"] = power(d["diff"], d["per_prompt_sd"], d["prompts"])
    pool = os.path.join(cfg.work_dir, "start_samples.jsonl") if (cfg.eval_n or cfg.n) == cfg.n else None
    check = mechanism.run(mechanism.parse_args(
        ["--work-dir", cfg.work_dir, "--model", cfg.model, "--arms", *[f"dpo-s{s}" for s in seeds],
         *[f"ddpo-both-s{s}" for s in seeds], f"ddpo-sem-s{seeds[0]}", f"ddpo-sty-s{seeds[0]}", f"divpo-s{seeds[0]}",
         "--baseline", f"dpo-s{seeds[0]}", "--pool-prompts", str(min(cfg.eval_prompts, 32)), "--n", str(cfg.n),
         "--max-new-tokens", str(cfg.max_new_tokens), "--semantic-embedder", cfg.semantic_embedder,
         "--dtype", cfg.dtype, *(["--pool", pool] if pool else [])]))
    results["mechanism"] = check
    lines = [reading(f"{name} - dpo", results[name]) for name in comparisons]
    with open(os.path.join(eval_dir, "report.md")) as f:
        table = f.read()
    with open(os.path.join(cfg.work_dir, "mechanism", "report.md")) as f:
        mech = f.read()
    text = ("# Evidence run\n\n" + json.dumps({k: v for k, v in vars(cfg).items()}) + f"\ntraining seeds {seeds}\n\n"
            + "## Paired differences to DPO (seed-averaged per prompt)\n\n" + "\n".join(f"- {x}" for x in lines)
            + "\n\n## Power\n\n" + json.dumps(results["power"]) + "\n\n## Evaluation\n\n" + table
            + "\n\n## Mechanism\n\n" + mech)
    atomic_write(os.path.join(cfg.work_dir, "evidence.md"), text)
    atomic_write(os.path.join(cfg.work_dir, "evidence.json"), json.dumps(results, indent=2))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
