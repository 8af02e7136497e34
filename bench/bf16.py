"""bf16 autocast against fp32 in ddpo.train on one machine: train-step tokens/s and the loss curve.

    python -m bench.bf16                          # SmolLM2-135M, 20 steps of 2 pairs of 100-400 tokens, CPU
    python -m bench.bf16 --steps 20 --pairs-per-step 4

Two runs of `ddpo.train --loss ddpo` on the same synthetic pairs (bench/train_step.py's), seed and schedule (lr 1e-5,
so the curve moves), one with --dtype float32 and one with --dtype bfloat16 (fp32 master weights, bf16 matmuls;
losses, log-sum-exp and the reference's weights in fp32). Reported: the median step's tokens/s of each (steps
2..N; step 1 warms up) and their ratio; the largest difference of the per-step losses, absolute and relative to
fp32's; and the step-1 reward margin of bf16, which is 0 when policy and reference agree. Rows go to
bench/results.jsonl.
"""

import argparse
import json
import os
import statistics
import tempfile

from bench.common import append_rows
from bench.train_step import synthetic_pairs


def run(model, data, out, dtype, steps, pairs_per_step):
    from ddpo.train import parse_args, train

    train(parse_args(["--model", model, "--data", data, "--output-dir", out, "--loss", "ddpo", "--dtype", dtype,
                      "--batch-size", str(pairs_per_step), "--max-steps", str(steps), "--lr", "1e-5",
                      "--keep-checkpoints", "1"]))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs-per-step", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            for row in synthetic_pairs(args.steps * args.pairs_per_step, args.min_len, args.max_len, seed=0):
                f.write(json.dumps(row) + "\n")
        runs = {dtype: run(args.model, data, os.path.join(tmp, dtype), dtype, args.steps, args.pairs_per_step)
                for dtype in ("float32", "bfloat16")}
    speed = {dtype: statistics.median(r["tokens_per_s"] for r in rows[1:]) for dtype, rows in runs.items()}
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(runs["float32"], runs["bfloat16"])]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    row = {"bench": "bf16", "model": args.model, "steps": args.steps, "pairs_per_step": args.pairs_per_step,
           "lengths": [args.min_len, args.max_len], "fp32_tokens_per_s": speed["float32"],
           "bf16_tokens_per_s": speed["bfloat16"], "speedup": speed["bfloat16"] / speed["float32"],
           "max_abs_loss_diff": diffs[worst], "max_rel_loss_diff": diffs[worst] / abs(runs["float32"][worst]["loss"]),
           "bf16_step1_margin": runs["bfloat16"][0]["rewards/margins"],
           "losses": {dtype: [r["loss"] for r in rows] for dtype, rows in runs.items()}}
    append_rows(args.out, [row])
    print(f"tokens/s: fp32 {speed['float32']:.1f}, bf16 {speed['bfloat16']:.1f} ({row['speedup']:.2f}x); loss curve: "
          f"max |bf16 - fp32| {diffs[worst]:.2e} ({100 * row['max_rel_loss_diff']:.2f}% at step {worst + 1}); "
          f"bf16 step-1 margin {row['bf16_step1_margin']:.2e}")


if __name__ == "__main__":
    main()
