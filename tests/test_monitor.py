"""Evaluation during training (ddpo/monitor.py) on tiny models: the steps evaluated, equality with the training row
of the same pairs and with ddpo.generate / ddpo.evaluate, resume, non-finite values, tensorboard and wandb, bad flags
and files; and the curves of runs (ddpo/curves.py)."""

import importlib.machinery
import json
import os
import re
import sys
import types

import pytest
from conftest import STORIES, make_tiny_model, write_jsonl, write_pairs

import ddpo.monitor as monitor_mod
import ddpo.train as train_mod
from ddpo import curves, evaluate, generate
from ddpo.train import main
from conftest import metrics, no_model, run, strict_rows

SAMPLED = [f"eval_{m}" for m in evaluate.METRICS]
PAIRED = ["eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins",
          "eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected", "eval_weights/mean",
          "eval_weights/min", "eval_weights/max"]


def prompts_file(tmp_path, count=6):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _, _ in STORIES[:count]])


def sampling(tmp_path, samples=3, tokens=12, prompts=6):
    """Flags of the sampled evaluation: 6 prompts are batches of 4 and 2, 5 prompts 4 and 1 (rows without padding)."""
    return ["--eval-prompts", prompts_file(tmp_path, prompts), "--eval-samples", str(samples), "--eval-max-new-tokens",
            str(tokens), "--semantic-embedder", "stylometric"]


def test_evaluations_at_every_nth_and_the_last_step_leave_training_alone(tmp_path, tiny_model):
    data = write_pairs(tmp_path / "pairs.jsonl")
    plain, _ = run(tmp_path, tiny_model, "--max-steps", "5", name="plain", data=data)
    cfg, _ = run(tmp_path, tiny_model, "--max-steps", "5", "--eval-every", "2", "--eval-data", data,
                 *sampling(tmp_path), name="watched", data=data)
    rows = strict_rows(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(1, False), (2, False), (2, True), (3, False),
                                                             (4, False), (4, True), (5, False), (5, True)]
    evals = [r for r in rows if "eval_loss" in r]
    for r in evals:
        assert set(r) == {"step", "epoch", "eval_runtime", *PAIRED, *SAMPLED}, set(r)
        assert 0 <= r["eval_semantic_diversity"] <= 2 and 0 <= r["eval_style_diversity"] <= 2  # cosine distances
        assert 0 <= r["eval_homogenization"] <= 1 and 0 <= r["eval_distinct_1"] <= 1 and 0 <= r["eval_distinct_2"] <= 1
        assert 0 <= r["eval_quality"] <= 10 and r["eval_length"] >= 0 and 0 < r["eval_ngram_diversity"] <= 4
        assert r["eval_compression_ratio"] > 0 and 0 <= r["eval_rewards/accuracies"] <= 1 and r["eval_runtime"] > 0
        # 3 samples a prompt: Vendi score, effective rank and classes between 1 and 3
        for m in ("vendi_score", "effective_rank", "distinct_classes"):
            assert 1 - 1e-9 <= r[f"eval_{m}"] <= 3 + 1e-9, m
        assert r["eval_slop_score"] >= 0
    assert evals[-1]["eval_rewards/margins"] > 0  # held-out pairs = training pairs here: it learns them
    # training is untouched: sampling draws from its own generators, evaluation takes no gradient
    for a, b in zip(metrics(plain.output_dir), [r for r in rows if "loss" in r]):
        assert {k: v for k, v in a.items() if "time" not in k and "per_s" not in k and k != "peak_mem_gb"} == \
               {k: v for k, v in b.items() if "time" not in k and "per_s" not in k and k != "peak_mem_gb"}
    # the samples of every evaluation, and ddpo.evaluate's own numbers of them are the logged ones
    samples = os.path.join(cfg.output_dir, "eval_samples")
    assert sorted(os.listdir(samples)) == ["step-2.jsonl", "step-4.jsonl", "step-5.jsonl"]
    evaluate.main([os.path.join(samples, "step-4.jsonl"), "--names", "s", "--semantic-embedder", "stylometric",
                   "--output-dir", str(tmp_path / "eval")])
    again = json.load(open(tmp_path / "eval" / "s.metrics.json"))
    assert again["prompts"] == 6 and again["samples"] == 18
    for m in evaluate.METRICS:
        assert again[m]["mean"] == pytest.approx(evals[1][f"eval_{m}"], rel=1e-6, abs=1e-9), m


