"""ddpo.train end to end on tiny models: metrics, checkpoints, resume equality, exact accumulation, bad flags and input,
the lock, non-finite steps, resume rules."""

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import write_pairs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ddpo.checkpoint as checkpoint_mod
import ddpo.step as step_mod
import ddpo.train as train_mod
from ddpo.data import DataError, collate, collate_packed, load_pairs, temporary_path, tokenize_pairs
from ddpo.losses import LOSSES
from ddpo.models import (SEGMENT_ATTENTION, autocast_dtype, load_model, load_tokenizer, segment_attention,
                         sequence_logps, use_segment_attention)
from ddpo.train import main, parse_args, train

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "weights/mean", "weights/min", "weights/max"]


def run(tmp_path, tiny_model, *extra, name="run", data=None):
    out = str(tmp_path / name)
    data = data or write_pairs(tmp_path / "pairs.jsonl")
    cfg = parse_args(["--model", tiny_model, "--data", data, "--output-dir", out, "--lr", "1e-3", "--dtype", "float32",
                      *extra])  # fp32 unless a test says: --dtype auto is bf16 on CPUs with native bf16, and tests
    return cfg, train(cfg)  # here compare two paths to ~1e-5


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sequence_logps_equal_full_logits(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model)
    pairs = load_pairs(write_pairs(os.path.join(os.path.dirname(tiny_model), "p.jsonl")))[:3]
    tokenize_pairs(pairs, tok)
    batch = collate(pairs, tok.pad_token_id)
    input_ids, attention_mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    logps, counts = sequence_logps(model, batch, use_triton=False)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (2B, T-1, V)
    targets = labels[:, 1:]
    mask = targets != -100
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps, (token * mask).sum(1), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    packed, packed_counts = sequence_logps(model, collate_packed(pairs), use_triton=False)  # one row, no padding
    assert collate_packed(pairs).tokens == batch.tokens == attention_mask.sum()
    torch.testing.assert_close(packed, logps, rtol=1e-5, atol=1e-4)
    assert packed_counts.tolist() == counts.tolist()


def test_segment_attention_equals_padded_sdpa(tiny_model):
    """Packed rows under segment attention (one sdpa call per sequence, no mask) give the padded sdpa log-probs and
    the same parameter gradients; so do packed rows holding each pair's prompt once (the rejected completion attends
    to the prompt, not to the chosen one), and padded rows under it (the masked branch). The mask step builds no
    mask."""
    tok = load_tokenizer(tiny_model)
    pairs = load_pairs(write_pairs(os.path.join(os.path.dirname(tiny_model), "p.jsonl")))[:3]
    tokenize_pairs(pairs, tok)
    padded_batch, packed_batch = collate(pairs, tok.pad_token_id), collate_packed(pairs)
    shared_batch = collate_packed(pairs, share_prompts=True)
    prompts = sum(len(p.prompt_ids) for p in pairs)
    assert shared_batch.input_ids.numel() == packed_batch.input_ids.numel() - prompts  # each prompt once
    assert shared_batch.tokens == packed_batch.tokens == padded_batch.tokens  # the sequences' tokens, in any layout
    results = []
    for attention, batch in (("sdpa", padded_batch), ("segments", packed_batch), ("segments", shared_batch),
                             ("segments", padded_batch)):
        model = load_model(tiny_model)
        assert model.config._attn_implementation == "sdpa"
        if attention == "segments":
            assert use_segment_attention(model) and model.config._attn_implementation == SEGMENT_ATTENTION
        logps, _ = sequence_logps(model, batch, use_triton=False)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for logps, grads in results[1:]:
        torch.testing.assert_close(logps, results[0][0], rtol=1e-5, atol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-4, atol=1e-5, msg=name)
    q, k, v = torch.randn(3, 1, 4, 9, 8).unbind()  # boundaries from position ids == the lengths sequence_logps passes
    by_positions, _ = segment_attention(None, q, k, v, None, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]]))
    by_lengths, _ = segment_attention(None, q, k, v, None, segments=[(4,), (2,), (3,)])
    torch.testing.assert_close(by_positions, by_lengths)
    torch.testing.assert_close(by_lengths[:, 4:6], F.scaled_dot_product_attention(
        q[:, :, 4:6], k[:, :, 4:6], v[:, :, 4:6], is_causal=True).transpose(1, 2))  # the middle sequence alone
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind()  # rows of equal length, no mask: plain causal attention per row
    out, _ = segment_attention(None, q, k, v, None, position_ids=torch.arange(5).expand(2, 5))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2))


@pytest.mark.parametrize("loss, ref_window, shared", [("dpo", None, True), ("simpo", None, True), ("sft", None, False),
                                                     ("dpo", 4, False)])
