"""Hostile cases of ddpo.prepare (issue 29): nothing lost, no traceback or silent write failure. Each row writes an
input under tmp_path and runs the command (tests/hostile.py); its comment names the commit on which it fails: 17a792b
(before this change), or 56e73d0 (fixed on 2026-12-03)."""

import json
import os

import pytest
from hostile import call, expect_error, snapshot

from ddpo.prepare import main

POOL = "".join(json.dumps({"prompt": f"p{k}", "response": f"story {k} {j} " + "word " * j, "score": j}) + "\n"
               for k in range(2) for j in range(4))
FLAGS = ["--deviation", "style", "--gap", "1"]


def prepare(tmp_path, *flags, input=None, output=None):
    return ["--input", input or str(tmp_path / "in.jsonl"), "--output", output or str(tmp_path / "out.jsonl"),
            *FLAGS, *flags]


# ---- data loss and security ------------------------------------------------------------------------------------

def output_is_input(tmp_path):  # 56e73d0: the responses were replaced by the pairs
    before = snapshot(tmp_path)
    expect_error(call(main, prepare(tmp_path, output=str(tmp_path / "in.jsonl"))), r"is the input .* or inside it")
    assert snapshot(tmp_path) == before


def output_is_input_by_a_hard_link(tmp_path):  # 56e73d0: as above, by another name
    os.link(tmp_path / "in.jsonl", tmp_path / "link.jsonl")
    before = snapshot(tmp_path)
    expect_error(call(main, prepare(tmp_path, output=str(tmp_path / "link.jsonl"))), r"is the input .* or inside it")
    assert snapshot(tmp_path) == before


# ---- lone surrogates (issue 29's tracebacks, item 3 of this part) -------------------------------------------------

def lone_surrogate(tmp_path):  # 17a792b: read, then a traceback (UnicodeEncodeError) when writing the pairs
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write('{"prompt": "p9", "response": "a\\ud800", "score": 1}\n')
    before = snapshot(tmp_path)
    expect_error(call(main, prepare(tmp_path)), r"in.jsonl:9: lone surrogate")
    assert snapshot(tmp_path) == before


CASES = {
    "data loss and security": [output_is_input, output_is_input_by_a_hard_link],
    "tracebacks": [lone_surrogate],
}


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{category}: {c.__name__}")
                                  for category, cases in CASES.items() for c in cases])
def test_hostile_prepare(tmp_path, case):
    (tmp_path / "in.jsonl").write_text(POOL)
    case(tmp_path)
