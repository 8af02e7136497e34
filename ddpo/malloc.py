"""glibc's malloc set for tensor work: memory a tensor frees is kept in the process and reused by the next ones.

By default glibc serves every block over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it when
it is freed, so every large tensor (a (V, H) weight, its cast and its gradient, a logits tile, the optimiser's
temporaries) is paid for again in page faults, one per 4 KB page, each time it is allocated: on the default CPU
pipeline 7.9 million faults and 56 s of system time. `keep_freed_memory` (M_MMAP_MAX 0: every block from the heap;
M_TRIM_THRESHOLD 2 GB: the heap's free top is kept) made 36 DDPO steps on the default pairs 4.16 s instead of 6.83 s
each, with peak RSS 4.17 instead of 3.55 GB (bench/RESULTS.md). glibc's aligned allocations leave holes that a
block of the same size cannot reuse, so the heap still grows slowly (+0.27 GB from step 12 to 36). The commands
call it at start; memory then goes back to the system when the process ends. A user who sets glibc's own malloc
variables (MALLOC_MMAP_MAX_, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or glibc.malloc
tunables) keeps those instead.
"""

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): a free heap top under 2 GB is kept
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_settings():
    """Whether the environment sets glibc's malloc itself (then it is left alone)."""
    return any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory():
    """Keep freed memory in the process (module docstring). Returns whether it applied: not on a C library other
    than glibc (macOS, musl), nor where the environment sets glibc's malloc."""
    if user_settings():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
