"""Hostile cases of ddpo.train (issue 29): nothing lost, nothing hung, no silent wrong result. Each row sets up a case
under tmp_path and runs the command (tests/hostile.py: in this process, or in its own where it could hang or needs
torchrun or bash); its comment names the commit on which it fails: 17a792b (before this change), or c7c0b8b (the
last commit before the fixes of 2026-12-03; 56e73d0's kernels/ package shadows the one transformers 5.25 imports)."""

import hashlib
import json
import os
import shutil
import threading

import pytest
from conftest import STORIES, make_tiny_model, write_pairs
from hostile import call, expect_error, expect_success, run, shell, snapshot

from ddpo.train import main

TRAIN = ["--batch-size", "2", "--dtype", "float32", "--lr", "1e-3"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def train(tmp_path, model, *flags, data=None):
    """ddpo.train's argv: tmp_path/pairs.jsonl into tmp_path/run, one step unless the flags say how long."""
    steps = [] if {"--max-steps", "--epochs"} & set(flags) else ["--max-steps", "1"]
    return [*TRAIN, "--model", model, "--data", data or str(tmp_path / "pairs.jsonl"),
            "--output-dir", str(tmp_path / "run"), *steps, *flags]


def trained(tmp_path, model, *flags):
    """A one-step run into tmp_path/run (checkpoint-1), for the --resume cases."""
    expect_success(call(main, train(tmp_path, model, *flags)))


def process(argv):
    """ddpo.train's argv for a process of its own."""
    return ["-m", "ddpo.train", *argv]


def rank_data(tmp_path, rank_1_rows):
    """Each rank its own copy of data.jsonl, as nodes have: r0/ the stories, r1/ rank_1_rows, and a launcher that
    runs rank r in r<r>/ (torchrun gives every rank the same flags: --data data.jsonl)."""
    for rank in (0, 1):
        (tmp_path / f"r{rank}").mkdir()
    write_pairs(tmp_path / "r0" / "data.jsonl")
    (tmp_path / "r1" / "data.jsonl").write_text(rank_1_rows)
    launcher = tmp_path / "launch.py"
    launcher.write_text("import os, runpy\nos.chdir(f\"r{os.environ['RANK']}\")\n"
                        "runpy.run_module('ddpo.train', run_name='__main__')\n")
    return [*TORCHRUN, str(launcher)]


def no_rank_traceback(outcome):
    """Under torchrun the launcher prints its own ChildFailedError report; no rank may print a traceback of ours."""
    assert outcome.code not in (0, None), (outcome.code, outcome.stderr[-3000:])
    assert 'ddpo/' not in "".join(line for line in outcome.stderr.splitlines() if line.strip().startswith("File ")), \
        outcome.stderr[-3000:]


# ---- data loss and security ------------------------------------------------------------------------------------

def user_tmp_entries(tmp_path, model):  # c7c0b8b: every .tmp-* entry in --output-dir was removed at start
    (tmp_path / "run" / ".tmp-notes").mkdir(parents=True)
    (tmp_path / "run" / ".tmp-notes" / "keep.txt").write_text("mine")
    (tmp_path / "run" / ".tmp-checkpoint-mine").write_text("mine")
    before = snapshot(tmp_path / "run")
    outcome = call(main, train(tmp_path, model))
    expect_success(outcome)
    assert {k: v for k, v in snapshot(tmp_path / "run").items() if k in before} == before


def foreign_metrics(tmp_path, model):  # c7c0b8b: a foreign metrics.jsonl was truncated
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("my own notes\n")
    before = snapshot(tmp_path)
    expect_error(call(main, train(tmp_path, model)), r"metrics.jsonl that ddpo.train did not write")
    assert snapshot(tmp_path) == before


def metrics_link(tmp_path, model):  # c7c0b8b: training wrote through the link, outside the output directory
    (tmp_path / "run").mkdir()
    (tmp_path / "outside.txt").write_text("keep me\n")
    os.symlink(tmp_path / "outside.txt", tmp_path / "run" / "metrics.jsonl")
    before = snapshot(tmp_path)
    expect_error(call(main, train(tmp_path, model)), r"metrics.jsonl is a link")
    assert snapshot(tmp_path) == before


# ---- hangs --------------------------------------------------------------------------------------------------------

def dangling_lock(tmp_path, model):  # c7c0b8b: spun at 100% CPU forever
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "run" / ".lock")
    expect_error(run(process(train(tmp_path, model)), timeout=300), r"\.lock is not a lock file this tool wrote")


def fifo_data(tmp_path, model):  # 17a792b: the digest read the FIFO a second time and blocked forever
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    content = (tmp_path / "pairs.jsonl").read_bytes()
    threading.Thread(target=lambda: fifo.write_bytes(content), daemon=True).start()
    expect_success(run(process(train(tmp_path, model, data=str(fifo))), timeout=300))
    assert recorded_digest(tmp_path) == digest(content)


def recorded_digest(tmp_path):
    return json.loads((tmp_path / "run" / "train_config.json").read_text())["data_sha256"]


def digest(content):
    """data_sha256 of one file's content (the sha256 of the file's sha256)."""
    return hashlib.sha256(hashlib.sha256(content).digest()).hexdigest()