def test_pairs_share_their_prompt_where_segment_attention_runs(tmp_path, tiny_model, monkeypatch, loss, ref_window,
                                                               shared):
    """Training's packed batches hold each pair's prompt once when the policy and a frozen reference both run
    segment attention (not for losses without a rejected completion, nor with a reference that keeps its own
    attention, whose batches must be the policy's)."""
    calls = []
    real = step_mod.make_batch
    monkeypatch.setattr(step_mod, "make_batch", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    if ref_window:
        ref = str(tmp_path / "ref")
        model = load_model(tiny_model)
        model.config.sliding_window = ref_window
        model.save_pretrained(ref)
        load_tokenizer(tiny_model).save_pretrained(ref)
    run(tmp_path, tiny_model, "--loss", loss, "--max-steps", "1", *(["--ref-model", ref] if ref_window else []))
    assert calls and set(calls) == {shared}


def test_packing_that_changes_the_log_probs_stops_before_training(tmp_path, tiny_model, monkeypatch):
    """check_packing scores the first pairs packed and padded: a packed layout that reads other tokens (as a model
    that does not honour position ids as boundaries would) stops the run with a message naming the model."""
    import ddpo.reference as reference_mod

    real = reference_mod.collate_packed

    def misread(*args, **kwargs):
        batch = real(*args, **kwargs)
        batch.input_ids = batch.input_ids.flip(-1)
        return batch

    monkeypatch.setattr(reference_mod, "collate_packed", misread)
    with pytest.raises(SystemExit, match=rf"packed and padded log-probs differ on {re.escape(tiny_model)} .*--no-packing"):
        run(tmp_path, tiny_model, "--max-steps", "1")
    assert not os.path.exists(tmp_path / "run" / "checkpoint-1")


def test_segment_attention_only_for_plain_causal_attention(tiny_model):
    model = load_model(tiny_model)
    model.config.sliding_window = 4  # a window packed segments would ignore: keep transformers' own attention
    assert not use_segment_attention(model) and model.config._attn_implementation == "sdpa"
    model.config.use_sliding_window = False  # Qwen2 style: the window is switched off
    assert use_segment_attention(model)


@pytest.mark.parametrize("loss", ["dpo", "ddpo", "orpo", "dorpo"])
def test_train_writes_metrics_and_loadable_checkpoint(tmp_path, tiny_model, loss):
    cfg, path = run(tmp_path, tiny_model, "--loss", loss, "--max-steps", "3")
    rows = metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in METRICS:
        assert all(key in r and r[key] == r[key] for r in rows), key
    if loss in ("dpo", "ddpo"):
        assert rows[0]["rewards/margins"] == 0.0 and rows[0]["loss"] > 0  # policy == reference at step 1
        assert rows[-1]["rewards/margins"] > 0  # and it learns to prefer the chosen stories
    if loss in ("ddpo", "dorpo"):
        assert {r["weights/max"] for r in rows} != {1.0}
    else:
        assert {r["weights/min"] for r in rows} == {r["weights/max"] for r in rows} == {1.0}
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, torch.nn.Module)
    saved = json.load(open(os.path.join(path, "train_config.json")))
    assert saved["loss"] == loss and saved["max_steps"] == 3


FAMILY = ["ipo", "hinge", "robust", "cdpo", "rpo", "simpo", "sft"]  # beside dpo/ddpo and orpo/dorpo


@pytest.mark.parametrize("name", FAMILY)
def test_each_loss_and_its_deviation_weighted_twin_train(tmp_path, tiny_model, capsys, name):
    """Two steps of <name> and of dd-<name> on weighted pairs: finite metrics; the twin reads the weights, the loss
    does not (and says that --deviation is ignored)."""
    plain, _ = run(tmp_path, tiny_model, "--loss", name, "--max-steps", "2", "--deviation", "style", name="plain")
    assert f"--deviation style is ignored: {name} takes no weights" in capsys.readouterr().out
    twin, path = run(tmp_path, tiny_model, "--loss", f"dd-{name}", "--max-steps", "2", "--label-smoothing", "0.2",
                     name="twin")
    for cfg, weighted in ((plain, False), (twin, True)):
        rows = metrics(cfg.output_dir)
        assert [r["step"] for r in rows] == [1, 2]
        assert all(math.isfinite(v) for r in rows for v in r.values()), rows
        assert ({r["weights/max"] for r in rows} != {1.0}) == weighted
        if name != "sft":
            assert all(key in rows[0] for key in METRICS)
        if LOSSES[name].reference:
            assert rows[0]["rewards/margins"] == 0.0  # policy == reference at step 1
    assert json.load(open(os.path.join(path, "train_config.json")))["label_smoothing"] == 0.2


def test_ddpo_with_unit_weights_equals_dpo(tmp_path, tiny_model):
    data = write_pairs(tmp_path / "unweighted.jsonl", weights=False)
    dpo, _ = run(tmp_path, tiny_model, "--loss", "dpo", "--max-steps", "2", name="dpo", data=data)
    ddpo, _ = run(tmp_path, tiny_model, "--loss", "ddpo", "--max-steps", "2", name="ddpo", data=data)
    for a, b in zip(metrics(dpo.output_dir), metrics(ddpo.output_dir)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize("loss", ["ddpo", "dorpo"])
def test_gradient_accumulation_is_exact(tmp_path, tiny_model, loss):
    one, a = run(tmp_path, tiny_model, "--loss", loss, "--max-steps", "1", "--batch-size", "4", name="one")
    acc, b = run(tmp_path, tiny_model, "--loss", loss, "--max-steps", "1", "--batch-size", "1", "--grad-accum", "4", name="acc")
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert metrics(one.output_dir)[0][key] == pytest.approx(metrics(acc.output_dir)[0][key], rel=1e-5), key
    # Adam's first step is about lr * sign(grad): gradients within float noise of 0 may flip by up to 2 * lr
    wa, wb = AutoModelForCausalLM.from_pretrained(a).state_dict(), AutoModelForCausalLM.from_pretrained(b).state_dict()
    for key in wa:
        assert (wa[key] - wb[key]).abs().gt(1e-6).float().mean() < 1e-3, key


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model, monkeypatch):
    args = ("--loss", "ddpo", "--max-steps", "5", "--save-every", "2", "--batch-size", "2", "--warmup-steps", "1")
    full, _ = run(tmp_path, tiny_model, *args, name="full")

    real_save = checkpoint_mod.save_checkpoint

    def save_then_crash(cfg, step, *a):
        path = real_save(cfg, step, *a)
        if step == 4:
            raise KeyboardInterrupt  # killed right after the second checkpoint
        return path

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_model, *args, name="resumed")
    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", real_save)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")  # a line logged after the checkpoint, then lost
    resumed, path = run(tmp_path, tiny_model, *args, "--resume", name="resumed")
    a, b = metrics(full.output_dir), metrics(resumed.output_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for key in METRICS + ["lr"]:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    assert sorted(os.listdir(resumed.output_dir)) == ["checkpoint-4", "checkpoint-5", "metrics.jsonl", "train_config.json"]


def test_bad_input_stops_before_anything_is_written(tmp_path, tiny_model, capsys):
    bad = write_pairs(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                               {"prompt": "p", "chosen": "c", "rejected": "r", "weight": float("nan")}])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--model", tiny_model, "--data", bad, "--output-dir", str(out)])
    assert f"{bad}:2: weight must be finite" in str(e.value)
    assert not out.exists()


