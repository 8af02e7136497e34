"""Responses per prompt, 4 vs 8: the 4-response pools are the first 4 samples of the 8-response pools.

    python experiments/responses_per_prompt.py --work-dir runs/exp-n
"""

import dataclasses
import json
import os

from ddpo.pipeline import Arm, first_prompts, parse_args, run_arms, sample

if __name__ == "__main__":
    cfg = parse_args()
    if cfg.work_dir == "runs/pipeline":
        cfg.work_dir = "runs/exp-n"
    os.makedirs(cfg.work_dir, exist_ok=True)
    prompts = first_prompts("train", cfg.train_prompts, os.path.join(cfg.work_dir, "prompts_train.jsonl"))
    pool8 = sample(cfg, cfg.model, prompts, os.path.join(cfg.work_dir, "responses8.jsonl"), n=8)
    pool4 = os.path.join(cfg.work_dir, "responses4.jsonl")
    with open(pool8) as f, open(pool4, "w") as out:
        out.writelines(line for line in f if json.loads(line)["sample"] < 4)
    for n, pool in ((4, pool4), (8, pool8)):
        sub = dataclasses.replace(cfg, work_dir=os.path.join(cfg.work_dir, f"n{n}"))
        run_arms(sub, {f"dpo-n{n}": Arm("dpo"), f"ddpo-both-n{n}": Arm("ddpo")}, responses=pool, baseline=f"dpo-n{n}")