@pytest.mark.parametrize("loss, extra", [
    ("ddpo", []),                                   # the data's weights
    ("dorpo", ["--batch-size", "2", "--grad-accum", "3"]),  # released: the mean weight of all held-out pairs
    ("ddpo", ["--deviation", "style"]),             # weights of the held-out pools, as the in-step kernel's
    ("dpo", ["--precompute-ref", "--batch-size", "2", "--grad-accum", "3"]),  # cached reference, 3 micro-batches
])
def test_an_evaluation_without_update_equals_the_training_row_of_the_same_pairs(tmp_path, tiny_model, monkeypatch,
                                                                               loss, extra):
    """--warmup-steps 2 makes step 1's learning rate 0, so after it the weights are those its row was computed with;
    the held-out pairs are step 1's pairs (all of them, reversed), so every eval_ value equals step 1's training value.
    A reference other than the start model makes the rewards non-zero; with --deviation, pools of 3 to 5 texts make
    weights other than 1."""
    from conftest import pool_pairs

    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    ref = make_tiny_model(tmp_path / "ref", seed=1)
    data = (pool_pairs if "--deviation" in extra else write_pairs)(tmp_path / "pairs.jsonl")  # 9 or 6 pairs
    backwards = tmp_path / "reversed.jsonl"  # the same pairs in another order: held-out indices are their own
    backwards.write_text("".join(reversed(open(data).readlines())))
    cfg, _ = run(tmp_path, tiny_model, "--loss", loss, "--ref-model", ref, "--max-steps", "1", "--warmup-steps", "2",
                 "--batch-size", "9", "--eval-data", str(backwards), *extra, data=data)
    trained, held_out = strict_rows(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert trained["lr"] == 0.0 and held_out["step"] == 1
    keys = [k for k in trained if f"eval_{k}" in held_out]
    assert len(keys) >= 10 and "loss" in keys and "weights/max" in keys, keys
    for key in keys:
        assert held_out[f"eval_{key}"] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), key
    assert trained["rewards/margins"] != 0.0 and (loss == "dpo") == (trained["weights/max"] == 1.0)


@pytest.mark.parametrize("dtype, extra", [("float32", []), ("bfloat16", []), ("float32", ["--gradient-checkpointing"]),
                                          ("bfloat16", ["--no-packing"])])
def test_sampled_texts_are_those_of_ddpo_generate(tmp_path, tiny_model, dtype, extra):
    """The step-2 samples equal `ddpo.generate` on checkpoint-2 with the same n, max-new-tokens, seed and dtype: one
    sampler (its batches and seeds), under training's autocast, run with the KV cache (no gradient checkpointing) and
    segment attention's cached decoding, as ddpo.generate (the batch of one prompt has no padding: rows that packed
    attention would read as one sequence each)."""
    cfg, path = run(tmp_path, tiny_model, "--max-steps", "2", *sampling(tmp_path, samples=3, tokens=16, prompts=5),
                    "--dtype", dtype, *extra)
    generate.main(["--model", path, "--prompts", str(tmp_path / "prompts.jsonl"), "--output",
                   str(tmp_path / "gen.jsonl"), "--n", "3", "--max-new-tokens", "16", "--seed", str(cfg.seed),
                   "--dtype", dtype])

    def texts(name):
        return [(r["prompt_id"], r["sample"], r["response"], r["dtype"]) for r in map(json.loads, open(name))]

    sampled = texts(os.path.join(cfg.output_dir, "eval_samples", "step-2.jsonl"))
    assert len(sampled) == 15 and sampled == texts(tmp_path / "gen.jsonl")
    assert len({t for _, _, t, _ in sampled}) > 9 and {d for *_, d in sampled} == {dtype}  # not one text repeated


