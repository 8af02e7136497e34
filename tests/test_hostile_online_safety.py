"""Hostile cases of ddpo.online (issue 29): prompts read once, --resume compares what the model is. Each row sets up a
case under tmp_path and runs the command (tests/hostile.py); its comment names the commit on which it fails:
17a792b (before this change)."""

import json
import os
import shutil
import threading

import pytest
from conftest import make_tiny_encoder, make_tiny_model, write_jsonl
from hostile import call, expect_error, expect_success, run, snapshot

from ddpo.online import main

PROMPTS = [{"prompt": p} for p in ("Write a story about a lighthouse.", "Write a poem about rain.",
                                    "Describe a dragon.")]


def online(tmp_path, model, *flags, prompts=None):
    """ddpo.online's argv: one round of 2 prompts x 2 samples from tmp_path/prompts.jsonl into tmp_path/run."""
    return ["--model", model, "--prompts", prompts or str(tmp_path / "prompts.jsonl"), "--output-dir",
            str(tmp_path / "run"), "--semantic-embedder", str(tmp_path / "encoder"), "--prompts-per-round", "2",
            "--n", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--dtype", "float32", "--deviation", "style",
            *([] if "--rounds" in flags else ["--rounds", "1"]), *flags]


# ---- hangs --------------------------------------------------------------------------------------------------------

def fifo_prompts(tmp_path, model):  # 17a792b: the digest read the FIFO a second time and blocked forever
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    content = (tmp_path / "prompts.jsonl").read_bytes()
    threading.Thread(target=lambda: fifo.write_bytes(content), daemon=True).start()
    expect_success(run(["-m", "ddpo.online", *online(tmp_path, model, prompts=str(fifo))], timeout=300))
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


# ---- silent wrong results ------------------------------------------------------------------------------------------

def resume_path_names_another_model(tmp_path, model):  # 17a792b: "./m" equal as a string, so resumed
    shutil.copytree(model, tmp_path / "m")
    expect_success(call(main, online(tmp_path, "./m")))
    shutil.rmtree(tmp_path / "m")
    make_tiny_model(tmp_path / "m", seed=1)
    before = snapshot(tmp_path / "run")
    expect_error(call(main, online(tmp_path, "./m", "--rounds", "2", "--resume")),
                 r"checkpoint-1 was trained with other settings: model_identity 'files [0-9a-f]+' there")
    assert snapshot(tmp_path / "run") == before


def resume_config_lacks_a_key(tmp_path, model):  # 17a792b: a key missing from the checkpoint's config was skipped
    expect_success(call(main, online(tmp_path, model)))
    path = tmp_path / "run" / "checkpoint-1" / "train_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "temperature"}))
    before = snapshot(tmp_path / "run")
    expect_error(call(main, online(tmp_path, model, "--rounds", "2", "--resume", "--temperature", "0.5")),
                 r"checkpoint-1/train_config.json lacks temperature: written by another version")
    assert snapshot(tmp_path / "run") == before


CASES = {
    "hangs": [fifo_prompts],
    "silent wrong results": [resume_path_names_another_model, resume_config_lacks_a_key],
}


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{category}: {c.__name__}")
                                  for category, cases in CASES.items() for c in cases])
def test_hostile_online(tmp_path, tiny_model, monkeypatch, case):
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    make_tiny_encoder(tmp_path / "encoder", ["a", "e", "the"])
    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # where relative paths (./m) are
    case(tmp_path, tiny_model)
