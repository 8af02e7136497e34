"""Hostile input to ddpo.online, one row a case (issue 29): each ends in one line naming the flag before any model
loads, and changes no file that was there. Every row failed on the code of 2026-12-07 (17a792b): a traceback, or a
run that went on."""

import pytest
import torch
from conftest import check_hostile, write_jsonl

torch.set_num_threads(1)  # tiny models: more threads only contend on a shared machine


def argv(h, m, *extra, out="out"):
    prompts = write_jsonl(h.tmp / "prompts.jsonl", [{"prompt": "Write a story."}, {"prompt": "A poem."}])
    return ["--prompts", prompts, "--model", m["tiny"], "--output-dir", str(h.tmp / out) if out else "",
            "--semantic-embedder", m["encoder"], "--rounds", "1", "--prompts-per-round", "2", "--n", "3",
            "--max-new-tokens", "4", "--dtype", "float32", "--loss", "dpo", "--deviation", "none", *extra]


CASES = [  # name, setup -> argv, expected outcome, its message
    ("--repetition-penalty 1e-300", lambda h, m: argv(h, m, "--repetition-penalty", "1e-300"), "usage",
     r"--repetition-penalty: must be >= 0\.001"),
    ("an encoder as --model", lambda h, m: argv(h, m, "--model", m["encoder"]), "error",
     r"--model .*encoder: not a causal language model"),
    ("--base-model with another vocabulary", lambda h, m: argv(h, m, "--base-model", m["vocab"], "--conform-weight",
                                                               "0.5"), "error", r"--base-model .*vocab: a vocabulary"),
    ("--output-dir empty", lambda h, m: argv(h, m, out=""), "error", r"--output-dir: an empty path"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_online(case, tmp_path, request, capsys, hostile_models):
    check_hostile(case, tmp_path, request, capsys, "ddpo.online", (hostile_models,))
