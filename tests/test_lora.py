"""LoRA: only adapters train, the reference is the base (adapters off), merged weights load in transformers."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ddpo.lora import adapters_disabled, add_lora, merged_copy
from ddpo.models import load_model
from conftest import METRICS, metrics, run


def test_lora_layer_math_and_merge(tiny_model):
    model = load_model(tiny_model)
    ids = torch.tensor([[5, 9, 30, 7]])
    before = model(input_ids=ids).logits
    wrapped = add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert len(wrapped) == 4 and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0: unchanged at start
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3
    with adapters_disabled(model):
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    torch.testing.assert_close(merged_copy(model)(input_ids=ids).logits, after, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(load_model(tiny_model), ["nope"], r=2, alpha=2)


def test_lora_training_checkpoint_and_resume(tmp_path, tiny_model):
    args = ("--loss", "ddpo", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "3", "--save-every", "2")
    full, path = run(tmp_path, tiny_model, *args, name="lora")
    rows = metrics(full.output_dir)
    assert rows[0]["rewards/margins"] == 0.0 and rows[-1]["rewards/margins"] != 0.0  # reference = adapters off
    assert json.load(open(os.path.join(path, "adapter_config.json")))["r"] == 4
    adapter = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    merged = AutoModelForCausalLM.from_pretrained(path).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # only adapted layers move
    # resume from checkpoint-2 gives step 3 of the uninterrupted run
    os.rename(os.path.join(full.output_dir, "checkpoint-3"), tmp_path / "final-3")
    with open(os.path.join(full.output_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:2])
    resumed, _ = run(tmp_path, tiny_model, *args, "--resume", name="lora")
    for key in METRICS:
        assert metrics(resumed.output_dir)[2][key] == pytest.approx(rows[2][key], rel=1e-6, abs=1e-7), key
