"""The minimum-weight ablation: 4 responses per prompt, DDPO-both with and without a minimum chosen weight of 0.2.

    python experiments/min_weight.py --work-dir runs/exp-minw
"""

from ddpo.pipeline import Arm, parse_args, run_arms

ARMS = {
    "dpo": Arm("dpo"),
    "ddpo-both": Arm("ddpo", ["--deviation", "both"]),
    "ddpo-both-min0.2": Arm("ddpo", ["--deviation", "both", "--min-weight", "0.2"]),
}

if __name__ == "__main__":
    cfg = parse_args()
    cfg.n = 4
    if cfg.work_dir == "runs/pipeline":
        cfg.work_dir = "runs/exp-minw"
    run_arms(cfg, ARMS)
