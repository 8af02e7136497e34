"""A full DDPO training step: tokens per second and peak memory, ddpo.train against TRL's DPOTrainer.

    python -m bench.train_step --model packaged:smollm2-135m-instruct --pairs-per-step 2 --min-len 50 --max-len 400
    /tmp/trlenv/bin/python -m bench.train_step ...      # an environment with TRL adds the TRL row

Synthetic pairs with drawn lengths (prompt, chosen and rejected each uniform in [min-len, max-len] / 3 words, so
pairs span min-len..max-len tokens). Both trainers: same model, data, batch, fp32, dropout off, a live reference
model (no precomputation), no gradient checkpointing. Each runs in its own subprocess (peak RSS, or CUDA peak
allocation, is per process) for two epochs over --steps x --pairs-per-step pairs: the first epoch is the warm-up,
the second is timed. As each trainer shuffles in its own order, per-step token counts differ between them, but
every epoch holds the same pairs: tokens/s = the epoch's real (non-padding) tokens of the prompt+chosen and
prompt+rejected sequences, counted once with our tokenisation, / the summed step times of the timed epoch. The
median step time is reported beside it. TRL is skipped with a message when not installed. Rows go to
bench/results.jsonl.
"""

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import append_rows

WORDS = ("the sea kept a ledger of every ship that passed and on the last page in a hand that was not his someone "
         "had written the name of a ship that would not be built for a hundred years storm lantern rope bell harbour "
         "gull salt night morning letter map keeper silence wind").split()


def synthetic_pairs(n, min_len, max_len, seed):
    rng = random.Random(seed)

    def text(tokens):
        return " ".join(rng.choice(WORDS) for _ in range(max(1, tokens)))

    return [{"prompt": text(rng.randint(min_len, max_len) // 3), "chosen": text(rng.randint(min_len, max_len) // 3),
             "rejected": text(rng.randint(min_len, max_len) // 3), "weight": rng.uniform(0, 2)} for _ in range(n)]


def peak_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def epoch_tokens(model, data):
    """Real tokens of one epoch: prompt+chosen and prompt+rejected of every pair, as ddpo.train tokenises them."""
    from ddpo.data import load_pairs, tokenize_pairs
    from ddpo.models import load_tokenizer

    pairs = load_pairs(data)
    tokenize_pairs(pairs, load_tokenizer(model), 0, 0)
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def summary(times, tokens):
    return {"tokens_per_s": tokens / sum(times), "step_s": statistics.median(times), "epoch_s": sum(times),
            "peak_gb": peak_gb()}


def run_ours(args, data, out):
    from ddpo.train import parse_args, train

    cfg = parse_args(["--model", args.model, "--data", data, "--output-dir", out, "--loss", "ddpo",
                      "--batch-size", str(args.pairs_per_step), "--epochs", "2", "--max-length", "0",
                      "--max-prompt-length", "0", "--lr", "1e-6", "--keep-checkpoints", "1"])
    train(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][args.steps:]  # the second epoch
    tokens = epoch_tokens(args.model, data)
    counted = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)  # the trainer's own count of the epoch
    assert math.isclose(counted, tokens, rel_tol=1e-6), (counted, tokens)
    return summary([r["step_time_s"] for r in rows], tokens)


def run_trl(args, data, out):
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from ddpo.models import resolve

    path = resolve(args.model)
    with open(data) as f:
        rows = [json.loads(line) for line in f]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    config = trl.DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs_per_step, num_train_epochs=2,
                           learning_rate=1e-6, beta=0.1, logging_steps=1, report_to="none", save_strategy="no",
                           max_length=None, bf16=False, gradient_checkpointing=False,  # TRL's default is on
                           use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=config,
                             ref_model=AutoModelForCausalLM.from_pretrained(path),
                             train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
                             processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Clock()])
    trainer.train()
    assert len(times) == 2 * args.steps, len(times)
    return summary(times[args.steps:], epoch_tokens(args.model, data))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--pairs-per-step", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--steps", type=int, default=4, help="steps per epoch (two epochs: warm-up, timed)")
    ap.add_argument("--impl", choices=["ours", "trl"], help="internal: run one trainer in this process")
    ap.add_argument("--data", help="internal")
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()
    if args.impl:
        with tempfile.TemporaryDirectory() as tmp:
            result = (run_ours if args.impl == "ours" else run_trl)(args, args.data, tmp)
        print("RESULT " + json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            for row in synthetic_pairs(args.pairs_per_step * args.steps, args.min_len, args.max_len, 0):
                f.write(json.dumps(row) + "\n")
        results = {}
        for impl in ("ours", "trl"):
            if impl == "trl":
                try:
                    import trl  # noqa: F401
                except ImportError:
                    print("trl not installed: skipping the TRL row")
                    continue
            argv = [sys.executable, "-m", "bench.train_step", "--impl", impl, "--data", data, *sys.argv[1:]]
            proc = subprocess.run(argv, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{impl} failed:\n{proc.stderr[-3000:]}")
            results[impl] = json.loads(line[7:])
    from ddpo.models import load_model

    params = sum(p.numel() for p in load_model(args.model).parameters())
    floor_gb = 5 * 4 * params / 2**30  # fp32 policy, reference, gradients, AdamW exp_avg and exp_avg_sq
    rows = [{"bench": "train_step", "impl": impl, "model": args.model, "pairs_per_step": args.pairs_per_step,
             "steps_per_epoch": args.steps, "lengths": [args.min_len, args.max_len], "state_floor_gb": floor_gb, **r}
            for impl, r in results.items()]
    append_rows(args.out, rows)
    for r in rows:
        print(f"{r['impl']:>5}: {r['tokens_per_s']:.1f} tokens/s, epoch {r['epoch_s']:.1f} s, median {r['step_s']:.2f} s/step, "
              f"peak {r['peak_gb']:.2f} GB")
    print(f"training state alone ({params / 1e6:.1f}M parameters x 4 bytes x 5: policy, reference, gradients, AdamW "
          f"m and v): {floor_gb:.2f} GB")
    if "trl" in results:
        o, t = results["ours"], results["trl"]
        print(f"ours / trl: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, {o['peak_gb'] / t['peak_gb']:.2f}x peak memory")


if __name__ == "__main__":
    main()