def ranks_with_other_data(tmp_path, model):  # 17a792b: both ranks trained, each on its own data, and exited 0
    rows = "".join(json.dumps({"prompt": p, "chosen": r, "rejected": c}) + "\n" for p, c, r in STORIES)  # swapped
    outcome = run([*rank_data(tmp_path, rows), *train(tmp_path, model, data="data.jsonl")], cwd=tmp_path, timeout=500)
    no_rank_traceback(outcome)
    assert "error: torchrun: the ranks read different inputs: data_sha256" in outcome.stderr, outcome.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def one_rank_bad_data(tmp_path, model):  # 17a792b: rank 1 stopped alone; rank 0 was killed by torchrun, no reason
    outcome = run([*rank_data(tmp_path, '{"prompt": "p", "chosen"\n'), *train(tmp_path, model, data="data.jsonl")],
                  cwd=tmp_path, timeout=500)
    no_rank_traceback(outcome)
    assert "error: rank 1: data.jsonl:1: malformed JSON" in outcome.stderr, outcome.stderr[-3000:]


def hung_teardown(tmp_path, model):  # 17a792b: a rank hung in the process group's teardown held torchrun forever
    script = tmp_path / "teardown.py"
    script.write_text("import threading\nimport torch.distributed as dist\nfrom ddpo import distributed\n"
                      "dist.init_process_group('gloo')\ndistributed.EXIT_TIMEOUT = 5\n"
                      "dist.destroy_process_group = threading.Event().wait  # a teardown that never returns\n"
                      "distributed.shutdown_distributed(2)\n")
    outcome = run([*TORCHRUN, str(script)], timeout=300)
    assert outcome.code not in (0, None), (outcome.code, outcome.stderr[-3000:])
    assert "Timeout (0:00:05)!" in outcome.stderr, outcome.stderr[-3000:]
    assert "in shutdown_distributed" in outcome.stderr, outcome.stderr[-3000:]  # where it hung


# ---- silent wrong results ------------------------------------------------------------------------------------------

def process_substitution(tmp_path, model):  # 17a792b: the second read found the pipe empty: the digest of nothing
    expect_success(shell(process(train(tmp_path, model, data="DATA")), {"DATA": "<(cat pairs.jsonl)"}, cwd=tmp_path,
                         timeout=300))
    assert recorded_digest(tmp_path) == digest((tmp_path / "pairs.jsonl").read_bytes())


def resume_path_names_another_model(tmp_path, model):  # 17a792b: "./m" equal as a string, so resumed
    shutil.copytree(model, tmp_path / "m")
    trained(tmp_path, "./m")
    shutil.rmtree(tmp_path / "m")
    make_tiny_model(tmp_path / "m", seed=1)
    before = snapshot(tmp_path / "run")
    expect_error(call(main, train(tmp_path, "./m", "--max-steps", "2", "--resume")),
                 r"checkpoint-1 was trained with other settings: model_identity 'files [0-9a-f]+' there")
    assert snapshot(tmp_path / "run") == before


def resume_same_model_other_path(tmp_path, model):  # 17a792b: refused ("model './m' there, '/.../m' now")
    shutil.copytree(model, tmp_path / "m")
    trained(tmp_path, "./m")
    expect_success(call(main, train(tmp_path, str(tmp_path / "m"), "--max-steps", "2", "--resume")))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def resume_config_lacks_a_key(tmp_path, model):  # 17a792b: a key missing from the checkpoint's config was skipped
    trained(tmp_path, model)
    path = tmp_path / "run" / "checkpoint-1" / "train_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "beta"}))
    before = snapshot(tmp_path / "run")
    expect_error(call(main, train(tmp_path, model, "--max-steps", "2", "--resume", "--beta", "0.5")),
                 r"checkpoint-1/train_config.json lacks beta: written by another version")
    assert snapshot(tmp_path / "run") == before


def resume_below_the_checkpoint(tmp_path, model):  # c7c0b8b: trained nothing, exited 0, rewrote train_config.json
    trained(tmp_path, model, "--max-steps", "2")
    before = snapshot(tmp_path / "run")
    expect_error(call(main, train(tmp_path, model, "--max-steps", "1", "--resume")),
                 r"the plan has 1 steps, but .* step 2")
    assert snapshot(tmp_path / "run") == before


def plan_of_no_step(tmp_path, model):  # c7c0b8b: printed "saved None" and exited 0
    expect_error(call(main, train(tmp_path, model, "--epochs", "1e-12")),
                 r"--epochs 1e-12: 6 pairs in steps of 2 make no optimiser step")


def overflowing_update(tmp_path, model):  # c7c0b8b: saved a checkpoint of non-finite weights
    expect_error(call(main, train(tmp_path, model, "--lr", "1e308")), r"the update made weights non-finite")
    assert not any(name.startswith("checkpoint-") for name in os.listdir(tmp_path / "run"))


# ---- lone surrogates (issue 29's tracebacks, item 3 of this part) -------------------------------------------------

def lone_surrogate(tmp_path, model):  # 17a792b: a traceback from the tokenizer
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write('{"prompt": "p", "chosen": "a\\ud800b", "rejected": "c"}\n')
    expect_error(call(main, train(tmp_path, model)), r"pairs.jsonl:7: lone surrogate")
    assert not (tmp_path / "run").exists()


CASES = {  # category -> the cases
    "data loss and security": [user_tmp_entries, foreign_metrics, metrics_link],
    "hangs": [dangling_lock, fifo_data, ranks_with_other_data, one_rank_bad_data, hung_teardown],
    "silent wrong results": [process_substitution, resume_path_names_another_model, resume_same_model_other_path,
                             resume_config_lacks_a_key, resume_below_the_checkpoint, plan_of_no_step,
                             overflowing_update],
    "tracebacks": [lone_surrogate],
}


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{category}: {c.__name__}")
                                  for category, cases in CASES.items() for c in cases])
def test_hostile_train(tmp_path, tiny_model, monkeypatch, case):
    write_pairs(tmp_path / "pairs.jsonl")
    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # where relative paths (./m) are
    case(tmp_path, tiny_model)
