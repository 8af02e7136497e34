"""The first GPU run (issue #13, item 5) in one command, at most 9.5 minutes on one H100.

    python -m bench.gpu                            # every stage; rows appended to bench/results.jsonl
    python -m bench.gpu --stages head-128k train   # some of them
    python -m bench.gpu --cpu-smoke                # every stage at tiny sizes on CPU: checks this script, keeps no rows

On a machine with its own torch and no network, install the repo first without touching its packages (kernels/ is
imported as ddpo_kernels only once installed): pip install --no-deps --no-build-isolation -e .

Each stage is a subprocess (its own CUDA context and peak memory) with a time budget: its own plus whatever the
stages before it left unused, so the run ends within the budgets' sum (570 s). A stage that fails or runs out of time
is reported and the others go on; the exit status is then 1.
  tests      pytest tests/test_logprobs_kernel.py tests/test_deviation_kernel.py tests/test_kernels_compile.py:
             with CUDA, tests/conftest.py puts them on the GPU, with the Triton kernels compiled for it (forward and
             every gradient against the PyTorch reference)
  head-49k   bench.kernels: the log-prob head's forward+backward at 8 pairs x 1024 tokens (N 16,384), bf16,
             V 49,152 and H 576 (SmolLM2): ours, eager, torch.compile, Liger (when installed) and the bare output
             matmul (the floor); do_bench medians over 1 s of calls, peak memory above the inputs
  head-128k  the same at 8,192 tokens, V 128,256 and H 4,096 (Llama-3-8B), where the floor's three bf16 matmuls
             (logits, dX, dW) take about 38 ms on an H200 by published cuBLAS figures: the head's ratio to them
  deviation  bench.kernels: the fused deviation loss against eager, 8 and 4,096 pairs in groups of 8, D 1,024
  train      bench.train_step: tokens/s and peak memory of ddpo.train against TRL's DPOTrainer, and TRL with Liger's
             kernels, when installed; bf16 autocast, 8 pairs per step of 100-1,000 tokens, on a model of
             SmolLM2-135M's shape with random weights (random:smollm2-135m: no hub or model package needed)
  online     bench.online: ddpo.online rounds against TRL's OnlineDPOTrainer at its setting (2 samples a prompt),
             32 prompts a round, 128 new tokens, bf16, random:smollm2-135m; seconds per round by stage
The closing Markdown table, with its heading, is for bench/RESULTS.md.
"""

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from bench.common import append_rows, environment
from bench.kernels import shape

KERNEL_TESTS = ["tests/test_logprobs_kernel.py", "tests/test_deviation_kernel.py", "tests/test_kernels_compile.py"]


def stages(smoke):
    """{name: (budget in seconds, argv)}; the bench stages also get --out FILE. Tiny sizes and two tests when smoke."""
    kernels = [sys.executable, "-m", "bench.kernels", "--dtype", "bfloat16", "--rep-ms", "1000",
               "--tokens", "64" if smoke else str(8 * 1024 * 2)]

    def head(V, H, tokens=None):
        return kernels + ["--vocab", str(V), "--hidden", str(H), "--deviation-pairs"] + (
            ["--tokens", str(tokens)] if tokens and not smoke else [])

    train = ["--model", "random:tiny", "--pairs-per-step", "2", "--steps", "2", "--min-len", "10", "--max-len", "40"] \
        if smoke else ["--model", "random:smollm2-135m", "--pairs-per-step", "8", "--steps", "8", "--min-len", "100",
                       "--max-len", "1000"]
    return {
        "tests": (180, [sys.executable, "-m", "pytest", "-q", *KERNEL_TESTS]
                  + (["-k", "worked_example or all_ignored"] if smoke else [])),
        "head-49k": (60, head(512, 32) if smoke else head(49152, 576)),
        "head-128k": (75, head(1024, 64) if smoke else head(128256, 4096, tokens=8192)),
        "deviation": (25, kernels + ["--vocab", "--deviation-pairs", "8", *([] if smoke else ["4096"])]),
        "train": (140, [sys.executable, "-m", "bench.train_step", "--dtype", "bfloat16", *train]),
        "online": (90, [sys.executable, "-m", "bench.online", "--dtypes", "bfloat16", "--semantic-embedder",
                        "stylometric", "--model", "random:tiny" if smoke else "random:smollm2-135m",
                        *(["--rounds", "2", "--prompts-per-round", "2", "--max-new-tokens", "8"] if smoke else
                          ["--rounds", "4", "--prompts-per-round", "32", "--max-new-tokens", "128"])]),
    }


