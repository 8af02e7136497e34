"""What every benchmark row carries: device, versions, git SHA, date; rows are appended to a JSONL."""

import datetime
import json
import os
import platform
import subprocess

import torch


def environment():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "torch": torch.__version__, "triton": triton_version, "git": sha}


def append_rows(path, rows):
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**environment(), **row}) + "\n")
