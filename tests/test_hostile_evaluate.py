"""Hostile input to ddpo.evaluate, one row a case (issue 29): each ends in one line naming the file or flag, leaves no
temporary (the plot's included) and changes no file that was there. Every row failed on the code of 2026-12-07
(17a792b) with a traceback."""

import pytest
import torch
from conftest import check_hostile, write_jsonl

torch.set_num_threads(1)  # tiny models: more threads only contend on a shared machine
SAMPLES = [{"prompt_id": str(i), "prompt": f"Prompt {i}", "response": f"the a the {'a ' * j}", "sample": j}
           for i in range(3) for j in range(3)]


def argv(h, m, output_dir="eval", samples=None):
    samples = samples or write_jsonl(h.tmp / "run.jsonl", SAMPLES)
    return [samples, "--output-dir", str(h.tmp / output_dir) if output_dir else "", "--semantic-embedder",
            m["encoder"], "--style-embedder", "stylometric"]


def samples_dir_with_subdirectory(h, m):
    d = h.tmp / "run"
    d.mkdir()
    write_jsonl(d / "a.jsonl", SAMPLES)
    (d / "b.jsonl").mkdir()
    return argv(h, m, samples=str(d))


def full_disk(h, m):
    h.mount(h.tmp / "disk", "size=12k")  # the metrics and the report, not the plot
    return argv(h, m, output_dir="disk/eval")


def file_size_limit(h, m):
    h.limit_file_size(10_000)  # the plot is about 40 kB
    return argv(h, m)


def immutable_report(h, m):
    (h.tmp / "eval").mkdir()
    (h.tmp / "eval" / "report.md").write_text("an earlier report\n")
    h.immutable(h.tmp / "eval" / "report.md")
    return argv(h, m)


CASES = [  # name, setup -> argv, expected outcome, its message
    ("samples dir: a subdirectory named *.jsonl", samples_dir_with_subdirectory, "error", r"b\.jsonl: is a directory"),
    ("--output-dir empty", lambda h, m: argv(h, m, output_dir=""), "error", r"--output-dir: an empty path"),
    ("--output-dir name too long", lambda h, m: argv(h, m, output_dir="x" * 300), "error",
     r"x{300}.*File name too long"),
    ("disk full at the plot", full_disk, "error", r"disk/eval/plot\.png: cannot write it \(No space left"),
    ("file size limit at the plot", file_size_limit, "error", r"plot\.png: cannot write it \(File too large"),
    ("immutable report.md", immutable_report, "error", r"report\.md: cannot write it \(Operation not permitted"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_evaluate(case, tmp_path, request, capsys, hostile_models):
    check_hostile(case, tmp_path, request, capsys, "ddpo.evaluate", (hostile_models,))
