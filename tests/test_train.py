"""ddpo.train end to end on tiny models: metrics, checkpoints, resume equality, exact accumulation, bad input."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import write_pairs
from transformers import AutoModelForCausalLM

import ddpo.train as train_mod
from ddpo.data import collate, collate_packed, load_pairs, tokenize_pairs
from ddpo.models import SEGMENT_ATTENTION, load_model, load_tokenizer, segment_attention, sequence_logps, use_segment_attention
from ddpo.train import main, parse_args, train

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "weights/mean", "weights/min", "weights/max"]


def run(tmp_path, tiny_model, *extra, name="run", data=None):
    out = str(tmp_path / name)
    data = data or write_pairs(tmp_path / "pairs.jsonl")
    cfg = parse_args(["--model", tiny_model, "--data", data, "--output-dir", out, "--lr", "1e-3", *extra])
    return cfg, train(cfg)


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sequence_logps_equal_full_logits(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model)
    pairs = load_pairs(write_pairs(os.path.join(os.path.dirname(tiny_model), "p.jsonl")))[:3]
    tokenize_pairs(pairs, tok)
    input_ids, attention_mask, labels = collate(pairs, tok.pad_token_id)
    logps, counts = sequence_logps(model, (input_ids, attention_mask, labels), use_triton=False)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (2B, T-1, V)
    targets = labels[:, 1:]
    mask = targets != -100
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps, (token * mask).sum(1), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    packed, packed_counts = sequence_logps(model, collate_packed(pairs), use_triton=False)  # one row, no padding
    assert collate_packed(pairs)[0].numel() == attention_mask.sum()
    torch.testing.assert_close(packed, logps, rtol=1e-5, atol=1e-4)
    assert packed_counts.tolist() == counts.tolist()


def test_segment_attention_equals_padded_sdpa(tiny_model):
    """Packed rows under segment attention (one sdpa call per sequence, no mask) give the padded sdpa log-probs and
    the same parameter gradients; padded rows under it (the masked branch) too. The mask step builds no mask."""
    tok = load_tokenizer(tiny_model)
    pairs = load_pairs(write_pairs(os.path.join(os.path.dirname(tiny_model), "p.jsonl")))[:3]
    tokenize_pairs(pairs, tok)
    padded_batch, packed_batch = collate(pairs, tok.pad_token_id), collate_packed(pairs)
    results = []
    for attention, batch in (("sdpa", padded_batch), ("segments", packed_batch), ("segments", padded_batch)):
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
    by_lengths, _ = segment_attention(None, q, k, v, None, segment_lengths=[4, 2, 3])
    torch.testing.assert_close(by_positions, by_lengths)
    torch.testing.assert_close(by_lengths[:, 4:6], F.scaled_dot_product_attention(
        q[:, :, 4:6], k[:, :, 4:6], v[:, :, 4:6], is_causal=True).transpose(1, 2))  # the middle sequence alone
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind()  # rows of equal length, no mask: plain causal attention per row
    out, _ = segment_attention(None, q, k, v, None, position_ids=torch.arange(5).expand(2, 5))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2))


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

    real_save = train_mod.save_checkpoint

    def save_then_crash(cfg, step, *a):
        path = real_save(cfg, step, *a)
        if step == 4:
            raise KeyboardInterrupt  # killed right after the second checkpoint
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_model, *args, name="resumed")
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
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


def test_in_step_deviation_equals_prepared_weights(tmp_path, tiny_model):
    import ddpo.prepare as prep

    data = pool_pairs(tmp_path / "pool_pairs.jsonl")
    weighted = str(tmp_path / "weighted.jsonl")
    prep.prepare(prep.parse_args(["--input", data, "--output", weighted, "--deviation", "style"]))
    common = ("--loss", "ddpo", "--max-steps", "2", "--batch-size", "16")
    offline, _ = run(tmp_path, tiny_model, *common, name="offline", data=weighted)
    in_step, _ = run(tmp_path, tiny_model, *common, "--deviation", "style", "--kernels", "triton", name="in_step", data=data)
    for a, b in zip(metrics(offline.output_dir), metrics(in_step.output_dir)):
        for key in ("loss", "weights/mean", "weights/min", "weights/max", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert metrics(in_step.output_dir)[0]["weights/max"] > 1.0


def test_grouped_micro_batches_keep_prompts_whole():
    from ddpo.data import micro_batches

    pair_prompt = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 4])
    batches = micro_batches(len(pair_prompt), 4, seed=0, epoch=1, pair_prompt=pair_prompt)
    assert sorted(sum(batches, [])) == list(range(12))
    for b in batches:
        for g in pair_prompt[b].unique():
            assert set((pair_prompt == g).nonzero()[:, 0].tolist()) <= set(b)  # all of g's pairs are here
        assert len(b) <= 4 or len(pair_prompt[b].unique()) == 1
    assert batches == micro_batches(len(pair_prompt), 4, seed=0, epoch=1, pair_prompt=pair_prompt)


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
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    cfg = parse_args(["--data", "x", "--warmup-steps", str(warmup), "--schedule", schedule])
    hf = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[schedule]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = hf(opt, warmup, 10)
    ours = train_mod.lr_lambda(cfg, 10)
    for step in range(10):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12), step
    if warmup:
        assert ours(0) == 0.0


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

    pair_prompt = torch.tensor([g for g, k in enumerate(RAGGED) for _ in range(k)])
    lengths = set()
    for per_step in (1, 2):
        plan = optimizer_steps(len(pair_prompt), 4, per_step, seed=42, epochs=2, pair_prompt=pair_prompt)
        for epoch in (0, 1):
            steps = [batches for position, batches in plan if epoch < position <= epoch + 1]
            lengths.add(len(steps))
            assert sorted(i for batches in steps for b in batches for i in b) == list(range(len(pair_prompt)))
        assert plan[-1][0] == 2.0
    assert len(lengths) > 1  # the two epochs differ in length: the old plan took epoch 0's for both
    half = optimizer_steps(len(pair_prompt), 4, 1, seed=42, epochs=1.5, pair_prompt=pair_prompt)
    first = sum(position <= 1 for position, _ in half)
    assert len(half) - first == math.ceil(0.5 * (len(optimizer_steps(len(pair_prompt), 4, 1, 42, 2, 0, pair_prompt)) - first))
    assert len(optimizer_steps(16, 4, 1, seed=0, max_steps=11)) == 11  # three epochs of 4 steps, cut at 11


def test_in_step_deviation_over_epochs_of_different_lengths(tmp_path, tiny_model):
    """The audit's case: ragged pools, --batch-size 4 --seed 42 --epochs 2 raised IndexError at step 10."""
    from ddpo.data import optimizer_steps

    cfg, path = run(tmp_path, tiny_model, "--loss", "ddpo", "--deviation", "style", "--batch-size", "4", "--seed", "42",
                    "--epochs", "2", data=ragged_pairs(tmp_path / "ragged.jsonl"))
    rows = metrics(cfg.output_dir)
    pair_prompt = torch.tensor([g for g, k in enumerate(RAGGED) for _ in range(k)])
    assert len(rows) == len(optimizer_steps(len(pair_prompt), 4, 1, 42, 2, 0, pair_prompt))
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
                                           ("dorpo", (512, 128))])
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