def test_trl_conversations_with_an_implicit_prompt_and_a_weight_field_train(tmp_path, tiny_model):
    """TRL's conversational format (no 'prompt': chosen and rejected share their system and user turns) weighted by
    another field, 'score': the steps use those scores as weights, and resuming under another --weight-field is
    refused (it is other training)."""
    from conftest import STORIES

    system = {"role": "system", "content": "You write short fiction."}
    data = write_pairs(tmp_path / "trl.jsonl", [
        {"chosen": [system, {"role": "user", "content": p}, {"role": "assistant", "content": c}],
         "rejected": [system, {"role": "user", "content": p}, {"role": "assistant", "content": r}],
         "score": 0.5 * (i % 4 + 1)} for i, (p, c, r) in enumerate(STORIES)])
    cfg, _ = run(tmp_path, tiny_model, "--loss", "ddpo", "--weight-field", "score", "--max-steps", "2",
                 "--batch-size", str(len(STORIES)), data=data)
    rows = metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["rewards/margins"] == 0.0
    assert all((r["weights/min"], r["weights/max"]) == (0.5, 2.0) for r in rows)
    assert json.load(open(os.path.join(cfg.output_dir, "train_config.json")))["weight_field"] == "score"
    with pytest.raises(DataError, match="weight_field 'score' there, 'weight' now"):
        run(tmp_path, tiny_model, "--loss", "ddpo", "--max-steps", "3", "--batch-size", str(len(STORIES)), "--resume",
            data=data)


def test_existing_checkpoint_needs_resume(tmp_path, tiny_model):
    run(tmp_path, tiny_model, "--max-steps", "1", name="x")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, tiny_model, "--max-steps", "2", name="x")


def pool_pairs(path):
    """Three prompts with 3, 2 and 4 pairs over shared responses: pools of 4, 3 and 5 texts."""
    stories = {"sea": ["The sea kept our letters.", "Waves. Waves again!", "A gull read the tide aloud, slowly, to no one.",
                       "Salt; rope; a bell -- then nothing."],
               "clock": ["It ticked.", "The clock ran backwards on Sundays, just to be heard.", "Tick? Tock? Who asks?"],
               "fox": ["The fox sat.", "A fox, a fence, a famine of hens.", "She said: 'run.' He did not.",
                       "Red fur in the snow, and the hunter looked away.", "Fox!"]}
    rows = []
    for prompt, texts in stories.items():
        for i in range(1, len(texts)):
            rows.append({"prompt": f"Write about a {prompt}.", "chosen": texts[i], "rejected": texts[i - 1]})
    return write_pairs(path, rows)


