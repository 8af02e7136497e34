"""Online preference tuning: seconds per round and prompts/s, ddpo.online against TRL's OnlineDPOTrainer.

    python -m bench.online                                       # packaged SmolLM2-135M, fp32 and bf16, this CPU
    python -m bench.online --dtypes bfloat16 --rounds 6 --prompts-per-round 8 --max-new-tokens 64
    python -m bench.online --model random:smollm2-135m          # no package needed

TRL's setting, for both: 2 samples per prompt (OnlineDPOTrainer's), ranked by one reward (ddpo's proxy score, a
function for TRL) into one pair a prompt (ddpo.online --n 2 --pairing best-worst), sigmoid DPO (--loss dpo
--deviation none) against a frozen copy of the start model, one optimiser step a round of --prompts-per-round
prompts (TRL: per_device_train_batch_size), the same sampling (temperature 1, top-k 50, top-p 0.95, repetition
penalty 1.1, --max-new-tokens, no minimum length), the same --dtype (fp32, or bf16 autocast: TRL's bf16=True),
dropout off, no gradient checkpointing. Each runs in its own subprocess for --rounds rounds; the first is warm-up and
the rest are timed: prompts/s = timed rounds x prompts a round / their summed wall time (TRL: a callback's step
times, which hold its generation, reward and update). Our rows also split a round into sampling, scoring and
embedding, and training. A last row runs ddpo.online's defaults (--n 4, gap pairs, DDPO with both deviations) for
its per-stage seconds. TRL is skipped with a message when not installed. Rows go to bench/results.jsonl.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import append_rows
from bench.train_step import SHAPES, random_model

SAMPLING = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
STAGES = ("sample_s", "score_embed_s", "train_s")


def prompts_file(path, count):
    from ddpo.pipeline import prompt_lines

    lines = prompt_lines("train")[:count]
    with open(path, "w") as f:
        f.writelines(lines)
    return [json.loads(line)["prompt"] for line in lines]


def run_ours(args, prompts, model, tmp, defaults=False):
    from ddpo import online

    out = os.path.join(tmp, "ours")
    setting = [] if defaults else ["--n", "2", "--pairing", "best-worst", "--loss", "dpo", "--deviation", "none"]
    online.main(["--model", model, "--prompts", prompts, "--output-dir", out, "--rounds", str(args.rounds),
                 "--prompts-per-round", str(args.prompts_per_round), "--max-new-tokens", str(args.max_new_tokens),
                 "--batch-size", str(2 * args.prompts_per_round), "--dtype", args.dtype, "--save-only-model",
                 "--semantic-embedder", args.semantic_embedder, *setting])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        timed = [json.loads(line) for line in f][1:]
    seconds = sum(sum(r[s] for s in STAGES) for r in timed)
    return {"prompts_per_s": len(timed) * args.prompts_per_round / seconds, "round_s": seconds / len(timed),
            **{s: sum(r[s] for r in timed) / len(timed) for s in STAGES}}


def run_trl(args, prompts, model, tmp):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from ddpo.quality import proxy_score

    def reward(prompts, completions, **_):  # the same proxy score ddpo.online ranks by
        return [proxy_score(c if isinstance(c, str) else c[-1]["content"]) for c in completions]

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.steps.append(time.perf_counter() - self.t0)

    path = model if os.path.isdir(model) else __import__("ddpo.models", fromlist=["resolve"]).resolve(model)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    timer = Timer()
    config = OnlineDPOConfig(output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=args.prompts_per_round,
                             max_steps=args.rounds, max_new_tokens=args.max_new_tokens, learning_rate=5e-6, beta=[0.1],
                             bf16=args.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(), report_to="none",
                             save_strategy="no", gradient_checkpointing=False,  # TRL's default is True
                             logging_steps=1, dataloader_num_workers=0, seed=0, **SAMPLING)
    trainer = OnlineDPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=data,
                               processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    timed = timer.steps[1:]
    return {"prompts_per_s": len(timed) * args.prompts_per_round / sum(timed), "round_s": sum(timed) / len(timed)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct",
                    help="hub name, directory, packaged:<name> or random:<shape> (" + ", ".join(SHAPES) + ")")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=4, help="rounds (TRL: steps); the first is warm-up")
    ap.add_argument("--prompts-per-round", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--semantic-embedder", default="packaged:all-minilm-l6-v2")
    ap.add_argument("--impl", choices=["ours", "trl", "ours-defaults"], help="internal: one run in this process")
    ap.add_argument("--dtype", help="internal")
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()
    if args.impl:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = prompts_file(os.path.join(tmp, "prompts.jsonl"), args.prompts_per_round * args.rounds)
            model = args.model
            if model.startswith("random:"):
                model = os.path.join(tmp, "model")
                random_model(args.model.split(":", 1)[1], model)
            if args.impl == "trl":
                result = run_trl(args, prompts, model, tmp)
            else:
                result = run_ours(args, os.path.join(tmp, "prompts.jsonl"), model, tmp, args.impl == "ours-defaults")
        print("RESULT " + json.dumps(result), flush=True)
        return
    impls = ["ours", "ours-defaults"]
    if importlib.util.find_spec("trl") is None:
        print("trl not installed: skipping the TRL rows")
    else:
        impls.insert(1, "trl")
    rows = []
    for dtype in args.dtypes:
        for impl in impls:
            if impl == "ours-defaults" and dtype != args.dtypes[-1]:
                continue
            argv = [sys.executable, "-m", "bench.online", *sys.argv[1:], "--impl", impl, "--dtype", dtype]
            proc = subprocess.run(argv, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{impl} {dtype} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            rows.append({"bench": "online", "impl": impl, "model": args.model, "dtype": dtype,
                         "rounds": args.rounds, "prompts_per_round": args.prompts_per_round,
                         "max_new_tokens": args.max_new_tokens, **json.loads(line[7:])})
            r = rows[-1]
            stages = ", ".join(f"{s} {r[s]:.1f}" for s in STAGES if s in r)
            print(f"{impl:>13} {dtype}: {r['prompts_per_s']:.3f} prompts/s, {r['round_s']:.1f} s/round"
                  + (f" ({stages})" if stages else ""), flush=True)
    append_rows(args.out, rows)
    by = {(r["impl"], r["dtype"]): r for r in rows}
    for dtype in args.dtypes:
        if ("ours", dtype) in by and ("trl", dtype) in by:
            print(f"ours / trl, {dtype}: {by['ours', dtype]['prompts_per_s'] / by['trl', dtype]['prompts_per_s']:.2f}x "
                  "prompts/s")


if __name__ == "__main__":
    main()
