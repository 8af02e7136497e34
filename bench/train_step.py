"""A full DDPO training step: tokens per second and peak memory, ddpo.train against TRL's DPOTrainer.

    python -m bench.train_step --model packaged:smollm2-135m-instruct --pairs-per-step 2 --min-len 50 --max-len 400
    /tmp/trlenv/bin/python -m bench.train_step ...      # an environment with TRL adds the TRL row
    python -m bench.train_step --model random:smollm2-135m --dtype bfloat16 --pairs-per-step 8   # on a GPU

Synthetic pairs with drawn lengths (prompt, chosen and rejected each uniform in [min-len, max-len] / 3 words, so
pairs span min-len..max-len tokens). Both trainers: same model, data, batch, --dtype (fp32, or bf16 autocast over
fp32 weights), dropout off, a live reference model (no precomputation), no gradient checkpointing; with Liger-Kernel
installed, TRL runs a second time with Liger's layer kernels (use_liger_kernel). Ours keeps freed memory
(ddpo/malloc.py), as `python -m ddpo.train` does: faster, at a higher peak RSS; TRL runs with glibc's defaults, as its
users do. Each runs in its own subprocess
(peak RSS, or CUDA peak allocation, is per process) for two epochs over --steps x --pairs-per-step pairs: the
first epoch is the warm-up, the second is timed. As each trainer shuffles in its own order, per-step token counts
differ between them, but every epoch holds the same pairs: tokens/s = the epoch's real (non-padding) tokens of the
prompt+chosen and prompt+rejected sequences, counted once with our tokenisation, / the summed step times of the
timed epoch. The median step time is reported beside it. TRL (or Liger) is skipped with a message when not
installed. Rows go to bench/results.jsonl.

--model random:smollm2-135m (or random:tiny) builds a Llama of that shape with random weights and a word-level
tokenizer over the synthetic text's words (one token a word), with a ChatML template: no hub and no package needed,
for a machine that reaches neither (a step's time does not depend on the weights' values).
"""

import argparse
import importlib.util
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


SHAPES = {  # --model random:<shape>
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_model(shape, path):
    """A Llama of SHAPES[shape] (SmolLM2's tied embeddings and RoPE base) with random weights, and a word-level
    tokenizer over WORDS, saved to path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "user", "assistant", *sorted(set(WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="[UNK]")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


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
    from ddpo.malloc import keep_freed_memory
    from ddpo.train import parse_args, train

    keep_freed_memory()  # as python -m ddpo.train does (TRL runs with glibc's defaults, as its users do)

    cfg = parse_args(["--model", args.model, "--data", data, "--output-dir", out, "--loss", "ddpo",
                      "--dtype", args.dtype, "--batch-size", str(args.pairs_per_step), "--epochs", "2",
                      "--max-length", "0", "--max-prompt-length", "0", "--lr", "1e-6", "--keep-checkpoints", "1"])
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
                           max_length=None, bf16=args.dtype == "bfloat16", use_liger_kernel=args.impl == "trl-liger",
                           gradient_checkpointing=False,  # TRL's default is on
                           use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, use_kernels=False), args=config,
                             ref_model=AutoModelForCausalLM.from_pretrained(path, use_kernels=False),
                             train_dataset=Dataset.from_list(
                                 [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
                             processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Clock()])
    trainer.train()
    assert len(times) == 2 * args.steps, len(times)
    return summary(times[args.steps:], epoch_tokens(args.model, data))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct",
                    help="hub name, directory, packaged:<name> or random:<shape> (" + ", ".join(SHAPES) + ")")
    ap.add_argument("--pairs-per-step", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--steps", type=int, default=4, help="steps per epoch (two epochs: warm-up, timed)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both trainers: fp32, or bf16 autocast over fp32 weights (ddpo.train --dtype, TRL's bf16)")
    ap.add_argument("--impl", choices=["ours", "trl", "trl-liger"], help="internal: run one trainer in this process")
    ap.add_argument("--data", help="internal")
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()
    if args.model.startswith("random:") and args.model[7:] not in SHAPES:
        ap.error(f"--model {args.model}: known shapes are {', '.join(SHAPES)}")
    if args.impl:
        with tempfile.TemporaryDirectory() as tmp:
            result = (run_ours if args.impl == "ours" else run_trl)(args, args.data, tmp)
        print("RESULT " + json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model.startswith("random:"):
            model = os.path.join(tmp, "model")
            random_model(args.model.split(":", 1)[1], model)
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            for row in synthetic_pairs(args.pairs_per_step * args.steps, args.min_len, args.max_len, 0):
                f.write(json.dumps(row) + "\n")
        impls = ["ours"]
        if importlib.util.find_spec("trl") is None:
            print("trl not installed: skipping the TRL rows")
        else:
            impls.append("trl")
            if importlib.util.find_spec("liger_kernel") is None:
                print("liger-kernel not installed: skipping the TRL + Liger row")
            else:
                impls.append("trl-liger")
        results = {}
        for impl in impls:
            argv = [sys.executable, "-m", "bench.train_step", *sys.argv[1:], "--impl", impl, "--data", data,
                    "--model", model]
            proc = subprocess.run(argv, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:  # the others still run and keep their rows; the exit status is 1
                print(f"{impl} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            results[impl] = json.loads(line[7:])
        from ddpo.models import load_model

        params = sum(p.numel() for p in load_model(model).parameters())
    floor_gb = 5 * 4 * params / 2**30  # fp32 policy, reference, gradients, AdamW exp_avg and exp_avg_sq
    rows = [{"bench": "train_step", "impl": impl, "model": args.model, "dtype": args.dtype,
             "pairs_per_step": args.pairs_per_step, "steps_per_epoch": args.steps,
             "lengths": [args.min_len, args.max_len], "state_floor_gb": floor_gb, **r}
            for impl, r in results.items()]
    append_rows(args.out, rows)
    for r in rows:
        print(f"{r['impl']:>9}: {r['tokens_per_s']:.1f} tokens/s, epoch {r['epoch_s']:.1f} s, "
              f"median {r['step_s']:.2f} s/step, peak {r['peak_gb']:.2f} GB")
    print(f"training state alone ({params / 1e6:.1f}M parameters x 4 bytes x 5: policy, reference, gradients, AdamW "
          f"m and v): {floor_gb:.2f} GB")
    for impl, t in results.items():
        if impl != "ours" and "ours" in results:
            o = results["ours"]
            print(f"ours / {impl}: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, "
                  f"{o['peak_gb'] / t['peak_gb']:.2f}x peak memory")
    if len(results) < len(impls):
        raise SystemExit(f"failed: {', '.join(i for i in impls if i not in results)}")


if __name__ == "__main__":
    main()
