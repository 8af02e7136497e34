"""Sampling throughput: ddpo.generate against its code of an earlier revision and against transformers' generate.

    python -m bench.generate                                  # 8 prompts x 4 samples x 128 tokens, SmolLM2-135M, CPU
    python -m bench.generate --prompts 16 --batch-prompts 4 16 --max-new-tokens 256 --baseline-rev 96e8c9a
    python -m bench.generate --batch-prompts 16 --dtypes float32 bfloat16 --impls ours before

Every implementation samples the same prompts (the first --prompts of the packaged eval split, chat template) with
the paper's settings (temperature 1, top-k 50, top-p 0.95, repetition penalty 1.1), N samples per prompt, in batches
of --batch-prompts prompts (x N rows), with the same model object:
  ours       ddpo.generate.generate_batch of the working tree, with the model in segment attention as ddpo.generate
  before     ddpo/generate.py of --baseline-rev (read with `git show`, imported beside ours): today's code
  hf         transformers' model.generate(do_sample=True, num_return_sequences=N, the same settings)
Each runs under each of --dtypes (bfloat16: bf16 autocast, as ddpo.generate's --dtype). Tokens/s = tokens sampled
(up to and including each sample's stop token) / wall time, the implementations taking turns --repeats times
(medians), so that they share the machine's state. Rows go to bench/results.jsonl.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import append_rows
from ddpo import generate
from ddpo.malloc import keep_freed_memory
from ddpo.models import load_model, load_tokenizer, use_segment_attention


def load_revision(rev):
    """ddpo/generate.py of git revision `rev` as a module (it imports the working tree's ddpo for the rest)."""
    source = subprocess.run(["git", "show", f"{rev}:ddpo/generate.py"], capture_output=True, text=True,
                            check=True).stdout
    path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    path.write(source)
    path.close()
    spec = importlib.util.spec_from_file_location("generate_before", path.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_tokens(tokenizer, texts):
    """Tokens sampled, counted the same way for every implementation: the tokens of each response text plus its stop
    token (texts are what ddpo.generate writes: cut at the stop token, special tokens dropped, stripped)."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


def run_module(module, model, tokenizer, prompts, s, batch_prompts):
    """Sample every prompt with a generate module's generate_batch; returns the tokens it sampled."""
    tokens = 0
    for index, start in enumerate(range(0, len(prompts), batch_prompts)):
        rows = [module.render_prompt(tokenizer, p) for p in prompts[start:start + batch_prompts]]
        texts = module.generate_batch(model, tokenizer, rows, s, torch.Generator().manual_seed(index))
        tokens += text_tokens(tokenizer, [t for per_prompt in texts for t in per_prompt])
    return tokens


def run_hf(model, tokenizer, prompts, s, batch_prompts):
    stop, tokens = generate.stop_ids(model, tokenizer), 0
    for start in range(0, len(prompts), batch_prompts):
        rows = [generate.render_prompt(tokenizer, p) for p in prompts[start:start + batch_prompts]]
        T = max(len(r) for r in rows)
        ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(r)) + r for r in rows])  # left-padded, as ours
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=s.temperature,
                                 top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                                 max_new_tokens=s.max_new_tokens, num_return_sequences=s.n,
                                 pad_token_id=tokenizer.pad_token_id)
        texts = [tokenizer.decode(seq[:next((i for i, t in enumerate(seq) if t in stop), len(seq))],
                                  skip_special_tokens=True).strip() for seq in out[:, T:].tolist()]
        tokens += text_tokens(tokenizer, texts)
    return tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8, help="prompts of the packaged eval split")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-prompts", type=int, nargs="+", default=[4], help="prompts per batch; one row per value")
    ap.add_argument("--baseline-rev", default="96e8c9a", help="git revision of 'before' (2026-11-23's start)")
    ap.add_argument("--impls", nargs="+", default=["ours", "before", "hf"], choices=["ours", "before", "hf"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="autocast dtypes to run under; ratios are to 'before' in the first")
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()

    with open("ddpo/data/prompts_eval.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:args.prompts]
    keep_freed_memory()  # as the commands do; one process, so for every implementation alike
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    ours = load_model(args.model).eval()
    use_segment_attention(ours)  # as ddpo.generate samples; 'before' and 'hf' keep transformers' sdpa
    s = generate.Sampling(n=args.n, max_new_tokens=args.max_new_tokens)
    before = load_revision(args.baseline_rev) if "before" in args.impls else None
    run = {"ours": lambda b: run_module(generate, ours, tokenizer, prompts, s, b),
           "before": lambda b: run_module(before, model, tokenizer, prompts, s, b),
           "hf": lambda b: run_hf(model, tokenizer, prompts, s, b)}
    rows = []
    for batch_prompts in args.batch_prompts:
        rates = {(impl, dtype): [] for dtype in args.dtypes for impl in args.impls}
        for _ in range(args.repeats):
            for impl, dtype in rates:  # taking turns
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    tokens = run[impl](batch_prompts)
                rates[impl, dtype].append(tokens / (time.perf_counter() - t0))
        for (impl, dtype), r in rates.items():
            rows.append({"bench": "generate", "impl": impl, "dtype": dtype, "model": args.model,
                         "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                         "batch_prompts": batch_prompts, "threads": torch.get_num_threads(),
                         "tokens_per_s": statistics.median(r), "all": r})
            print(f"batch {batch_prompts} x {args.n}: {impl:7s} {dtype:8s} {statistics.median(r):7.1f} tokens/s  {r}",
                  flush=True)
    append_rows(args.out, rows)
    base = {r["batch_prompts"]: r["tokens_per_s"] for r in rows
            if (r["impl"], r["dtype"]) == ("before", args.dtypes[0])}
    for r in rows:
        if (r["impl"], r["dtype"]) != ("before", args.dtypes[0]) and r["batch_prompts"] in base:
            print(f"batch {r['batch_prompts']}: {r['impl']} {r['dtype']} / before {args.dtypes[0]} = "
                  f"{r['tokens_per_s'] / base[r['batch_prompts']]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
