"""keep_freed_memory: memory a large tensor frees is reused by the next one without page faults; a user's own glibc
malloc settings are left alone."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from ddpo.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults(make):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    make()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
touched = []
for _ in range(3):  # a 64 MB tensor, touched and freed; then a 32 MB one, as a step's temporaries come and go
    faults(lambda: torch.ones(16 * 2**20))
    touched.append(faults(lambda: torch.ones(8 * 2**20)))
print(applied, max(touched))
"""


def probe(mode, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.path.exists("/etc/alpine-release"),
                    reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = probe("keep")
    assert applied and faults < 100  # 32 MB in 4 KB pages: 8192 faults when each allocation is a fresh mmap
    assert probe("default")[1] > 8000  # the default it replaces: a fresh mmap, faulted in page by page
    applied, faults = probe("keep", MALLOC_MMAP_THRESHOLD_="1048576")  # the README's setting to hand memory back
    assert not applied and faults > 8000