def test_resume_trims_evaluations_after_the_checkpoint(tmp_path, tiny_model, monkeypatch):
    import ddpo.checkpoint as checkpoint_mod

    data = write_pairs(tmp_path / "pairs.jsonl")
    args = ("--max-steps", "4", "--save-every", "2", "--eval-every", "1", "--eval-data", data,
            *sampling(tmp_path, samples=2, tokens=8))
    full, _ = run(tmp_path, tiny_model, *args, name="full", data=data)
    real_save = checkpoint_mod.save_checkpoint

    def save_then_crash(cfg, step, *a):
        path = real_save(cfg, step, *a)
        if step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_model, *args, name="resumed", data=data)
    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", real_save)
    out = tmp_path / "resumed"
    with open(out / "metrics.jsonl", "a") as f:  # what a run killed during step 3's evaluation leaves
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n" + json.dumps({"step": 3, "eval_loss": -1.0}) + "\n")
    (out / "eval_samples" / "step-3.jsonl").write_text("stale\n")
    (out / "eval_samples" / "step-7.jsonl").write_text("stale\n")
    run(tmp_path, tiny_model, *args, "--resume", name="resumed", data=data)
    a, b = metrics(full.output_dir), metrics(out)
    assert [(r["step"], "eval_loss" in r) for r in b] == [(s, e) for s in range(1, 5) for e in (False, True)]
    for ra, rb in zip(a, b):
        for key in set(ra) - {"step_time_s", "tokens_per_s", "peak_mem_gb", "eval_runtime"}:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    assert sorted(os.listdir(out / "eval_samples")) == [f"step-{s}.jsonl" for s in range(1, 5)]
    for s in range(1, 5):
        name = f"eval_samples/step-{s}.jsonl"
        assert (out / name).read_text() == (tmp_path / "full" / name).read_text()


def test_a_non_finite_evaluation_stops_before_the_checkpoint_of_its_step(tmp_path, tiny_model):
    huge = write_pairs(tmp_path / "huge.jsonl", [{"prompt": "p", "chosen": "c c", "rejected": "r r", "weight": 1e308},
                                                 {"prompt": "q", "chosen": "d", "rejected": "e", "weight": 1.0}])
    with pytest.raises(SystemExit, match=r"^error: step 2: evaluation: non-finite eval_loss inf.*; stopped before the "
                                         r"step's checkpoint \(last checkpoint: .*checkpoint-1\)"):
        run(tmp_path, tiny_model, "--max-steps", "3", "--save-every", "1", "--eval-every", "2", "--eval-data", huge)
    out = tmp_path / "run"
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == [1, 2]  # training rows only: no inf written
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


@pytest.mark.skipif(not monitor_mod.installed("tensorboard"), reason="tensorboard is not installed (optional)")
def test_report_to_tensorboard_writes_the_rows_as_events(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg, _ = run(tmp_path, tiny_model, "--max-steps", "3", "--eval-every", "2", "--eval-data", data,
                 "--report-to", "tensorboard", data=data)
    assert [p for p in os.listdir(cfg.output_dir) if p.startswith("events.out.tfevents.")]
    events = EventAccumulator(cfg.output_dir)
    events.Reload()
    rows = metrics(cfg.output_dir)
    for tag, key, steps in (("train/loss", "loss", [1, 2, 3]), ("train/rewards/margins", "rewards/margins", [1, 2, 3]),
                            ("eval/loss", "eval_loss", [2, 3]),
                            ("eval/rewards/accuracies", "eval_rewards/accuracies", [2, 3])):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == steps, tag
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in rows if key in r], rel=1e-6), tag


