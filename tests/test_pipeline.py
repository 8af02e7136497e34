"""ddpo.pipeline end to end on a tiny model (no packaged models needed), and its resume."""

import json
import os

import pytest
import torch

from ddpo.models import autocast_dtype
from ddpo.pipeline import main

pytestmark = pytest.mark.slow  # whole pipelines and experiments: python -m pytest -m 'not slow' skips them

NOT_AUTO = "float32" if autocast_dtype("auto", torch.device("cpu")) else "bfloat16"  # the dtype auto is not here


def test_pipeline_end_to_end_and_resume(tmp_path, tiny_model, capsys):
    args = ["--quick", "--model", tiny_model, "--work-dir", str(tmp_path), "--semantic-embedder", "stylometric",
            "--dtype", NOT_AUTO]
    main(args)
    out = capsys.readouterr().out
    assert "| dpo |" in out and "| ddpo |" in out and "plot:" in out
    assert "difference to dpo" in out and "\nddpo - dpo: semantic diversity " in out  # the reading, after the tables
    assert f"curves: {tmp_path / 'eval' / 'curves.png'}" in out and "eval step 2/2 | eval_semantic_diversity" in out
    assert (tmp_path / "eval" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("dpo", "ddpo"):
        metrics = json.load(open(tmp_path / "eval" / f"{name}.metrics.json"))
        assert metrics["prompts"] == 2 and metrics["samples"] == 6
        assert ("vs_baseline" in metrics) == (name == "ddpo")
        assert os.path.isdir(tmp_path / name / "checkpoint-2")
        assert json.load(open(tmp_path / name / "train_config.json"))["dtype"] == NOT_AUTO  # --dtype reaches
        for samples in (tmp_path / name / "samples.jsonl", tmp_path / "responses.jsonl"):  # every stage
            assert {json.loads(line)["dtype"] for line in open(samples)} == {NOT_AUTO}
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]  # sampled during training
        assert [r["step"] for r in rows if "eval_semantic_diversity" in r] == [2]  # --quick: 2 steps, the last
        assert len(open(tmp_path / name / "eval_samples" / "step-2.jsonl").readlines()) == 2 * 4  # 2 prompts x 4
    pairs = [json.loads(line) for line in open(tmp_path / "pairs-deviation_both.jsonl")]
    assert pairs and all("weight" in p for p in pairs)
    for prompt in {p["prompt"] for p in pairs}:  # the pool: the texts of the prompt's kept pairs (released order)
        mine = [p for p in pairs if p["prompt"] == prompt]
        assert all(p["meta"]["group_size"] == len({p[k] for p in mine for k in ("chosen", "rejected")}) for p in mine)
    stamp = os.path.getmtime(tmp_path / "ddpo" / "checkpoint-2" / "model.safetensors")
    main(args)  # everything is there: no stage runs again
    assert os.path.getmtime(tmp_path / "ddpo" / "checkpoint-2" / "model.safetensors") == stamp
    assert "generating 3 samples for 0 prompts" in capsys.readouterr().out


def load_experiment(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "experiments",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mechanism_correlations_by_hand():
    import torch

    mechanism = load_experiment("mechanism")
    weights = torch.tensor([0.0, 1.0, 3.0, 0.5, 1.5, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    r = mechanism.correlations(torch.tensor([1.0, 2.0, 4.0, -1.0, -3.0, -2.0]), weights, group)
    # delta an increasing (first group) / decreasing (second group) linear function of the weight
    assert r.tolist() == pytest.approx([1.0, -1.0], abs=1e-12)
    r = mechanism.correlations(torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0, 0.0]), weights, group)
    assert r[0] != r[0] and abs(r[1].item()) < 1e-12  # constant delta: NaN; orthogonal: 0


def test_mechanism_training_pools_are_one_pool_per_round_and_prompt(tmp_path):
    mechanism = load_experiment("mechanism")
    rows = {2: [("a", "x"), ("a", "y"), ("b", "z")], 10: [("a", "w"), ("a", "v")]}
    for r, pool in rows.items():
        with open(tmp_path / f"round-{r}.pools.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt_id": p, "prompt": p, "response": t}) + "\n" for p, t in pool)
        (tmp_path / f"round-{r}.jsonl").write_text("{}\n")  # the round's pairs: not a pool
    got = [(row["prompt_id"], row["response"]) for row in mechanism.training_pools(str(tmp_path))]
    assert got == [("round-2:a", "x"), ("round-2:a", "y"), ("round-2:b", "z"), ("round-10:a", "w"), ("round-10:a", "v")]
    assert [row["response"] for row in mechanism.training_pools(str(tmp_path), first=3)] == ["w", "v"]


