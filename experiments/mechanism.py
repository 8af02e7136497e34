"""The mechanism without sampling noise: does DDPO raise rare responses more than DPO does?

    python -m ddpo.pipeline --work-dir runs/pipeline && python experiments/mechanism.py --work-dir runs/pipeline
    python experiments/mechanism.py --work-dir runs/exp --arms dpo ddpo-both ddpo-sem divpo --n 8 --pool-prompts 32
    python experiments/mechanism.py --work-dir ~/ddpo-runs/online --rounds-of ddpo --from-round 31   # its own pools

On held-out prompts (the pipeline's eval prompts, never trained on), the start model writes --n responses per prompt
once (<work-dir>/mechanism/pool.jsonl). For every response y of prompt x and every trained arm M:

    delta_M(y) = (log pi_M(y | x) - log pi_start(y | x)) / |y|        the change in log-prob per token

and per prompt, r_M = the Pearson correlation over its pool between delta_M and the deviation weight of y (both
metrics within the prompt's pool, as ddpo.prepare computes them). DDPO scales each pair's loss by the deviation of
its chosen response, so it should move probability toward rare responses more than DPO: r_DDPO - r_DPO > 0.
Reported per arm: mean r over prompts, and the paired difference to --baseline with a bootstrap 95% interval over
prompts and a sign-flip p-value (ddpo.evaluate's statistics). Forward passes only: no sampling noise after the pool.
With --rounds-of ARM the pools are instead those an online run (experiments/online_narrowing.py) trained on, one per
round and prompt: does the weight act where it was applied? Writes <work-dir>/mechanism[-ARM-pools]/report.md and
results.json.
"""

import argparse
import json
import os

import torch

from ddpo.checkpoint import checkpoints
from ddpo.data import Pair, collate, tokenize_pairs
from ddpo.files import atomic_write
from ddpo.deviation import deviation_weights
from ddpo.embedders import DEFAULT_EMBEDDERS, load_embedder
from ddpo.evaluate import interval, resample_means, sign_flip_p
from ddpo.models import DEFAULT_MODEL, load_model, load_tokenizer, sequence_logps
from ddpo.pipeline import first_prompts, sample
from ddpo.sources import read_jsonl


@torch.no_grad()
def per_token_logps(model_name, rows, batch_size=8):
    """Mean log-prob per token of each row's response given its prompt, (R,), tokenised as ddpo.train does."""
    tokenizer, model = load_tokenizer(model_name), load_model(model_name).eval()
    pairs = [Pair(r["prompt"], r["response"], r["response"], None, "") for r in rows]
    tokenize_pairs(pairs, tokenizer)
    out = []
    for i in range(0, len(pairs), batch_size):
        logps, counts = sequence_logps(model, collate(pairs[i:i + batch_size], tokenizer.pad_token_id, rejected=False))
        out.append(logps / counts)
    return torch.cat(out)


def pool_weights(rows, semantic):
    """Deviation weight of every response within its prompt's pool, both metrics (docs/method.md, section 2).
    Returns (R,), (R,)."""
    keys = list(dict.fromkeys(r["prompt_id"] for r in rows))
    group = torch.tensor([keys.index(r["prompt_id"]) for r in rows])
    texts = [r["response"] for r in rows]
    weights, _ = deviation_weights([load_embedder(semantic)(texts), load_embedder("stylometric")(texts)], group)
    return weights, group


def correlations(delta, weights, group):
    """Per prompt, Pearson r of delta and weights over its pool; NaN where either is constant. (G,)"""
    r = []
    for g in range(int(group.max()) + 1):
        d, w = delta[group == g].double(), weights[group == g].double()
        d, w = d - d.mean(), w - w.mean()
        denominator = (d.norm() * w.norm()).item()
        r.append((d @ w).item() / denominator if denominator > 1e-12 else float("nan"))
    return torch.tensor(r, dtype=torch.float64)


def training_pools(rounds_dir, first=1):
    """The pools of an online run's rounds from `first` on (ddpo.online's rounds/round-<r>.pools.jsonl), one pool per
    round and prompt: a prompt drawn in two rounds is two pools, as each round weighs its own."""
    names = [n for n in os.listdir(rounds_dir) if n.endswith(".pools.jsonl") and round_of(n) >= first]
    rows = []
    for name in sorted(names, key=round_of):
        for _, rec in read_jsonl(os.path.join(rounds_dir, name)):
            rows.append({**rec, "prompt_id": f"{name.split('.')[0]}:{rec['prompt_id']}"})
    return rows


