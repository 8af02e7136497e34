"""The house style that a test can hold: every Python line of the repo within pyproject.toml's line length."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_files():
    for folder in ("ddpo", "kernels", "tests", "bench", "experiments"):
        for directory, _, names in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
    yield os.path.join(ROOT, "setup.py")


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_lines_are_within_the_configured_length():
    limit = int(re.search(r"^line-length = (\d+)$", "\n".join(lines(os.path.join(ROOT, "pyproject.toml"))), re.M)[1])
    long = [f"{os.path.relpath(path, ROOT)}:{i}: {len(line)} characters"
            for path in python_files() for i, line in enumerate(lines(path), 1) if len(line) > limit]
    assert not long, "\n".join(long)