def test_mechanism_check_runs_on_pipeline_arms(tmp_path, tiny_model):
    mechanism = load_experiment("mechanism")
    main(["--quick", "--model", tiny_model, "--work-dir", str(tmp_path), "--semantic-embedder", "stylometric"])
    results = mechanism.run(mechanism.parse_args(["--work-dir", str(tmp_path), "--model", tiny_model, "--n", "3",
                                                  "--pool-prompts", "3", "--max-new-tokens", "8",
                                                  "--semantic-embedder", "stylometric"]))
    assert results["responses"] == 9 and set(results["arms"]) == {"dpo", "ddpo"}
    assert "vs_baseline" in results["arms"]["ddpo"] and "vs_baseline" not in results["arms"]["dpo"]
    assert os.path.exists(tmp_path / "mechanism" / "report.md")


def test_evidence_runs_every_arm_and_pools_the_seeds(tmp_path, tiny_model):
    evidence = load_experiment("evidence")
    evidence.main(["--quick", "--model", tiny_model, "--work-dir", str(tmp_path), "--semantic-embedder", "stylometric",
                   "--train-seeds", "0", "1"])
    results = json.load(open(tmp_path / "evidence.json"))
    assert set(results) == {"ddpo-both", "ddpo-sem", "ddpo-sty", "divpo", "start", "power", "mechanism"}
    both = results["ddpo-both"]["semantic_diversity"]
    runs = {n: evidence.per_prompt(tmp_path / "eval", n) for n in ("dpo-s0", "dpo-s1", "ddpo-both-s0", "ddpo-both-s1")}
    keys = list(runs["dpo-s0"]["semantic_diversity"])
    diffs = [sum(runs[f"ddpo-both-s{s}"]["semantic_diversity"][k] - runs[f"dpo-s{s}"]["semantic_diversity"][k]
                 for s in (0, 1)) / 2 for k in keys]  # each prompt's difference, averaged over the seeds
    assert both["diff"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12) and both["prompts"] == len(keys) == 2
    assert both["per_prompt_sd"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2 ** 0.5, abs=1e-12)  # SD of 2 values
    assert "## Mechanism" in open(tmp_path / "evidence.md").read()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be >= 1"),
    (["--n", "1"], "argument --n: must be >= 2"),
    (["--eval-n", "1"], "argument --eval-n"),
    (["--lr", "nan"], "argument --lr"),
    (["--beta", "-1"], "argument --beta"),
    (["--eval-prompts", "1"], "argument --eval-prompts"),
    (["--monitor-prompts", "33"], "argument --monitor-prompts: 33, but ddpo/data/prompts_eval.jsonl holds 32"),
    (["--monitor-every", "0"], "argument --monitor-every: must be >= 1"),
    (["--train-flags", "--loss simpo"], "argument --train-flags: --loss is set by the pipeline for each arm"),
    (["--train-flags=--lora-r 4 --lr=1e-3"], "--lr is set by the pipeline for each arm; use the pipeline's --lr"),
    (["--train-flags", "--los simpo"], "argument --train-flags: --loss is set by the pipeline for each arm"),
])
def test_pipeline_flags_are_checked_at_parse_time(argv, message, capsys):
    from ddpo.pipeline import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_quick_keeps_the_sizes_given_on_the_command_line():
    from ddpo.pipeline import QUICK, parse_args

    assert parse_args(["--quick"]).steps == QUICK["steps"]
    cfg = parse_args(["--quick", "--steps", "5", "--n=6"])
    assert (cfg.steps, cfg.n, cfg.train_prompts) == (5, 6, QUICK["train_prompts"])