def test_report_to_wandb_logs_the_same_rows(tmp_path, tiny_model, monkeypatch):
    """A stand-in wandb module (the package is optional): one run, every row under TensorBoardCallback's names."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg, _ = run(tmp_path, tiny_model, "--max-steps", "2", "--eval-data", data, "--report-to", "wandb", data=data)
    init, *logged, end = calls
    assert init["project"] == "ddpo" and init["config"]["eval_data"] == data and end == "finish"
    assert [step for step, _ in logged] == [1, 2, 2]
    rows = metrics(cfg.output_dir)
    assert logged[0][1]["train/loss"] == rows[0]["loss"] and logged[2][1]["eval/loss"] == rows[2]["eval_loss"]
    assert "train/step" not in logged[0][1] and "train/epoch" in logged[0][1]


BAD_FLAGS = [  # flags (P: a prompts file), the argparse error
    (["--eval-every", "2"], "argument --eval-every: nothing to evaluate: give --eval-data or --eval-prompts"),
    (["--eval-samples", "3"], "argument --eval-samples: sets the sampled evaluation, which needs --eval-prompts"),
    (["--eval-max-new-tokens=9"], "argument --eval-max-new-tokens: sets the sampled evaluation"),
    (["--eval-prompts", "P", "--eval-samples", "1"], "argument --eval-samples: must be >= 2, got 1"),
    (["--eval-prompts", "P", "--eval-max-new-tokens", "0"], "argument --eval-max-new-tokens: must be >= 1"),
    (["--eval-every", "-1"], "argument --eval-every: must be >= 0"),
    (["--eval-prompts", "P", "--eval-quality", "judge"], "argument --eval-quality: unknown scorer 'judge'"),
    (["--eval-prompts", "P", "--fsdp"], "argument --eval-prompts: sampling needs the whole policy on every rank"),
    (["--report-to", "mlflow"], "argument --report-to: unknown 'mlflow': use none, tensorboard, wandb"),
    (["--report-to", "tensorboard", "MISSING"], "argument --report-to: tensorboard is not installed: pip install "
                                                "tensorboard"),
    (["--report-to", "none,wandb", "MISSING"], "argument --report-to: wandb is not installed: pip install wandb"),
    (["--report-to", "wandb"], "argument --report-to: wandb is not logged in: run `wandb login`"),
]


@pytest.mark.parametrize("flags, error", BAD_FLAGS)
def test_bad_flags_are_one_line_at_parse_time(tmp_path, tiny_model, monkeypatch, capsys, flags, error):
    monkeypatch.setattr(train_mod, "load_tokenizer", no_model)
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    # every optional package missing ("MISSING"), or all there and wandb never logged in
    missing = "MISSING" in flags
    monkeypatch.setattr(monitor_mod, "installed", lambda package: not missing)
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    flags = [prompts_file(tmp_path) if f == "P" else f for f in flags if f != "MISSING"]
    with pytest.raises(SystemExit) as e:
        main(["--model", tiny_model, "--data", write_pairs(tmp_path / "pairs.jsonl"), "--output-dir",
              str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and error in err, err
    assert not (tmp_path / "out").exists()


BAD_FILES = [  # files under tmp_path, flags, the error
    ({}, ["--eval-data", "{tmp}/none.jsonl"], r"^error: --eval-data: .*/none.jsonl: no such file or directory$"),
    ({"held.jsonl": '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n'},
     ["--eval-data", "{tmp}/held.jsonl"], r"^error: --eval-data: .*/held.jsonl:2: missing field 'rejected'$"),
    ({"held.jsonl": '{"prompt": "p", "chosen": "c", "rejected": "r", "weight": -1}\n'},
     ["--eval-data", "{tmp}/held.jsonl"], r"^error: --eval-data: .*/held.jsonl:1: weight must be"),
    ({"pairs.jsonl": '{"prompt": "p", "chosen": "c", "rejected": "r", "score": 1}\n',
      "held.jsonl": '{"prompt": "p", "chosen": "c", "rejected": "r"}\n'},
     ["--eval-data", "{tmp}/held.jsonl", "--weight-field", "score"],
     r"^error: --eval-data: .*/held.jsonl:1: missing field 'score' \(the weight, named by --weight-field\)$"),
    ({}, ["--eval-prompts", "{tmp}/none.jsonl"], r"^error: --eval-prompts: .*/none.jsonl: no such file or directory$"),
    ({"p.jsonl": '{"prompt": "a"}\n{"text": "b"}\n'}, ["--eval-prompts", "{tmp}/p.jsonl"],
     r"^error: --eval-prompts: .*/p.jsonl:2: missing field 'prompt'$"),
    ({"p.jsonl": '{"prompt": "a"}\n'}, ["--eval-prompts", "{tmp}/p.jsonl", "--semantic-embedder", "./no/such"],
     r"^error: --semantic-embedder ./no/such: no such directory$"),
    ({"p.jsonl": '{"prompt": "a"}\n'}, ["--eval-prompts", "{tmp}/p.jsonl", "--eval-quality", "reward-model:./no/rm"],
     r"^error: --eval-quality ./no/rm: no such directory$"),
]


@pytest.mark.parametrize("files, flags, error", BAD_FILES)
def test_bad_files_are_one_line_before_a_model_loads(tmp_path, tiny_model, monkeypatch, files, flags, error):
    monkeypatch.setattr(train_mod, "load_tokenizer", no_model)
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    files = {"pairs.jsonl": '{"prompt": "p", "chosen": "c", "rejected": "r"}\n', **files}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["--model", tiny_model, "--data", str(tmp_path / "pairs.jsonl"), "--output-dir", str(tmp_path / "out"),
              *[f.format(tmp=tmp_path) for f in flags]])
    assert re.search(error, str(e.value.code)), e.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # nothing written


def test_sampled_evaluation_longer_than_the_context_stops_before_step_one(tmp_path, tiny_model):
    # the tiny model's context is 512 tokens: the error comes when the policy is known, not at the first evaluation
    with pytest.raises(SystemExit, match="^error: --eval-max-new-tokens 600 leaves no room for a prompt in a context "
                                         "of 512$"):
        main(["--model", tiny_model, "--data", write_pairs(tmp_path / "pairs.jsonl"), "--output-dir",
              str(tmp_path / "out"), "--max-steps", "2", "--eval-prompts", prompts_file(tmp_path),
              "--eval-max-new-tokens", "600"])
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def fake_rows(shift):
    rows = []
    for step in range(1, 7):
        rows.append({"step": step, "epoch": step / 3, "loss": 0.7 - 0.05 * step + shift, "rewards/margins": 0.1 * step,
                     "weights/mean": 1.0, "weights/min": 0.5 + shift, "weights/max": 1.5})
        if step % 3 == 0:
            rows.append({"step": step, "epoch": step / 3, "eval_loss": 0.6 - 0.02 * step, "eval_rewards/margins": 0.05,
                         "eval_semantic_diversity": 0.5 + shift + 0.01 * step, "eval_style_diversity": 0.9,
                         "eval_quality": 6.0 - step * 0.1})
    return rows


def test_curves_of_two_runs_in_one_png(tmp_path, capsys):
    for name, shift in (("dpo", 0.0), ("ddpo", 0.05)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "metrics.jsonl", fake_rows(shift))
    write_jsonl(tmp_path / "sft.jsonl", [{"step": 1, "loss": 2.0}])  # no evaluations: its panels stay empty
    out = tmp_path / "plots" / "curves.png"
    curves.main([str(tmp_path / "dpo"), str(tmp_path / "ddpo"), str(tmp_path / "sft.jsonl"), "--output", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert f"curves: {out}" in capsys.readouterr().out
    steps, (diversity, quality) = curves.series(fake_rows(0.0), "eval_semantic_diversity", "eval_quality")
    assert steps == [3, 6] and diversity == pytest.approx([0.53, 0.56]) and quality == pytest.approx([5.7, 5.4])


def test_curves_write_the_format_their_name_says(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", fake_rows(0.0))
    curves.main([str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "c.pdf")])
    curves.main([str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "c.svg")])
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-" and b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]
    with pytest.raises(SystemExit, match=r"--output .*c.xyz: cannot write .xyz images"):
        curves.main([str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "c.xyz")])
    assert sorted(os.listdir(tmp_path)) == ["c.pdf", "c.svg", "m.jsonl"]


@pytest.mark.parametrize("setup, argv, error", [
    (lambda t: None, ["{t}/nowhere"], r"^error: .*/nowhere: no metrics.jsonl \(not a ddpo.train output directory\)$"),
    (lambda t: write_jsonl(t / "m.jsonl", [{"step": 1}, {"loss": 1.0}]), ["{t}/m.jsonl"],
     r"^error: .*/m.jsonl:2: not a metrics line of ddpo.train \(no integer 'step'\)$"),
    (lambda t: write_jsonl(t / "m.jsonl", ["{"]), ["{t}/m.jsonl"], r"^error: .*/m.jsonl:1: malformed JSON"),
    (lambda t: write_jsonl(t / "m.jsonl", [{"step": 1}]), ["{t}/m.jsonl", "--names", "a", "b"],
     r"^error: --names: 2 names for 1 runs$"),
    (lambda t: write_jsonl(t / "m.jsonl", [{"step": 1}]), ["{t}/m.jsonl", "{t}/m.jsonl"],
     r"^error: --names: run names must be distinct"),
])
def test_curves_refuse_bad_input_in_one_line(tmp_path, setup, argv, error):
    setup(tmp_path)
    with pytest.raises(SystemExit) as e:
        curves.main([a.format(t=tmp_path) for a in argv] + ["--output", str(tmp_path / "c.png")])
    assert re.search(error, str(e.value.code)), e.value.code
    assert not (tmp_path / "c.png").exists()
