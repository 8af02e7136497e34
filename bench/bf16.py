"""bf16 autocast against fp32 in ddpo.train on one machine: train-step tokens/s and the loss curve.

    python -m bench.bf16                          # SmolLM2-135M, 20 steps of 2 pairs of 100-400 tokens, CPU
    python -m bench.bf16 --steps 20 --pairs-per-step 4

Two runs of `ddpo.train --loss ddpo` on the same synthetic pairs (bench/train_step.py's), seed and schedule (lr 1e-5,
so the curve moves), one with --dtype float32 and one with --dtype bfloat16 (fp32 master weights, bf16 matmuls;
losses, log-sum-exp and the reference's weights in fp32). Reported: the median step's tokens/s of each (steps
2..N; step 1 warms up) and their ratio; the largest difference of the per-step losses, absolute and relative to
fp32's; and the step-1 reward margin of bf16, which is 0 when policy and reference agree. Rows go to
bench/results.jsonl. And the rewards' bf16 noise: at every --save-every checkpoint of the fp32 run, each pair's DPO
logit (beta 0.1, the start model as reference) computed on the same weights in fp32 and under bf16 autocast; the
error |bf16 - fp32| against the true value |fp32|.
"""

import argparse
import json
import os
import statistics
import tempfile

from bench.common import append_rows
from bench.train_step import synthetic_pairs


def run(model, data, out, dtype, steps, pairs_per_step, save_every=0):
    from ddpo.train import parse_args, train

    train(parse_args(["--model", model, "--data", data, "--output-dir", out, "--loss", "ddpo", "--dtype", dtype,
                      "--batch-size", str(pairs_per_step), "--max-steps", str(steps), "--lr", "1e-5",
                      "--keep-checkpoints", "0" if save_every else "1", "--save-every", str(save_every)]))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logit_noise(model, checkpoint, data, beta=0.1):
    """Per pair, the DPO logit beta * ((policy - ref) chosen - (policy - ref) rejected) of the same weights in fp32 and
    under bf16 autocast (as --dtype bfloat16 computes rewards): |bf16 - fp32| and |fp32|, each (pairs,)."""
    import torch

    from ddpo.data import load_pairs, make_batch, tokenize_pairs
    from ddpo.models import autocast_context, load_model, load_tokenizer, sequence_logps

    tokenizer, cpu = load_tokenizer(model), torch.device("cpu")
    pairs = load_pairs(data)
    tokenize_pairs(pairs, tokenizer)
    policy, ref = load_model(checkpoint).eval(), load_model(model).eval()
    logits = {}
    for dtype in (None, torch.bfloat16):
        with torch.no_grad(), autocast_context(cpu, dtype)():
            logits[dtype] = []
            for pair in pairs:
                batch = make_batch([pair], tokenizer.pad_token_id, cpu, packing=False)
                (pc, pr), (rc, rr) = sequence_logps(policy, batch)[0], sequence_logps(ref, batch)[0]
                logits[dtype].append(beta * ((pc - rc) - (pr - rr)).item())
    fp32, bf16 = torch.tensor(logits[None]), torch.tensor(logits[torch.bfloat16])
    return (bf16 - fp32).abs(), fp32.abs()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs-per-step", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--save-every", type=int, default=5, help="fp32 checkpoints whose DPO logits are computed in "
                    "both dtypes (the rewards' bf16 noise)")
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            for row in synthetic_pairs(args.steps * args.pairs_per_step, args.min_len, args.max_len, seed=0):
                f.write(json.dumps(row) + "\n")
        runs = {dtype: run(args.model, data, os.path.join(tmp, dtype), dtype, args.steps, args.pairs_per_step,
                           args.save_every if dtype == "float32" else 0) for dtype in ("float32", "bfloat16")}
        noise = {}  # the fp32 run's checkpoints: bf16's error in the DPO logit against its true (fp32) value
        for step in range(args.save_every, args.steps + 1, args.save_every) if args.save_every else []:
            err, true = logit_noise(args.model, os.path.join(tmp, "float32", f"checkpoint-{step}"), data)
            noise[step] = {"median_abs_err": err.median().item(), "max_abs_err": err.max().item(),
                           "median_abs_logit": true.median().item(), "max_abs_logit": true.max().item(),
                           "err_above_logit": (err > true).float().mean().item()}
            print(f"step {step}: DPO logit (beta 0.1) |bf16 - fp32| median {noise[step]['median_abs_err']:.4f} "
                  f"max {noise[step]['max_abs_err']:.4f}; |fp32 logit| median {noise[step]['median_abs_logit']:.4f} "
                  f"max {noise[step]['max_abs_logit']:.4f}; error > logit in "
                  f"{100 * noise[step]['err_above_logit']:.0f}% of pairs", flush=True)
    speed = {dtype: statistics.median(r["tokens_per_s"] for r in rows[1:]) for dtype, rows in runs.items()}
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(runs["float32"], runs["bfloat16"])]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    row = {"bench": "bf16", "model": args.model, "steps": args.steps, "pairs_per_step": args.pairs_per_step,
           "lengths": [args.min_len, args.max_len], "fp32_tokens_per_s": speed["float32"],
           "bf16_tokens_per_s": speed["bfloat16"], "speedup": speed["bfloat16"] / speed["float32"],
           "max_abs_loss_diff": diffs[worst], "max_rel_loss_diff": diffs[worst] / abs(runs["float32"][worst]["loss"]),
           "bf16_step1_margin": runs["bfloat16"][0]["rewards/margins"],
           "losses": {dtype: [r["loss"] for r in rows] for dtype, rows in runs.items()}, "logit_noise": noise}
    append_rows(args.out, [row])
    print(f"tokens/s: fp32 {speed['float32']:.1f}, bf16 {speed['bfloat16']:.1f} ({row['speedup']:.2f}x); loss curve: "
          f"max |bf16 - fp32| {diffs[worst]:.2e} ({100 * row['max_rel_loss_diff']:.2f}% at step {worst + 1}); "
          f"bf16 step-1 margin {row['bf16_step1_margin']:.2e}")


if __name__ == "__main__":
    main()