def test_dose_response_stops_resumes_and_reads_against_the_start_model(tmp_path, tiny_model, capsys):
    """experiments/dose_response.py --quick: one dose trained to step 1, sampled, resumed to step 2 (not retrained
    from 0), sampled; every stop paired with the start model; a second run does nothing again."""
    dose = load_experiment("dose_response")
    args = ["--quick", "--model", tiny_model, "--work-dir", str(tmp_path), "--semantic-embedder", "stylometric",
            "--dtype", "float32"]
    dose.main(args)
    out = capsys.readouterr().out
    run = tmp_path / "dpo-lr0.0001-beta0.1"
    assert "resumed from" in out and f"{run / 'checkpoint-1'}" in out  # step 2 continued step 1's run
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # --keep-checkpoints 1
    rows = json.load(open(tmp_path / "dose.json"))
    assert [(r["dose"], r["steps"]) for r in rows] == [("1e-4:0.1", 1), ("1e-4:0.1", 2)]
    for r in rows:  # DPO - start, paired over the 2 held-out prompts
        assert r["semantic_diversity"]["prompts"] == 2 and len(r["semantic_diversity"]["ci95"]) == 2
    report = (tmp_path / "dose.md").read_text()
    assert "| 1e-4:0.1 | 2 |" in report and (tmp_path / "dose.png").read_bytes()[:4] == b"\x89PNG"
    stamp = os.path.getmtime(run / "samples-2.jsonl")
    dose.main(args)
    assert os.path.getmtime(run / "samples-2.jsonl") == stamp and "resumed from" not in capsys.readouterr().out


def test_a_stage_error_is_one_line_not_a_traceback(tmp_path, tiny_model):
    with pytest.raises(SystemExit, match=r"^error: --semantic-embedder \./no/such: no such directory"):
        main(["--quick", "--model", tiny_model, "--work-dir", str(tmp_path), "--semantic-embedder", "./no/such",
              "--dtype", "float32"])


def test_online_narrowing_runs_both_arms_resumes_and_reads_against_the_start_model(tmp_path, tiny_model, capsys,
                                                                                   monkeypatch):
    """experiments/online_narrowing.py --quick: online DPO and DDPO, 2 rounds each, evaluated at rounds 1 and 2
    against the start model's samples; a second run trains nothing again."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "experiments"))
    narrowing = load_experiment("online_narrowing")
    args = ["--quick", "--model", tiny_model, "--work-dir", str(tmp_path), "--semantic-embedder", "stylometric",
            "--dtype", "float32"]
    narrowing.main(args)
    rows = json.load(open(tmp_path / "online.json"))
    assert [(r["dose"], r["steps"]) for r in rows] == [("dpo", 1), ("dpo", 2), ("ddpo", 1), ("ddpo", 2)]
    for r in rows:  # arm - start, paired over the 2 held-out prompts
        assert r["semantic_diversity"]["prompts"] == 2 and len(r["semantic_diversity"]["ci95"]) == 2
    assert "| ddpo | 2 |" in (tmp_path / "online.md").read_text()
    stamp = os.path.getmtime(tmp_path / "dpo" / "metrics.jsonl")
    capsys.readouterr()
    narrowing.main(args)
    assert os.path.getmtime(tmp_path / "dpo" / "metrics.jsonl") == stamp and "online dpo" not in capsys.readouterr().out
