"""Hostile cases of ddpo.curves (issue 29): the format the name says, and lone surrogates. Each row runs the command
(tests/hostile.py); its comment names the commit on which it fails: 17a792b (before this change), or 56e73d0 (fixed on
2026-12-03)."""

import json

import pytest
from hostile import call, expect_error, expect_success, snapshot

from ddpo.curves import main

ROWS = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]


# ---- silent wrong results ------------------------------------------------------------------------------------------

def pdf_output(tmp_path):  # 56e73d0: c.pdf held PNG bytes
    expect_success(call(main, [str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "c.pdf")]))
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"


# ---- lone surrogates (issue 29's tracebacks, item 3 of this part) -------------------------------------------------

def lone_surrogate(tmp_path):  # 17a792b: read as a metrics row with a key no text can hold
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 4, "loss\\ud800": 0.2}\n')
    before = snapshot(tmp_path)
    expect_error(call(main, [str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "c.png")]),
                 r"m.jsonl:4: lone surrogate")
    assert snapshot(tmp_path) == before


CASES = {"silent wrong results": [pdf_output], "tracebacks": [lone_surrogate]}


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{category}: {c.__name__}")
                                  for category, cases in CASES.items() for c in cases])
def test_hostile_curves(tmp_path, case):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    case(tmp_path)
