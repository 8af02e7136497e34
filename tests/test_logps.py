"""Log-probs and attention: sequence_logps against full logits, segment attention against padded SDPA, packing,
the loss fused in the head, gradient checkpointing, bf16 autocast and truncation."""

import os
import re
import pytest
import torch
import torch.nn.functional as F
from conftest import write_pairs
from transformers import AutoModelForCausalLM
import ddpo.step as step_mod
from ddpo.data import collate, collate_packed, load_pairs, tokenize_pairs
from ddpo.models import (SEGMENT_ATTENTION, autocast_dtype, load_model, load_tokenizer, segment_attention,
                         sequence_logps, use_segment_attention)
from ddpo.train import parse_args
from conftest import FAMILY, METRICS, run, metrics, pool_pairs


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
    with pytest.raises(SystemExit,
                       match=rf"packed and padded log-probs differ on {re.escape(tiny_model)} .*--no-packing"):
        run(tmp_path, tiny_model, "--max-steps", "1")
    assert not os.path.exists(tmp_path / "run" / "checkpoint-1")


def test_segment_attention_only_for_plain_causal_attention(tiny_model):
    model = load_model(tiny_model)
    model.config.sliding_window = 4  # a window packed segments would ignore: keep transformers' own attention
    assert not use_segment_attention(model) and model.config._attn_implementation == "sdpa"
    model.config.use_sliding_window = False  # Qwen2 style: the window is switched off
    assert use_segment_attention(model)


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
