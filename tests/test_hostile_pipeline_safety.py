"""Hostile cases of ddpo.pipeline (issue 29): what the pipeline sets per arm cannot be overridden. Each row runs the
command's parser (tests/hostile.py); its comment names the commit on which it fails: 56e73d0 (fixed on 2026-12-03)."""

import pytest
from hostile import call, expect_error

from ddpo.pipeline import parse_args

CASES = {  # category -> (case, argv, the error)
    "silent wrong results": [
        # 56e73d0: both arms trained with simpo, and "ddpo - dpo: +0.000" was printed
        ("loss set for both arms", ["--train-flags", "--loss simpo"], r"--train-flags: --loss is set by the pipeline"),
        # 56e73d0: as above, by a prefix that argparse expands
        ("loss by a prefix", ["--train-flags", "--los simpo"], r"--train-flags: --loss is set by the pipeline"),
    ],
}


@pytest.mark.parametrize("argv, error", [pytest.param(argv, error, id=f"{category}: {case}")
                                         for category, cases in CASES.items() for case, argv, error in cases])
def test_hostile_pipeline(argv, error):
    expect_error(call(parse_args, argv), error, code=2)