def round_of(name):
    return int(name.split("-")[1].split(".")[0])


def checkpoint_of(work_dir, arm):
    found = checkpoints(os.path.join(work_dir, arm))
    if not found:
        raise SystemExit(f"error: no checkpoint under {os.path.join(work_dir, arm)}: train the arm first")
    return found[-1][1]


def run(args):
    out_dir = os.path.join(args.work_dir, f"mechanism-{args.rounds_of}-pools" if args.rounds_of else "mechanism")
    os.makedirs(out_dir, exist_ok=True)
    checkpoints = {arm: checkpoint_of(args.work_dir, arm) for arm in args.arms}
    if args.rounds_of:
        rows = training_pools(os.path.join(args.work_dir, args.rounds_of, "rounds"), args.from_round)
    elif args.pool:
        rows = [rec for _, rec in read_jsonl(args.pool)]
    else:
        prompts = first_prompts("eval", args.pool_prompts, os.path.join(out_dir, "prompts.jsonl"))
        cfg = argparse.Namespace(n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed, dtype=args.dtype)
        rows = [rec for _, rec in read_jsonl(sample(cfg, args.model, prompts, os.path.join(out_dir, "pool.jsonl")))]
    weights, group = pool_weights(rows, args.semantic_embedder)
    start = per_token_logps(args.model, rows)
    r = {arm: correlations(per_token_logps(path, rows) - start, weights, group) for arm, path in checkpoints.items()}
    keep = torch.stack(list(r.values())).isfinite().all(0)  # prompts whose pools have a spread of weights
    results = {"prompts": int(keep.sum()), "responses": len(rows), "checkpoints": checkpoints, "arms": {}}
    for arm, values in r.items():
        entry = {"mean_r": values[keep].mean().item(), "ci95": interval(resample_means(values[keep][:, None])[:, 0])}
        if args.baseline in r and arm != args.baseline:
            diff = values[keep] - r[args.baseline][keep]
            entry["vs_baseline"] = {"diff": diff.mean().item(), "ci95": interval(resample_means(diff[:, None])[:, 0]),
                                    "p_value": sign_flip_p(diff)}
        results["arms"][arm] = entry
    lines = [f"| arm | mean r(delta logp/token, deviation weight) | {args.baseline} difference | p |",
             "|---|---|---|---|"]
    for arm, e in results["arms"].items():
        d = e.get("vs_baseline")
        lines.append(f"| {arm} | {e['mean_r']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] | "
                     + (f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['p_value']:.3g} |"
                        if d else "| |"))
    source = f"training pools of {args.rounds_of}" if args.rounds_of else "held-out prompts"
    report = "\n".join(lines) + f"\n\n{results['prompts']} pools ({source}), {len(rows)} responses\n"
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2))
    atomic_write(os.path.join(out_dir, "report.md"), report)
    print(report, flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", default="runs/pipeline", help="a pipeline work dir with one subdirectory per arm")
    p.add_argument("--arms", nargs="+", default=["dpo", "ddpo"], help="trained arms (subdirectories of --work-dir)")
    p.add_argument("--baseline", default="dpo", help="the arm the others are compared with, paired over prompts")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the start model the arms were trained from")
    p.add_argument("--pool", help="samples JSONL of the start model on held-out prompts (default: sample one)")
    p.add_argument("--rounds-of", help="an online arm: the pools it trained on (its rounds/) instead of held-out ones")
    p.add_argument("--from-round", type=int, default=1, help="with --rounds-of: the first round whose pools are used")
    p.add_argument("--pool-prompts", type=int, default=32, help="held-out prompts (the first of the eval split)")
    p.add_argument("--n", type=int, default=8, help="responses per prompt in the pool")
    p.add_argument("--max-new-tokens", type=int, default=100, help="length of the pool's responses")
    p.add_argument("--semantic-embedder", default=DEFAULT_EMBEDDERS["semantic"],
                   help="semantic embedder of the weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool's sampling")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the pool's sampling dtype (ddpo.generate's --dtype)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
