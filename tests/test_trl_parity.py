"""First-step parity with TRL's DPOTrainer (sigmoid loss, dropout off, fp32): loss, logps and rewards within 1e-4.

TRL is in the `test` extra (pip install -e '.[test]'), so CI runs this; it is an oracle, never a dependency of
ddpo/ or kernels/, and the test is skipped only where TRL is missing.
One optimiser step of 2 pairs covers the whole data set, so TRL's shuffle cannot change what is averaged.
"""

import pytest
from conftest import STORIES, make_tiny_model, write_pairs

from ddpo.train import parse_args, train
from test_train import metrics

trl = pytest.importorskip("trl")

KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


@pytest.mark.parametrize("conversational", [True, False], ids=["chat", "plain"])
def test_first_step_equals_trl(tmp_path, tiny_model, tiny_model_plain, conversational):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = tiny_model if conversational else tiny_model_plain
    # a reference that differs from the policy, so that rewards and loss are not trivially 0 and log 2
    ref_path = make_tiny_model(tmp_path / "ref", chat_template=conversational, seed=1)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in STORIES[:2]]
    if conversational:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1,
                         learning_rate=1e-3, beta=0.1, logging_steps=1, report_to="none", use_cpu=True,
                         save_strategy="no", max_length=1024, seed=0,
                         bf16=False)  # TRL defaults to bf16 autocast, which (on CPU) it applies to the reference only
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=args,
                             ref_model=AutoModelForCausalLM.from_pretrained(ref_path),
                             train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(model_path))
    trainer.train()
    theirs = next(h for h in trainer.state.log_history if "rewards/margins" in h)

    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    cfg = parse_args(["--model", model_path, "--data", data, "--output-dir", str(tmp_path / "ours"), "--loss", "dpo",
                      "--ref-model", ref_path,
                      "--batch-size", "2", "--max-steps", "1", "--lr", "1e-3", "--max-prompt-length", "0"])
    train(cfg)
    ours = metrics(cfg.output_dir)[0]
    assert abs(ours["rewards/margins"]) > 1e-3 and abs(ours["loss"] - 0.6931) > 1e-3
    for key in KEYS:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours[key], theirs[key])
