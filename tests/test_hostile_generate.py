"""Hostile input to ddpo.generate, one row a case (issue 29): each ends in one line naming the file or flag, before
any model loads where the files tell, leaves no temporary and changes no file that was there. Every row failed on the
code of 2026-12-07 (17a792b): a traceback, or a run that went on."""

import os

import pytest
import torch
from conftest import check_hostile, write_jsonl

torch.set_num_threads(1)  # tiny models: more threads only contend on a shared machine


def argv(h, m, *extra, output="s.jsonl", prompts=None):
    prompts = prompts or write_jsonl(h.tmp / "prompts.jsonl", [{"prompt": "Write a story."}, {"prompt": "A poem."}])
    return ["--model", m["tiny"], "--prompts", prompts, "--output", str(h.tmp / output) if output else "",
            "--n", "4", "--max-new-tokens", "8", "--dtype", "float32", *extra]


def prompts_dir_with_subdirectory(h, m):
    d = h.tmp / "prompts"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"prompt": "Write a story."}])
    (d / "b.jsonl").mkdir()
    return argv(h, m, prompts=str(d))


def symlink_loop(h, m):
    os.symlink(h.tmp / "loop-b", h.tmp / "loop-a")
    os.symlink(h.tmp / "loop-a", h.tmp / "loop-b")
    return argv(h, m, output="loop-a/s.jsonl")


def full_disk(h, m):
    h.mount(h.tmp / "disk", "size=8k")  # two pages: the lock and the settings file, none for the samples
    return argv(h, m, output="disk/s.jsonl")


def file_size_limit(h, m):
    h.limit_file_size(2_000)  # the settings file fits, 8 sample lines do not
    return argv(h, m)


CASES = [  # name, setup -> argv, expected outcome, its message
    # readers
    ("prompts dir: a subdirectory named *.jsonl", prompts_dir_with_subdirectory, "error", r"b\.jsonl: is a directory"),
    # flags and models found wrong only after loading
    ("--temperature 1e-300", lambda h, m: argv(h, m, "--temperature", "1e-300"), "usage",
     r"--temperature: must be >= 0\.001"),
    ("--repetition-penalty 1e-300", lambda h, m: argv(h, m, "--repetition-penalty", "1e-300"), "usage",
     r"--repetition-penalty: must be >= 0\.001"),
    ("--n 20000", lambda h, m: argv(h, m, "--n", "20000", "--max-new-tokens", "1"), "error",
     r"--n 20000 x 2 prompts a batch: 40,000 sequences .* over the 4,096"),
    ("an encoder as --model", lambda h, m: argv(h, m, "--model", m["encoder"]), "error",
     r"--model .*encoder: not a causal language model"),
    ("an unknown model type", lambda h, m: argv(h, m, "--model", m["unknown"]), "error",
     r"model type 'nosuchmodel' is unknown"),
    ("a model shipping its own code", lambda h, m: argv(h, m, "--model", m["own_code"]), "error",
     r"the model ships its own code"),
    ("--base-model with another vocabulary", lambda h, m: argv(h, m, "--base-model", m["vocab"], "--conform-weight",
                                                               "0.5"), "error", r"--base-model .*vocab: a vocabulary"),
    # output paths
    ("--output empty", lambda h, m: argv(h, m, output=""), "error", r"--output: an empty path"),
    ("--output through a symlink loop", symlink_loop, "error", r"loop-a is a broken link or a link loop"),
    ("--output name too long", lambda h, m: argv(h, m, output="x" * 300), "error", r"x{300}.*File name too long"),
    # disk full, file size limits
    ("disk full at the samples", full_disk, "error", r"disk/s\.jsonl.*No space left on device"),
    ("file size limit at the samples", file_size_limit, "error", r"s\.jsonl: cannot write it \(File too large"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_generate(case, tmp_path, request, capsys, hostile_models):
    check_hostile(case, tmp_path, request, capsys, "ddpo.generate", (hostile_models,))