@pytest.mark.parametrize("loss", ["ddpo", "dd-ipo"])  # the fused kernel's loss; its weights times IPO's loss
def test_in_step_deviation_equals_prepared_weights(tmp_path, tiny_model, loss):
    import ddpo.prepare as prep

    data = pool_pairs(tmp_path / "pool_pairs.jsonl")
    weighted = str(tmp_path / "weighted.jsonl")
    prep.prepare(prep.parse_args(["--input", data, "--output", weighted, "--deviation", "style"]))
    common = ("--loss", loss, "--max-steps", "2", "--batch-size", "16")
    offline, _ = run(tmp_path, tiny_model, *common, name="offline", data=weighted)
    in_step, _ = run(tmp_path, tiny_model, *common, "--deviation", "style", "--kernels", "triton", name="in_step", data=data)
    for a, b in zip(metrics(offline.output_dir), metrics(in_step.output_dir)):
        for key in ("loss", "weights/mean", "weights/min", "weights/max", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert metrics(in_step.output_dir)[0]["weights/max"] > 1.0


def test_precomputed_reference_equals_live_and_is_reused(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    args = ("--loss", "ddpo", "--max-steps", "3", "--batch-size", "2")
    live, _ = run(tmp_path, tiny_model, *args, name="live")
    cached, _ = run(tmp_path, tiny_model, *args, "--precompute-ref", name="cached")
    assert "computed and cached" in capsys.readouterr().out
    again, _ = run(tmp_path, tiny_model, *args, "--precompute-ref", "--no-packing", name="again")
    assert "reused" in capsys.readouterr().out
    for a, b, c in zip(metrics(live.output_dir), metrics(cached.output_dir), metrics(again.output_dir)):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6) and a[key] == pytest.approx(c[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("loss, extra", [("dpo", ()), ("ddpo", ()), ("dorpo", ()), ("dd-simpo", ()), ("sft", ()),
                                         ("rpo", ("--no-packing",)), ("ddpo", ("--deviation", "style")),
                                         ("dorpo", ("--deviation", "style")),
                                         ("dorpo", ("--deviation", "style", "--dorpo-form", "per-example"))])
@pytest.mark.parametrize("grouping", ["one-group", "a-group-per-pair", "pairs-too-long-for-a-tile"])
def test_loss_fused_in_the_head_equals_the_head_then_the_loss(tmp_path, tiny_model, monkeypatch, loss, extra,
                                                               grouping):
    """--fused-loss (each group of pairs' loss and gradients in the head's forward) against --no-fused-loss: the same
    metrics, gradient norms and weights after two steps, with one group per micro-batch, one per pair, or pairs too
    long for one logits tile (which take the chunked head, then the loss)."""
    import ddpo.models as models

    if grouping == "a-group-per-pair":
        monkeypatch.setattr(models, "default_chunk_size", lambda N, V, H: 1)
    if grouping == "pairs-too-long-for-a-tile":
        monkeypatch.setattr(models, "FUSED_TILE_ELEMENTS", 1)
        monkeypatch.setattr(models, "fused_logprobs_loss", None)  # never reached
    data = pool_pairs(tmp_path / "pool_pairs.jsonl") if "--deviation" in extra else None
    common = ("--loss", loss, "--max-steps", "2", "--batch-size", "4", *extra)
    fused, a = run(tmp_path, tiny_model, *common, name="fused", data=data)
    plain, b = run(tmp_path, tiny_model, *common, "--no-fused-loss", name="plain", data=data)
    for ra, rb in zip(metrics(fused.output_dir), metrics(plain.output_dir), strict=True):
        for key in set(ra) - {"step_time_s", "peak_mem_gb", "tokens_per_s"}:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    wa, wb = AutoModelForCausalLM.from_pretrained(a).state_dict(), AutoModelForCausalLM.from_pretrained(b).state_dict()
    for key in wa:  # Adam's first steps are about lr * sign(grad): gradients within float noise of 0 may flip
        assert (wa[key] - wb[key]).abs().gt(1e-5).float().mean() < 1e-2, key


def test_gradient_checkpointing_and_padding_give_the_same_step(tmp_path, tiny_model):
    base, _ = run(tmp_path, tiny_model, "--max-steps", "2", name="base")
    other, _ = run(tmp_path, tiny_model, "--max-steps", "2", "--gradient-checkpointing", "--no-packing", name="other")
    for a, b in zip(metrics(base.output_dir), metrics(other.output_dir)):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_schedule_equals_hugging_face(schedule, warmup):
    """Warm-up starts at 0 (so --warmup-steps 1 is a real warm-up step), then decays as transformers' schedules."""
    from transformers import (
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    cfg = parse_args(["--data", "x", "--warmup-steps", str(warmup), "--schedule", schedule])
    hf = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[schedule]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = hf(opt, warmup, 10)
    ours = train_mod.lr_lambda(cfg, 10)
    for step in range(10):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12), step
    if warmup:
        assert ours(0) == 0.0


@pytest.mark.parametrize("avx512_bf16, amx, want", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                      (False, False, None)])
def test_dtype_auto_is_bf16_on_cpus_with_native_bf16_matmuls(monkeypatch, avx512_bf16, amx, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == want
    assert autocast_dtype("float32", cpu) is None and autocast_dtype("bfloat16", cpu) == torch.bfloat16


def test_dtype_auto_trains_in_the_dtype_it_resolves_to(tmp_path, tiny_model):
    """--dtype auto gives the run of the dtype it names on this machine, to the last digit."""
    want = "bfloat16" if autocast_dtype("auto", torch.device("cpu")) else "float32"
    auto, _ = run(tmp_path, tiny_model, "--max-steps", "2", "--dtype", "auto", name="auto")
    named, _ = run(tmp_path, tiny_model, "--max-steps", "2", "--dtype", want, name="named")
    for a, b in zip(metrics(auto.output_dir), metrics(named.output_dir), strict=True):
        assert [a[k] for k in METRICS + ["grad_norm"]] == [b[k] for k in METRICS + ["grad_norm"]]


@pytest.mark.parametrize("path", ["live", "precompute", "lora"])
def test_bf16_policy_and_reference_agree_at_step_one(tmp_path, tiny_model, monkeypatch, path):
    """Same starting model => same log-probs under --dtype bfloat16 on every reference path: step-1 rewards are 0."""
    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    extra = {"live": [], "precompute": ["--precompute-ref"], "lora": ["--lora-r", "4", "--lora-alpha", "8"]}[path]
    cfg, _ = run(tmp_path, tiny_model, "--loss", "dpo", "--max-steps", "1", "--dtype", "bfloat16", *extra)
    first = metrics(cfg.output_dir)[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)


RAGGED = [1, 1, 3, 1, 3, 1, 1, 2, 3]  # pairs per prompt: prompt-grouped micro-batches pack differently every epoch


def ragged_pairs(path):
    rows, marks = [], [".", "!", "?", ";", "...", ","]
    for g, k in enumerate(RAGGED):
        texts = [f"Tale {g}{marks[j % 6]} " + "word " * (j + 1) + marks[(j + g) % 6] * (j % 3 + 1) for j in range(k + 1)]
        rows += [{"prompt": f"Write tale {g}.", "chosen": texts[j + 1], "rejected": texts[j]} for j in range(k)]
    return write_pairs(path, rows)


def test_optimizer_steps_train_every_pair_once_per_epoch():
    from ddpo.data import optimizer_steps

    for per_step in (1, 2):
        plan = optimizer_steps(22, 4, per_step, seed=42, epochs=2)
        for epoch in (0, 1):
            steps = [batches for position, batches in plan if epoch < position <= epoch + 1]
            assert sorted(i for batches in steps for b in batches for i in b) == list(range(22))
        assert plan[-1][0] == 2.0
        assert plan[0][1] != plan[len(plan) // 2][1]  # each epoch in its own order
    assert len(optimizer_steps(22, 4, 1, seed=42, epochs=1.5)) == 6 + 3
    assert len(optimizer_steps(16, 4, 1, seed=0, max_steps=11)) == 11  # three epochs of 4 steps, cut at 11


def test_deviation_over_epochs_of_ragged_pools(tmp_path, tiny_model):
    """The audit's case: ragged pools, --batch-size 4 --seed 42 --epochs 2 raised IndexError at step 10."""
    from ddpo.data import optimizer_steps

    cfg, path = run(tmp_path, tiny_model, "--loss", "ddpo", "--deviation", "style", "--batch-size", "4", "--seed", "42",
                    "--epochs", "2", data=ragged_pairs(tmp_path / "ragged.jsonl"))
    rows = metrics(cfg.output_dir)
    assert len(rows) == len(optimizer_steps(sum(RAGGED), 4, 1, 42, 2))
    assert rows[-1]["epoch"] == 2.0 and path.endswith(f"checkpoint-{len(rows)}")


@pytest.mark.parametrize("loss", ["ddpo", "dorpo"])
def test_in_step_accumulation_is_exact(tmp_path, tiny_model, loss):
    """One step over 3 prompts (3, 2 and 4 pairs) as one micro-batch or as three: the same loss and gradient.
    DORPO (released) takes the mean weight of the whole step, also when weights are computed in-step."""
    data = pool_pairs(tmp_path / "pool_pairs.jsonl")
    common = ("--loss", loss, "--deviation", "style", "--max-steps", "1", "--kernels", "triton")
    one, _ = run(tmp_path, tiny_model, *common, "--batch-size", "16", name="one", data=data)
    acc, _ = run(tmp_path, tiny_model, *common, "--batch-size", "4", "--grad-accum", "3", name="acc", data=data)
    a, b = metrics(one.output_dir)[0], metrics(acc.output_dir)[0]
    for key in ("loss", "grad_norm", "weights/mean", "weights/max"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_precomputed_reference_is_keyed_by_the_weights_not_the_path(tmp_path, monkeypatch, capsys):
    """A model rebuilt at the same path with the same shapes (same file names and sizes) is a new reference."""
    from conftest import make_tiny_model

    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model(tmp_path / "model", seed=0)
    args = ("--loss", "dpo", "--max-steps", "1", "--precompute-ref")
    run(tmp_path, model, *args, name="first")
    assert "computed and cached" in capsys.readouterr().out
    make_tiny_model(tmp_path / "model", seed=1)  # retrained in place
    second, _ = run(tmp_path, model, *args, name="second")
    assert "computed and cached" in capsys.readouterr().out
    assert metrics(second.output_dir)[0]["rewards/margins"] == 0.0  # policy == reference at step 1


@pytest.mark.parametrize("loss, lengths", [("dpo", (0, 0)), ("ddpo", (0, 0)), ("sft", (0, 0)), ("orpo", (512, 128)),
                                           ("dorpo", (512, 128)), *[(name, (0, 0)) for name in FAMILY],
                                           *[(f"dd-{name}", (0, 0)) for name in FAMILY]])
def test_truncation_defaults_follow_the_released_code(loss, lengths):
    cfg = parse_args(["--data", "x", "--loss", loss])
    assert (cfg.max_length, cfg.max_prompt_length) == lengths
    cfg = parse_args(["--data", "x", "--loss", loss, "--max-length", "300", "--max-prompt-length", "0"])
    assert (cfg.max_length, cfg.max_prompt_length) == (300, 0)
    with pytest.raises(SystemExit):
        parse_args(["--data", "x", "--loss", loss, "--max-length", "100", "--max-prompt-length", "100"])


def test_sft_is_the_mean_token_nll_of_the_chosen_responses(tmp_path, tiny_model):
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model)
    pairs = load_pairs(write_pairs(tmp_path / "pairs.jsonl"))
    tokenize_pairs(pairs, tok)
    nll = []
    for p in pairs:  # from the full logits of each chosen sequence, one at a time
        ids = torch.tensor([p.prompt_ids + p.chosen_ids])
        logits = model(input_ids=ids).logits[0, len(p.prompt_ids) - 1:-1]
        nll.append(F.cross_entropy(logits, torch.tensor(p.chosen_ids)).item())
    cfg, _ = run(tmp_path, tiny_model, "--loss", "sft", "--max-steps", "4", "--batch-size", "6")
    rows = metrics(cfg.output_dir)
    assert rows[0]["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert rows[0]["logps/chosen"] == pytest.approx(-rows[0]["loss"], rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] and "rewards/margins" not in rows[0]


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


BAD_FLAGS = [("--max-grad-norm", "-1"), ("--beta", "0"), ("--beta", "-0.1"), ("--beta", "inf"), ("--beta", "nan"),
             ("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--max-steps", "-1"), ("--epochs", "0"),
             ("--epochs", "inf"), ("--epochs", "nan"), ("--batch-size", "0"), ("--grad-accum", "0"),
             ("--log-every", "0"), ("--save-every", "-1"), ("--warmup-steps", "-1"), ("--lora-r", "-1"),
             ("--lora-alpha", "0"), ("--lora-dropout", "1"), ("--lora-dropout", "-0.1"), ("--orpo-lambda", "-1"),
             ("--orpo-lambda", "nan"), ("--min-weight", "-1"), ("--min-weight", "inf"), ("--weight-decay", "-1"),
             ("--max-length", "-2"), ("--max-prompt-length", "-2"), ("--keep-checkpoints", "-1"), ("--seed", "-1"),
             ("--device", "cuda:99"), ("--device", "nonsense"), ("--device", "meta"), ("--kernels", "triton"),
             ("--label-smoothing", "0.5"), ("--label-smoothing", "-0.1"), ("--simpo-gamma", "-1"),
             ("--simpo-gamma", "inf"), ("--rpo-alpha", "-1"), ("--rpo-alpha", "nan")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_bad_flags_are_refused_at_parse_time(tmp_path, tiny_model, monkeypatch, capsys, flag, value):
    """Each numeric flag out of range, a device that is not there, Triton on the CPU without its interpreter."""
    monkeypatch.setattr(train_mod, "load_tokenizer", no_model)
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read when --kernels triton is parsed
    with pytest.raises(SystemExit) as e:
        main(["--model", tiny_model, "--data", write_pairs(tmp_path / "pairs.jsonl"), "--output-dir",
              str(tmp_path / "out"), "--device", "cpu", flag, value])
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def live_pid():
    """The pid of a running process other than this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


GOOD_PAIRS = '{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
BAD_INPUTS = [  # files under tmp_path (pairs.jsonl is --data, out the --output-dir), extra flags, the error
    pytest.param({}, ["--model", "./no/such/model"], r"--model ./no/such/model: no such directory", id="missing model"),
    pytest.param({}, ["--ref-model", "{tmp}/ref"], r"--ref-model .*/ref: no such directory", id="missing ref model"),
    pytest.param({"m/notes.txt": ""}, ["--model", "{tmp}/m"], r"--model .*/m: not a model directory \(no config.json\)",
                 id="model directory without config"),
    pytest.param({}, ["--model", "packaged:nope"], r"--model packaged:nope: unknown packaged model", id="unknown packaged"),
    pytest.param({}, ["--deviation", "semantic", "--semantic-embedder", "./no/such/embedder"],
                 r"--semantic-embedder ./no/such/embedder: no such directory", id="missing embedder"),
    pytest.param({"f": ""}, ["--output-dir", "{tmp}/f"], r"--output-dir .*/f: .*/f is not a directory",
                 id="output dir is a file"),
    pytest.param({"f": ""}, ["--output-dir", "{tmp}/f/out"], r"--output-dir .*/f/out: .*/f is not a directory",
                 id="output dir inside a file"),
    pytest.param({"pairs.jsonl": GOOD_PAIRS.encode() + b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n'}, [],
                 r"^error: .*pairs.jsonl:2: invalid UTF-8", id="invalid utf-8"),
    pytest.param({"out/.lock": "{pid} {host}\n"}, [], r"--output-dir .*/out: in use by pid \d+ on .*/out/.lock\)",
                 id="output dir locked by a live run"),
    pytest.param({"out/.lock": "12 elsewhere\n"}, [], r"in use by pid 12 on elsewhere", id="locked from another host"),
    pytest.param({"out/metrics.jsonl": "my notes\n"}, [], r"holds a metrics.jsonl that ddpo.train did not write",
                 id="a foreign metrics.jsonl"),
    pytest.param({"out/metrics.jsonl": "my notes\n", "out/train_config.json": '{"loss": "x"}'}, [],
                 r"holds a metrics.jsonl that ddpo.train did not write", id="a foreign metrics.jsonl and config"),
]


@pytest.mark.parametrize("files, flags, error", BAD_INPUTS)
def test_bad_input_is_refused_before_a_model_loads(tmp_path, tiny_model, monkeypatch, live_pid, files, flags, error):
    monkeypatch.setattr(train_mod, "load_tokenizer", no_model)
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    files = {"pairs.jsonl": GOOD_PAIRS, **files}
    for name, content in files.items():
        if isinstance(content, str):
            content = content.replace("{pid}", str(live_pid)).replace("{host}", socket.gethostname()).encode()
        files[name] = content
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(files[name])
    argv = ["--model", tiny_model, "--data", str(tmp_path / "pairs.jsonl"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv + [f.format(tmp=tmp_path) for f in flags])
    assert re.search(error, str(e.value.code)) and "\n" not in str(e.value.code), e.value.code
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)
    for name, content in files.items():  # nothing written, nothing rewritten
        assert (tmp_path / name).read_bytes() == content


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_is_refused_before_a_model_loads(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="ro is not writable"):
        main(["--model", tiny_model, "--data", write_pairs(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "ro" / "o")])


def test_a_stale_lock_is_taken_over_and_the_lock_is_released(tmp_path, tiny_model, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    cfg, path = run(tmp_path, tiny_model, "--max-steps", "1")
    assert f"taking over the lock of pid {dead.pid}, which is no longer running" in capsys.readouterr().out
    assert sorted(os.listdir(cfg.output_dir)) == ["checkpoint-1", "metrics.jsonl", "train_config.json"]
    with pytest.raises(SystemExit, match="--resume"):  # also released when the run fails
        run(tmp_path, tiny_model, "--max-steps", "1")
    assert not os.path.exists(os.path.join(cfg.output_dir, ".lock"))


def test_pruning_never_deletes_the_newest_checkpoint(tmp_path, tiny_model):
    cfg = parse_args(["--model", tiny_model, "--data", write_pairs(tmp_path / "pairs.jsonl"), "--output-dir",
                      str(tmp_path / "run"), "--max-steps", "3", "--save-every", "1"])
    cfg.keep_checkpoints = -1  # past parse_args, which refuses it
    assert train(cfg).endswith("checkpoint-3") and os.path.isdir(tmp_path / "run" / "checkpoint-3")


def strict_rows(path):
    """metrics.jsonl rows; NaN and Infinity (not JSON) fail."""
    def refuse(token):
        raise ValueError(f"{token} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.mark.parametrize("flags, rows, step", [
    (["--data", "HUGE"], 0, 1),            # a finite weight of 1e308 makes the step's loss inf
    (["--beta", "1e300"], 0, 1),           # beta overflows float32: inf * 0 = NaN rewards
    (["--lr", "1e30", "--save-every", "1"], 1, 2),  # step 1 is fine and saved, its update blows up step 2
])
def test_a_non_finite_step_stops_before_its_update_and_checkpoint(tmp_path, tiny_model, flags, rows, step):
    huge = write_pairs(tmp_path / "huge.jsonl", [{"prompt": "p", "chosen": "c c", "rejected": "r r", "weight": 1e308},
                                                 {"prompt": "q", "chosen": "d", "rejected": "e", "weight": 1.0}])
    with pytest.raises(SystemExit, match=f"^error: step {step}: non-finite .*stopped before its update and checkpoint"):
        run(tmp_path, tiny_model, "--max-steps", "3", *[huge if f == "HUGE" else f for f in flags])
    out = tmp_path / "run"
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == list(range(1, rows + 1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, rows + 1)]
    for checkpoint in out.glob("checkpoint-*"):
        assert all(w.isfinite().all() for w in load_file(checkpoint / "model.safetensors").values())


def certain_model(path):
    """A plain-text model certain of its EOS everywhere: a huge constant direction in the residual stream, read only
    by the EOS row of the output layer (log-prob 0 for EOS, about -1e5 for any other token)."""
    from conftest import make_tiny_model

    make_tiny_model(path, chat_template=False)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), load_tokenizer(str(path))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 1e4
    model.save_pretrained(path)
    return str(path), tokenizer.eos_token


@pytest.mark.parametrize("loss", ["orpo", "dorpo"])
def test_orpo_on_a_response_the_model_is_certain_of_stays_finite(tmp_path, loss):
    """Mean log-prob 0 (P = 1, odds infinite): log1mexp caps it, so the log-odds and every gradient stay finite."""
    model, eos = certain_model(tmp_path / "certain")
    data = write_pairs(tmp_path / "pairs.jsonl", [{"prompt": "Say it.", "chosen": eos, "rejected": "no", "weight": 2.0},
                                                  {"prompt": "Again.", "chosen": eos, "rejected": "nope"}])
    cfg, path = run(tmp_path, model, "--loss", loss, "--max-steps", "2", data=data)
    rows = strict_rows(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert rows[0]["logps/chosen"] == 0.0 and rows[0]["rewards/margins"] > 0 and len(rows) == 2
    assert all(w.isfinite().all() for w in load_file(os.path.join(path, "model.safetensors")).values())


@pytest.mark.parametrize("first, then, differing", [
    ([], ["--loss", "dpo"], "loss 'ddpo' there, 'dpo' now"),
    ([], ["--beta", "0.5"], "beta 0.1 there, 0.5 now"),
    ([], ["--lora-r", "4"], "lora_r 0 there, 4 now"),
    (["--lora-r", "4"], [], "lora_r 4 there, 0 now"),
    ([], ["--seed", "1"], "seed 42 there, 1 now"),
    ([], ["--deviation", "style"], "deviation 'none' there, 'style' now"),
    ([], ["--dorpo-form", "per-example"], "dorpo_form 'released' there, 'per-example' now"),
    ([], ["OTHER"], "model_identity 'files [0-9a-f]+' there, 'files [0-9a-f]+' now"),  # what the model is
    ([], ["EDIT"], "data_sha256 '[0-9a-f]+' there, '[0-9a-f]+' now"),  # same path, other content
])
def test_resume_refuses_other_settings(tmp_path, tiny_model, first, then, differing):
    from conftest import make_tiny_model

    data = write_pairs(tmp_path / "data.jsonl")
    run(tmp_path, tiny_model, "--max-steps", "1", *first, data=data)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    if then == ["EDIT"]:
        write_pairs(data, [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    if "OTHER" in then:
        then = ["--model", make_tiny_model(tmp_path / "other", seed=1)]
    with pytest.raises(DataError, match=f"^--resume: .*checkpoint-1 was trained with other settings: {differing}"):
        run(tmp_path, tiny_model, "--max-steps", "2", "--resume", *[f for f in then if f != "EDIT"], data=data)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_resume_may_extend_the_run_and_the_schedule_follows_the_new_total(tmp_path, tiny_model, monkeypatch):
    """Four steps of a linear schedule, resumed to eight from a copy of the data at another path and with other
    cadence and device flags: steps 5-8 take the eight-step schedule (the four-step one had reached lr 0)."""
    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    run(tmp_path, tiny_model, "--max-steps", "4", "--save-every", "2", "--log-every", "2")
    moved = write_pairs(tmp_path / "moved.jsonl")
    cfg, path = run(tmp_path, tiny_model, "--max-steps", "8", "--save-every", "3", "--resume", "--keep-checkpoints", "1",
                    "--log-every", "1", "--device", "cpu", "--precompute-ref", data=moved)
    rows = metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 7, 8] and path.endswith("checkpoint-8")
    assert sorted(os.listdir(cfg.output_dir)) == ["checkpoint-8", "metrics.jsonl", "train_config.json"]
    schedule = train_mod.lr_lambda(cfg, 8)
    for r in rows[2:]:  # steps 5-8
        assert r["lr"] == pytest.approx(1e-3 * schedule(r["step"] - 1), rel=1e-9), r["step"]


@pytest.mark.parametrize("damage, error", [
    (lambda text: text + '{"step": 3, "lo', None),  # killed while writing step 3's line: dropped
    (lambda text: "garbage\n" + text, r"metrics.jsonl:1: not a metrics line of ddpo.train"),
    (lambda text: text.replace("\n", "\n\xff", 1), r"metrics.jsonl:2: not a metrics line"),
])
def test_resume_drops_only_a_torn_last_metrics_line(tmp_path, tiny_model, damage, error):
    run(tmp_path, tiny_model, "--max-steps", "2", "--save-every", "1")
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_bytes(damage(path.read_text()).encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff"))
    if error:
        with pytest.raises(DataError, match=error):
            run(tmp_path, tiny_model, "--max-steps", "3", "--save-every", "1", "--resume")
        return
    run(tmp_path, tiny_model, "--max-steps", "3", "--save-every", "1", "--resume")
    assert [r["step"] for r in strict_rows(path)] == [1, 2, 3]


def test_save_only_model_checkpoints_load_as_models_and_refuse_resume(tmp_path, tiny_model):
    """--save-only-model: the same weights as a full checkpoint's, no trainer_state.pt; --resume from it is a one-line
    error that leaves the directory as it was."""
    full, path = run(tmp_path, tiny_model, "--max-steps", "2", name="full")
    only, only_path = run(tmp_path, tiny_model, "--max-steps", "2", "--save-only-model", name="only")
    assert sorted(os.listdir(only_path)) == sorted(set(os.listdir(path)) - {"trainer_state.pt"})
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(only_path, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    AutoModelForCausalLM.from_pretrained(only_path)
    before = {p: p.read_bytes() for p in (tmp_path / "only").rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"^--resume: .*checkpoint-2 holds the model only \(saved with --save-only-model"):
        run(tmp_path, tiny_model, "--max-steps", "3", "--resume", name="only")
    assert {p: p.read_bytes() for p in (tmp_path / "only").rglob("*") if p.is_file()} == before


def test_a_crafted_trainer_state_is_refused_and_never_run(tmp_path, tiny_model):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    run(tmp_path, tiny_model, "--max-steps", "1")
    torch.save({"step": 1, "optimizer": Payload()}, tmp_path / "run" / "checkpoint-1" / "trainer_state.pt")
    with pytest.raises(DataError, match=r"trainer_state.pt: refused: it holds pickled objects other than tensors"):
        run(tmp_path, tiny_model, "--max-steps", "2", "--resume")
    assert not marker.exists()


def test_leftover_temporaries_are_removed_and_outputs_follow_the_umask(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    saving = temporary_path(str(out / "checkpoint"))  # what kill -9 during a save and a write leave
    os.makedirs(saving)
    (out / ".tmp-metrics.jsonl-0123456789abcdef").write_text("half")
    old = os.umask(0o027)
    try:
        run(tmp_path, tiny_model, "--max-steps", "1")
    finally:
        os.umask(old)
    assert f"{os.path.basename(saving)}, .tmp-metrics.jsonl-0123456789abcdef" in capsys.readouterr().out
    assert not [p for p in out.rglob(".tmp-*")]
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert modes["checkpoint-1"] == 0o750 and modes["train_config.json"] == modes["metrics.jsonl"] == 0o640
    assert set(modes.values()) == {0o750, 0o640}, modes


def test_packaged_conversion_cache_is_keyed_by_the_transformers_major_version(monkeypatch):
    import transformers

    from ddpo.models import converted_dir

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    old = converted_dir("packaged:smollm2-135m-instruct")
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    assert old.endswith("smollm2-135m-instruct-tf4") and converted_dir("packaged:smollm2-135m-instruct") != old


def test_an_unreachable_hub_name_is_one_line(tmp_path, monkeypatch):
    """A hub name that is not in the local cache while the hub cannot be reached: one line, nothing written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--data", write_pairs(tmp_path / "p.jsonl"), "--model", "someorg/no-such-model", "--output-dir", str(out)])
    assert str(e.value).startswith("error: someorg/no-such-model: cannot load it") and "\n" not in str(e.value)
    assert not out.exists()


def test_a_fractional_last_epoch_is_cut_exactly_and_positioned_in_its_epoch():
    from ddpo.data import optimizer_steps

    plan = optimizer_steps(40, 4, 1, seed=0, epochs=1.1)  # 10 steps an epoch: 10 + 1, not 10 + 2
    assert len(plan) == 11 and plan[-1][0] == pytest.approx(1.1)
    plan = optimizer_steps(40, 4, 1, seed=0, epochs=0.5)
    assert len(plan) == 5 and plan[-1][0] == pytest.approx(0.5)


def test_in_step_weights_equal_prepared_ones_from_pools_with_unpaired_responses(tmp_path, tiny_model):
    """prepare from pools (a fifth response in no pair, standardised with the others by the stylometric embedder if
    it embedded every response) and the in-step kernel over the pairs file it writes: one set of weights."""
    import ddpo.prepare as prep

    texts = ["The sea kept our letters.", "Waves. Waves again!", "A gull read the tide aloud, slowly, to no one.",
             "Salt; rope; a bell -- then nothing.", "Quiet harbour, quiet boats, and one lamp left on all night long."]
    rows = [{"prompt": f"Write about {p}.", "response": f"{t} ({p})" if k else t, "score": s}
            for k, p in enumerate(["the sea", "a port"]) for t, s in zip(texts, [1, 9, 4, 7, 2])]
    pools = write_pairs(tmp_path / "pools.jsonl", rows)
    weighted = str(tmp_path / "weighted.jsonl")
    prep.prepare(prep.parse_args(["--input", pools, "--output", weighted, "--deviation", "style", "--gap", "3"]))
    assert {json.loads(line)["meta"]["group_size"] for line in open(weighted)} == {4}  # one response left out
    common = ("--loss", "ddpo", "--max-steps", "1", "--batch-size", "16", "--kernels", "triton")
    offline, _ = run(tmp_path, tiny_model, *common, name="offline", data=weighted)
    in_step, _ = run(tmp_path, tiny_model, *common, "--deviation", "style", name="in_step", data=weighted)
    a, b = metrics(offline.output_dir)[0], metrics(in_step.output_dir)[0]
    for key in ("loss", "weights/mean", "weights/min", "weights/max"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_resume_refuses_another_world_size(tmp_path):
    from ddpo.checkpoint import check_resumable
    from ddpo.data import DataError

    (tmp_path / "train_config.json").write_text(json.dumps({"loss": "ddpo", "world_size": 8}))
    check_resumable(str(tmp_path), {"loss": "ddpo", "world_size": 8})
    with pytest.raises(DataError, match="world_size 8 there, 1 now"):
        check_resumable(str(tmp_path), {"loss": "ddpo", "world_size": 1})


@pytest.mark.parametrize("name", ["metrics.jsonl", "train_config.json", "eval_samples"])
def test_outputs_are_never_written_through_a_link(tmp_path, tiny_model, name):
    """A link in place of an output would make the run write outside --output-dir: refused, the target untouched."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    (tmp_path / "run").mkdir()
    os.symlink(outside, tmp_path / "run" / name)
    with pytest.raises((SystemExit, DataError), match=rf"--output-dir .*run: {name} is a link"):
        run(tmp_path, tiny_model, "--max-steps", "1")
    assert outside.read_text() == "keep me\n"


def test_only_our_own_temporaries_are_removed_and_a_dangling_lock_link_is_an_error(tmp_path, tiny_model):
    out = tmp_path / "run"
    (out / ".tmp-mine").mkdir(parents=True)  # a user's, whatever its name
    (out / ".tmp-mine" / "notes.txt").write_text("keep")
    os.makedirs(temporary_path(str(out / "checkpoint")))  # what a killed run of ours left
    (out / ".tmp-metrics.jsonl-0123456789abcdef").write_text("half")
    cfg, path = run(tmp_path, tiny_model, "--max-steps", "1")
    assert sorted(os.listdir(out)) == [".tmp-mine", "checkpoint-1", "metrics.jsonl", "train_config.json"]
    assert (out / ".tmp-mine" / "notes.txt").read_text() == "keep"
    os.symlink(tmp_path / "nowhere", out / ".lock")  # a stale lock that is a dangling link: an error, not a spin
    with pytest.raises((SystemExit, DataError), match=r"\.lock is not a lock file this tool wrote"):
        run(tmp_path, tiny_model, "--max-steps", "2", "--resume")


def test_a_plan_of_no_step_and_a_resume_below_the_checkpoint_are_errors(tmp_path, tiny_model):
    """Neither trains anything: both used to exit 0 (the first printing "saved None", the second rewriting
    train_config.json)."""
    with pytest.raises(DataError, match=r"--epochs 1e-12: 6 pairs in steps of 2 make no optimiser step"):
        run(tmp_path, tiny_model, "--epochs", "1e-12")
    run(tmp_path, tiny_model, "--max-steps", "2")
    config = (tmp_path / "run" / "train_config.json").read_bytes()
    with pytest.raises(DataError, match=r"the plan has 1 steps, but .*checkpoint-2 is at step 2"):
        run(tmp_path, tiny_model, "--max-steps", "1", "--resume")
    assert (tmp_path / "run" / "train_config.json").read_bytes() == config


@pytest.mark.parametrize("line, error", [
    ("[" * 100000 + "]" * 100000, "JSON nested too deeply"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "weight": 1' + "0" * 400 + "}", "must be finite"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "weight": 1' + "0" * 5000 + "}", "malformed JSON"),
])
def test_hostile_json_is_a_file_line_error(tmp_path, line, error):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_PAIRS + line + "\n")
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: .*{error}"):
        load_pairs(str(path))


def test_weights_made_non_finite_by_the_update_are_never_saved(tmp_path, tiny_model):
    """--lr 1e308: the loss and gradient of step 1 are finite, the update is not."""
    with pytest.raises(SystemExit, match=r"step 1: the update made weights non-finite; stopped before its checkpoint"):
        run(tmp_path, tiny_model, "--max-steps", "1", "--lr", "1e308", "--max-grad-norm", "0")
    assert not [p for p in (tmp_path / "run").glob("checkpoint-*")]


def test_a_text_over_the_size_ddpo_reads_is_a_file_line_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_PAIRS + json.dumps({"prompt": "p", "chosen": "c" * 4_000_001, "rejected": "r"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'chosen' has 4,000,001 characters, over the 4,000,000"):
        load_pairs(str(path))
