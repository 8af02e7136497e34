"""Hostile input to ddpo.curves, one row a case (issue 29): each ends in one line naming the file or flag, leaves no
temporary and changes no file that was there. Every row failed on the code of 2026-12-07 (17a792b) with a
traceback."""

import pytest
from conftest import check_hostile, write_jsonl


def argv(h, output="curves.png"):
    (h.tmp / "run").mkdir()
    write_jsonl(h.tmp / "run" / "metrics.jsonl", [{"step": s, "loss": 1 / s, "rewards/margins": s} for s in (1, 2, 3)])
    return [str(h.tmp / "run"), "--output", str(h.tmp / output) if output else ""]


def full_disk(h):
    h.mount(h.tmp / "disk", "size=4k")  # one page; the curves are about 60 kB
    return argv(h, output="disk/curves.png")


def file_size_limit(h):
    h.limit_file_size(10_000)
    return argv(h)


CASES = [  # name, setup -> argv, expected outcome, its message
    ("--output empty", lambda h: argv(h, output=""), "error", r"--output: an empty path"),
    ("--output name too long", lambda h: argv(h, output="x" * 300 + ".png"), "error", r"x{300}.*File name too long"),
    ("disk full at the image", full_disk, "error", r"disk/curves\.png: cannot write it \(No space left"),
    ("file size limit at the image", file_size_limit, "error", r"curves\.png: cannot write it \(File too large"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_curves(case, tmp_path, request, capsys):
    check_hostile(case, tmp_path, request, capsys, "ddpo.curves")
