"""bench/gpu.py without a GPU: one stage end to end at --cpu-smoke sizes, and a stage stopped at its time budget."""

import json
import os
import signal
import subprocess
import sys
import time

from bench.gpu import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_smoke_stage_appends_rows_and_prints_the_table(tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = [sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--stages", "deviation", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    assert [r["impl"] for r in rows] == ["eager (ddpo.deviation + loss)", "fused (ours)"]
    assert all(r["device"].startswith("CPU") and r["pairs"] == 8 for r in rows)
    assert "| deviation_loss | fused (ours) | 8 pairs, groups of 8, D=1024 |" in proc.stdout


def test_a_stage_out_of_time_is_killed_with_its_children():
    """The stage's own subprocess (as bench.train_step starts one per trainer) is killed too: it holds the output
    pipe, so run() would otherwise wait the full minute."""
    child = "import time; time.sleep(60)"
    stage = f"import subprocess, sys; print('started', flush=True); subprocess.run([sys.executable, '-c', {child!r}])"
    start = time.monotonic()
    code, lines = run([sys.executable, "-c", stage], 2)
    assert code == -signal.SIGKILL and lines == ["started\n"] and time.monotonic() - start < 30