def run(argv, seconds):
    """Run argv in a new process group, echoing its output; after `seconds` the group (with any trainer subprocess
    it started) is killed. Returns (exit code, output lines)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def kill():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
    finally:
        timer.cancel()
        kill()  # what the stage left running, or all of it on Ctrl-C
    return proc.returncode, lines


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def table_row(r):
    """bench | impl | shape | time | rate | peak memory, for every kind of row."""
    if r["bench"] == "kernel_tests":
        return [r["bench"], "pytest", ", ".join(os.path.basename(f) for f in r["files"]), f"{r['seconds']:.0f} s",
                r["summary"], "-"]
    if r["bench"] == "online":
        return [r["bench"], r["impl"], f"{r['model']}, {r['prompts_per_round']} prompts/round x {r['max_new_tokens']} "
                f"tokens, {r['dtype']}", f"{r['round_s']:.2f} s/round", f"{r['prompts_per_s']:.2f} prompts/s", "-"]
    if r["bench"] == "train_step":
        return [r["bench"], r["impl"], f"{r['model']}, {r['pairs_per_step']} pairs/step of {r['lengths'][0]}-"
                f"{r['lengths'][1]} tokens, {r['dtype']}", f"{r['step_s'] * 1e3:.0f} ms/step",
                f"{r['tokens_per_s']:,.0f} tokens/s", f"{r['peak_gb']:.2f} GB"]
    return [r["bench"], r["impl"], shape(r), f"{r['ms_median']:.2f} ms ({r['ms_p20']:.2f}-{r['ms_p80']:.2f})",
            f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else "-",
            "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f} MiB"]


def main():
    plan = stages(smoke=False)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", choices=list(plan), default=list(plan), help="the stages to run, in order")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="every stage at tiny sizes, in seconds on CPU: checks this script, not the kernels' speed")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every stage's time budget ("
                    + ", ".join(f"{name} {budget} s" for name, (budget, _) in plan.items()) + ")")
    ap.add_argument("--out", help="append the rows here (default: bench/results.jsonl; with --cpu-smoke: nowhere)")
    args = ap.parse_args()
    if not (torch.cuda.is_available() or args.cpu_smoke):
        ap.error("no CUDA device: the full sizes are for a GPU (--cpu-smoke checks the script)")
    out = args.out or (None if args.cpu_smoke else "bench/results.jsonl")
    plan = stages(args.cpu_smoke)
    start = deadline = time.monotonic()
    rows, failed, seconds = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stages:
            budget, argv = plan[name]
            deadline += budget * args.budget_scale
            stage_out = os.path.join(tmp, name + ".jsonl")
            argv = argv if name == "tests" else argv + ["--out", stage_out]
            print(f"\n=== {name} (at most {deadline - time.monotonic():.0f} s): {' '.join(argv)}", flush=True)
            t = time.monotonic()
            code, lines = run(argv, max(deadline - t, 1))
            seconds[name] = time.monotonic() - t
            if name == "tests":
                summary = next((l.strip() for l in reversed(lines) if re.search(r"\d+ (passed|failed|error)", l)),
                               None)
                stage_rows = [{"bench": "kernel_tests", "files": KERNEL_TESTS, "summary": summary,
                               "seconds": seconds[name]}] if summary else []
            else:  # a stage that was stopped may still have written its rows
                stage_rows = [json.loads(line) for line in open(stage_out)] if os.path.exists(stage_out) else []
            if code != 0:
                ran_out = time.monotonic() >= deadline
                why = f"out of time after {seconds[name]:.0f} s" if ran_out else f"exit status {code}"
                failed.append((name, why))
                print(f"=== {name} FAILED: {why}", flush=True)
            if out and stage_rows:
                append_rows(out, stage_rows)
            rows += stage_rows
    env = environment()
    print(f"\n## {env['date'][:10]} — {env['device']}, torch {env['torch']}, triton {env['triton']}, transformers "
          f"{version('transformers')}, trl {version('trl')}, liger-kernel {version('liger-kernel')}, git {env['git']}")
    print(f"\n`{' '.join(['python -m bench.gpu', *sys.argv[1:]])}`: {time.monotonic() - start:.0f} s ("
          + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()) + ")")
    print("\n| bench | impl | shape | time | rate | peak memory |\n|---|---|---|---|---|---|")
    for cells in [table_row(r) for r in rows] + [[name, "FAILED", why, "-", "-", "-"] for name, why in failed]:
        print("| " + " | ".join(cells) + " |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
