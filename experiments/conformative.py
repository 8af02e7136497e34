"""Conformative decoding over a sweep of w: the DPO-tuned model mixed with the model before preference tuning.

    python experiments/conformative.py --work-dir runs/exp-conf --weights 0 0.25 0.5 0.75 1
    python experiments/conformative.py --instruct ~/ddpo-runs/online/dpo/checkpoint-40 --eval-prompts 32
The instruct model is --instruct when given (e.g. an online DPO run's checkpoint); otherwise it is the DPO arm of
the pipeline in the same work dir (trained first if missing; run after compare_methods.py with the same --work-dir
to reuse its responses and DPO checkpoint). The base model is the starting model (--model), as the offline default
has no separate pre-trained base.
Results: <work-dir>/eval-conformative/ (report.md, plot.png, <run>.metrics.json), with paired differences to w=0
(the DPO model alone) when 0 is among the weights.
"""

import argparse
import os

from ddpo import evaluate
from ddpo.pipeline import Arm, first_prompts, parse_args, sample, make_pairs, train_arm

if __name__ == "__main__":
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    extra.add_argument("--instruct", help="the tuned model to mix (default: train the pipeline's DPO arm)")
    sweep, rest = extra.parse_known_args()
    cfg = parse_args(rest)
    if cfg.work_dir == "runs/pipeline":
        cfg.work_dir = "runs/exp-conf"
    os.makedirs(cfg.work_dir, exist_ok=True)
    eval_prompts = first_prompts("eval", cfg.eval_prompts, os.path.join(cfg.work_dir, "prompts_eval.jsonl"))
    instruct = sweep.instruct
    if not instruct:
        train_prompts = first_prompts("train", cfg.train_prompts, os.path.join(cfg.work_dir, "prompts_train.jsonl"))
        responses = sample(cfg, cfg.model, train_prompts, os.path.join(cfg.work_dir, "responses.jsonl"))
        pairs = make_pairs(cfg, responses, ["--deviation", "both"], os.path.join(cfg.work_dir, "pairs.jsonl"))
        instruct = train_arm(cfg, Arm("dpo"), pairs, os.path.join(cfg.work_dir, "dpo"))
    runs = {}
    for w in sweep.weights:
        runs[f"w={w:g}"] = sample(cfg, instruct, eval_prompts, os.path.join(cfg.work_dir, f"samples-w{w:g}.jsonl"),
                                  extra=["--base-model", cfg.model, "--conform-weight", str(w)])
    evaluate.run(evaluate.parse_args([*runs.values(), "--names", *runs, "--semantic-embedder", cfg.semantic_embedder,
                                      "--output-dir", os.path.join(cfg.work_dir, "eval-conformative"),
                                      *(["--baseline", "w=0"] if "w=0" in runs else [])]))  # w = 0: DPO alone
