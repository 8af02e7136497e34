"""DPO vs DDPO-sem vs DDPO-sty vs DDPO-both vs DivPO: same responses, seed, steps and sampling for every arm.

    python experiments/compare_methods.py                                  # offline default, 2 CPU cores
    python experiments/compare_methods.py --train-prompts 130 --eval-prompts 32 --n 8 --steps 60   # larger
    python experiments/compare_methods.py --model meta-llama/Llama-3.1-8B-Instruct --train-prompts 130 \
        --eval-prompts 32 --n 8 --steps 200 --lr 5e-6 --max-new-tokens 512 --work-dir runs/exp-8b \
        --train-flags="--lora-r 128 --lora-alpha 256 --gradient-checkpointing"   # one GPU; not yet run
Results: <work-dir>/eval/report.md, plot.png and <arm>.metrics.json.
"""

from ddpo.pipeline import Arm, parse_args, run_arms

ARMS = {
    "dpo": Arm("dpo"),
    "ddpo-sem": Arm("ddpo", ["--deviation", "semantic"]),
    "ddpo-sty": Arm("ddpo", ["--deviation", "style"]),
    "ddpo-both": Arm("ddpo", ["--deviation", "both"]),
    "divpo": Arm("dpo", ["--deviation", "both", "--pairing", "divpo"]),  # the released baseline: both metrics
}

if __name__ == "__main__":
    cfg = parse_args()
    if cfg.work_dir == "runs/pipeline":
        cfg.work_dir = "runs/exp-methods"
    run_arms(cfg, ARMS, include_start=True)
