"""Two CPU processes (torchrun, gloo) equal one process running the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import write_pairs
from safetensors.torch import load_file

from test_train import metrics


@pytest.mark.parametrize("loss", ["ddpo", "dorpo"])
def test_two_ranks_equal_one_process(tmp_path, tiny_model, loss):
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ["--model", tiny_model, "--data", data, "--loss", loss, "--max-steps", "2", "--batch-size", "2",
              "--lr", "1e-3", "--precompute-ref"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPO_CACHE": str(tmp_path / "cache")}
    single = subprocess.run([sys.executable, "-m", "ddpo.train", *common, "--grad-accum", "2",
                             "--output-dir", str(tmp_path / "single")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ddpo.train", *common, "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 ranks" in two.stdout and two.stdout.count("saved ") == 1  # rank 0 alone logs and saves
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "weights/mean", "weights/max"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa = load_file(tmp_path / "single" / "checkpoint-2" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "checkpoint-2" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5, msg=key)
