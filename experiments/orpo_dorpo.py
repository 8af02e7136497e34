"""ORPO vs DORPO in both forms (released: weight inside the sigmoid; per-example: weight on both terms).

    python experiments/orpo_dorpo.py --work-dir runs/exp-orpo
Results: <work-dir>/eval/, with both DORPO forms' paired differences to ORPO.
"""

from ddpo.pipeline import Arm, parse_args, run_arms

ARMS = {
    "orpo": Arm("orpo"),
    "dorpo-released": Arm("dorpo", train=["--dorpo-form", "released"]),
    "dorpo-per-example": Arm("dorpo", train=["--dorpo-form", "per-example"]),
}

if __name__ == "__main__":
    cfg = parse_args()
    if cfg.work_dir == "runs/pipeline":
        cfg.work_dir = "runs/exp-orpo"
    run_arms(cfg, ARMS, baseline="orpo")
