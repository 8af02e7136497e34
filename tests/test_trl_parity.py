"""First-step parity with TRL (dropout off, fp32): loss, logps and rewards within 1e-4 relative, for every loss TRL
1.16 has: DPOTrainer's sigmoid (dpo), ipo, hinge, robust, sigmoid + sft (rpo), sft, aot (cdpo, see below), and
CPOTrainer's simpo.

TRL is in the `test` extra (pip install -e '.[test]'), so CI runs this; it is an oracle, never a dependency of
ddpo/ or kernels/, and the test is skipped only where TRL is missing.
One optimiser step covers the whole data set, so TRL's shuffle cannot change what is averaged.
"""

import pytest
from conftest import STORIES, make_tiny_model, write_pairs

from ddpo.train import parse_args, train
from conftest import metrics

pytestmark = pytest.mark.slow  # TRL as the oracle: python -m pytest -m 'not slow' skips them

trl = pytest.importorskip("trl")

KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def trl_rows(stories, conversational):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in stories]
    if conversational:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    return rows


def first_step(trainer):
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)  # step 1's row (the summary has "train_loss")


def ours(tmp_path, model_path, rows, *flags, ref_path=None):
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    # --max-steps, --lr, --max-prompt-length and --dtype as TRL's, below
    cfg = parse_args(["--model", model_path, "--data", data, "--output-dir", str(tmp_path / "ours"),
                      *(["--ref-model", ref_path] if ref_path else []), "--batch-size", str(len(rows)),
                      "--max-steps", "1", "--lr", "1e-3", "--max-prompt-length", "0", "--dtype", "float32", *flags])
    train(cfg)
    return metrics(cfg.output_dir)[0]


def assert_parity(mine, theirs, keys):
    for key in keys:
        assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, mine[key], theirs[key])


# The chosen responses of RPO's and SFT's pairs have equal token counts (the byte-level tokenizer: equal lengths in
# bytes): TRL's NLL term is a token mean over the whole batch, ours the mean of per-pair token means; equal then.
EQUAL_CHOSEN = [(p, c[:44], r) for p, c, r in STORIES[:2]]

DPO_CASES = {  # ddpo --loss: (TRL's DPOConfig fields, our flags, pairs, the metrics compared)
    "dpo": ({"loss_type": ["sigmoid"]}, [], STORIES[:2], KEYS),
    "ipo": ({"loss_type": ["ipo"]}, [], STORIES[:2], KEYS),
    "hinge": ({"loss_type": ["hinge"]}, [], STORIES[:2], KEYS),
    "robust": ({"loss_type": ["robust"], "label_smoothing": 0.2}, ["--label-smoothing", "0.2"], STORIES[:2], KEYS),
    "rpo": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, ["--rpo-alpha", "0.5"], EQUAL_CHOSEN, KEYS),
    # TRL 1.16's sigmoid has no label smoothing any more; its "aot" is cDPO's formula on margins sorted over the
    # batch, which for a batch of one pair is cDPO itself
    "cdpo": ({"loss_type": ["aot"], "label_smoothing": 0.2}, ["--label-smoothing", "0.2"], STORIES[:1], KEYS),
    "sft": ({"loss_type": ["sft"]}, [], EQUAL_CHOSEN, ["loss"]),  # TRL logs summed logps/chosen, we the mean
}


@pytest.mark.parametrize("loss, conversational", [("dpo", True), ("dpo", False), *[(name, True) for name in DPO_CASES
                                                                                   if name != "dpo"]],
                         ids=lambda v: {True: "chat", False: "plain"}.get(v, v) if isinstance(v, bool) else v)
def test_first_step_equals_trl_dpo_trainer(tmp_path, tiny_model, tiny_model_plain, loss, conversational):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trl_fields, flags, stories, keys = DPO_CASES[loss]
    model_path = tiny_model if conversational else tiny_model_plain
    # a reference that differs from the policy, so that rewards and loss are not trivially 0 and log 2
    ref_path = make_tiny_model(tmp_path / "ref", chat_template=conversational, seed=1)
    rows = trl_rows(stories, conversational)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_steps=1,
                         learning_rate=1e-3, beta=0.1, logging_steps=1, report_to="none", use_cpu=True,
                         save_strategy="no", max_length=1024, seed=0, **trl_fields,
                         bf16=False)  # TRL defaults to bf16 autocast, which (on CPU) it applies to the reference only
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path, use_kernels=False), args=args,
                             ref_model=AutoModelForCausalLM.from_pretrained(ref_path, use_kernels=False),
                             train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(model_path))
    theirs = first_step(trainer)
    if stories is EQUAL_CHOSEN:
        counts = [len(ids) for ids in trainer.train_dataset["chosen_ids"]]
        assert counts[0] == counts[1], counts
    mine = ours(tmp_path, model_path, rows, "--loss", loss, *flags, ref_path=ref_path)
    assert abs(mine["loss"] - 0.6931) > 1e-3
    if "rewards/margins" in keys:
        assert abs(mine["rewards/margins"]) > 1e-3
    assert_parity(mine, theirs, keys)


def test_first_step_equals_trl_cpo_trainer_simpo(tmp_path, tiny_model_plain):
    """SimPO is CPOTrainer's loss_type="simpo" with cpo_alpha=0 (no NLL term): its logps are per-token means.
    Plain text: CPOTrainer tokenises chat data its own way (its EOS after the template's), DPOTrainer as we do."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    rows = trl_rows(STORIES[:2], conversational=False)
    args = CPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3,
                     loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, logging_steps=1, report_to="none",
                     use_cpu=True, save_strategy="no", max_length=1024, seed=0, bf16=False)
    trainer = CPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_plain, use_kernels=False), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_plain))
    theirs = first_step(trainer)
    mine = ours(tmp_path, tiny_model_plain, rows, "--loss", "simpo", "--beta", "2.0", "--simpo-gamma", "0.5")
    assert abs(mine["rewards/margins"]) > 1e-3
    assert_parity(mine, theirs, KEYS)
