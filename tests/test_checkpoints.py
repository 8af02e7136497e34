"""Checkpoints and resume: resume equality and its rules, the lock, temporaries, links, non-finite steps
and weights never saved, the reference cache, tampered state."""

import json
import os
import socket
import subprocess
import sys
import pytest
import torch
from conftest import write_pairs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import ddpo.checkpoint as checkpoint_mod
import ddpo.train as train_mod
from ddpo.data import DataError
from ddpo.files import temporary_path
from ddpo.train import parse_args, train
from conftest import METRICS, run, metrics, strict_rows


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
    assert sorted(os.listdir(resumed.output_dir)) == ["checkpoint-4", "checkpoint-5", "metrics.jsonl",
                                                      "train_config.json"]


def test_existing_checkpoint_needs_resume(tmp_path, tiny_model):
    run(tmp_path, tiny_model, "--max-steps", "1", name="x")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, tiny_model, "--max-steps", "2", name="x")


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
            assert (a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)
                    and a[key] == pytest.approx(c[key], rel=1e-4, abs=1e-5)), key


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
    cfg, path = run(tmp_path, tiny_model, "--max-steps", "8", "--save-every", "3", "--resume",
                    "--keep-checkpoints", "1", "--log-every", "1", "--device", "cpu", "--precompute-ref", data=moved)
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
    with pytest.raises(DataError,
                       match=r"^--resume: .*checkpoint-2 holds the model only \(saved with --save-only-model"):
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


def test_weights_made_non_finite_by_the_update_are_never_saved(tmp_path, tiny_model):
    """--lr 1e308: the loss and gradient of step 1 are finite, the update is not."""
    with pytest.raises(SystemExit, match=r"step 1: the update made weights non-finite; stopped before its checkpoint"):
        run(tmp_path, tiny_model, "--max-steps", "1", "--lr", "1e308", "--max-grad-norm", "0")
    assert not [p for p in (tmp_path / "run").glob("checkpoint-*")]
