"""Hostile input to ddpo.pipeline, one row a case (issue 29): each ends in one line naming the flag, before any model
loads, and changes no file that was there. Every row failed on the code of 2026-12-07 (17a792b) with a traceback."""

import pytest
from conftest import check_hostile


def argv(h, m, *extra, work_dir="work"):
    return ["--work-dir", str(h.tmp / work_dir) if work_dir else "", "--model", m["tiny"], "--semantic-embedder",
            m["encoder"], "--quick", "--monitor-prompts", "0", *extra]


def work_dir_a_file(h, m):
    (h.tmp / "work").write_text("a file\n")
    return argv(h, m)


def read_only_work_dir(h, m):
    h.mount(h.tmp / "work", "ro")
    return argv(h, m)


CASES = [  # name, setup -> argv, expected outcome, its message
    ("--work-dir a file", work_dir_a_file, "error", r"--work-dir .*work: .*work is not a directory"),
    ("--work-dir empty", lambda h, m: argv(h, m, work_dir=""), "error", r"--work-dir: an empty path"),
    ("--work-dir read-only", read_only_work_dir, "error", r"--work-dir .*work: .*work is not writable"),
    ("an encoder as --model", lambda h, m: argv(h, m, "--model", m["encoder"]), "error",
     r"--model .*encoder: not a causal language model"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_pipeline(case, tmp_path, request, capsys, hostile_models):
    check_hostile(case, tmp_path, request, capsys, "ddpo.pipeline", (hostile_models,))
