"""Hostile input to ddpo.prepare, one row a case (issue 29): each ends in one line naming the file or flag, leaves no
temporary and changes no file that was there. Every row failed on the code of 2026-12-07 (17a792b) with a
traceback."""

import os

import pytest
from conftest import check_hostile, write_jsonl

POOLS = [{"prompt": f"Prompt {i}: write a story.", "response": f"Story {j} of prompt {i}, told {'very ' * j}well.",
          "score": j} for i in range(20) for j in range(4)]  # 40 pairs, about 20 kB of output


def argv(h, output="pairs.jsonl", data=None):
    data = data or write_jsonl(h.tmp / "pools.jsonl", POOLS)
    return ["--input", data, "--output", str(h.tmp / output) if output else "", "--deviation", "style",
            "--style-embedder", "stylometric", "--gap", "1"]


def input_dir_with_dangling_link(h):
    d = h.tmp / "pools"
    d.mkdir()
    write_jsonl(d / "a.jsonl", POOLS)
    os.symlink(h.tmp / "gone", d / "b.jsonl")
    return argv(h, data=str(d))


def symlink_loop(h):
    os.symlink(h.tmp / "loop-b", h.tmp / "loop-a")
    os.symlink(h.tmp / "loop-a", h.tmp / "loop-b")
    return argv(h, output="loop-a/pairs.jsonl")


def full_disk(h):
    h.mount(h.tmp / "disk", "size=4k")  # one page, and the pairs are about 20 kB
    return argv(h, output="disk/pairs.jsonl")


def file_size_limit(h):
    h.limit_file_size(4_000)  # the input (written before the limit) is larger; the output may not be
    return argv(h)


CASES = [  # name, setup -> argv, expected outcome, its message
    ("input dir: a dangling link named *.jsonl", input_dir_with_dangling_link, "error", r"b\.jsonl: is a broken link"),
    ("--output empty", lambda h: argv(h, output=""), "error", r"--output: an empty path"),
    ("--output through a symlink loop", symlink_loop, "error", r"loop-a is a broken link or a link loop"),
    ("--output name too long", lambda h: argv(h, output="x" * 300), "error", r"x{300}.*File name too long"),
    ("disk full at the pairs", full_disk, "error", r"disk/pairs\.jsonl: cannot write it \(No space left"),
    ("file size limit at the pairs", file_size_limit, "error", r"pairs\.jsonl: cannot write it \(File too large"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_prepare(case, tmp_path, request, capsys):
    check_hostile(case, tmp_path, request, capsys, "ddpo.prepare")
