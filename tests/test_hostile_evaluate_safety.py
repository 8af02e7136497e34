"""Hostile cases of ddpo.evaluate (issue 29): no silent wrong result on other scripts or on merged runs and prompts.
Each row writes samples files under tmp_path and runs the command (tests/hostile.py); its comment names the commit on
which it fails: 17a792b (before this change), or 56e73d0 (fixed on 2026-12-03)."""

import json
import os

import pytest
from hostile import call, expect_error, expect_success, snapshot

from ddpo.evaluate import main

SAME_ZH = ["我们在河边等了很久，直到月亮升起来。"] * 3
OTHER_ZH = ["我们在河边等了很久，直到月亮升起来。", "老人把钥匙埋在院子里的桃树下。",
            "火车晚点了，站台上只剩下一只猫。"]
SAME_AR = ["جلسنا عند النهر طويلا حتى طلع القمر"] * 3
OTHER_AR = ["جلسنا عند النهر طويلا حتى طلع القمر", "دفن الرجل العجوز المفتاح تحت الشجرة",
            "تأخر القطار ولم يبق على الرصيف إلا قطة"]


def samples(path, pools):
    """A samples file: {prompt id: responses}."""
    path.write_text("".join(json.dumps({"prompt_id": pid, "prompt": f"prompt {pid}", "response": text},
                                       ensure_ascii=False) + "\n" for pid, texts in pools.items() for text in texts))
    return str(path)


def evaluated(tmp_path, *runs):
    """ddpo.evaluate of the runs {name: pools} (the first the baseline) -> ({name: metrics}, report.md)."""
    argv = [samples(tmp_path / f"{name}.jsonl", pools) for name, pools in runs]
    expect_success(call(main, [*argv, "--output-dir", str(tmp_path / "eval"), "--semantic-embedder", "stylometric",
                               "--baseline", runs[0][0]]))
    metrics = {name: json.loads((tmp_path / "eval" / f"{name}.metrics.json").read_text()) for name, _ in runs}
    return metrics, (tmp_path / "eval" / "report.md").read_text()


# ---- silent wrong results ------------------------------------------------------------------------------------------

def script_homogenization(same, other):
    # 17a792b: every non-Latin text was empty to ROUGE-L, so identical responses scored 0 ("most diverse")
    def case(tmp_path):
        m, _ = evaluated(tmp_path, ("same", {"a": same, "b": same[:2]}), ("other", {"a": other, "b": other[:2]}))
        assert m["same"]["homogenization"]["mean"] == 1.0
        assert m["other"]["homogenization"]["mean"] < 0.5
        assert m["other"]["vs_baseline"]["homogenization"]["diff"] < -0.5
    return case


def no_words(tmp_path):  # 17a792b: responses without a word scored 0 (most diverse), not "cannot be computed"
    m, report = evaluated(tmp_path, ("base", {"a": ["The cat sat.", "The cat sat."], "b": ["A dog.", "A cat."]}),
                          ("marks", {"a": ["!!!", "!!!"], "b": ["?!", "..."]}))
    h = m["marks"]["homogenization"]
    assert h["mean"] is None and h["ci95"] is None and h["undefined_prompts"] == ["a", "b"]
    assert m["marks"]["vs_baseline"]["homogenization"]["diff"] is None
    assert "| marks | 2 |" in report and report.count("n/a") >= 2  # its cell in both tables
    assert m["base"]["homogenization"]["mean"] == pytest.approx((1.0 + 0.5) / 2)  # "a dog" / "a cat": F1 1/2


def one_id_two_prompts(tmp_path):  # 56e73d0: prompt ids 1 and "1" with different prompts were merged into one
    path = tmp_path / "i.jsonl"
    path.write_text('{"prompt_id": 1, "prompt": "p", "response": "r"}\n{"prompt_id": "1", "prompt": "q", '
                    '"response": "s"}\n')
    expect_error(call(main, [str(path), "--output-dir", str(tmp_path / "eval")]),
                 r"i.jsonl:2: prompt_id '1' names another prompt")


def hard_links(tmp_path):  # 56e73d0: one file by two hard links was evaluated as two runs
    a = samples(tmp_path / "a.jsonl", {"a": ["x y", "y z"], "b": ["u v", "v w"]})
    os.link(a, tmp_path / "b.jsonl")
    expect_error(call(main, [a, str(tmp_path / "b.jsonl"), "--output-dir", str(tmp_path / "eval")]),
                 r"a.jsonl: the same samples file is given twice")
    assert not (tmp_path / "eval").exists()


# ---- lone surrogates (issue 29's tracebacks, item 3 of this part) -------------------------------------------------

def lone_surrogate(tmp_path):  # 17a792b: read, then a traceback (UnicodeEncodeError) while writing the report
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "response": "a"}\n{"prompt": "p", "response": "b\\udc80"}\n')
    before = snapshot(tmp_path)
    expect_error(call(main, [str(path), "--output-dir", str(tmp_path / "eval"), "--semantic-embedder", "stylometric"]),
                 r"s.jsonl:2: lone surrogate")
    assert snapshot(tmp_path) == before


CASES = {
    "silent wrong results": [pytest.param(script_homogenization(SAME_ZH, OTHER_ZH), id="chinese"),
                             pytest.param(script_homogenization(SAME_AR, OTHER_AR), id="arabic"),
                             pytest.param(no_words, id="no words"),
                             pytest.param(one_id_two_prompts, id="one id for two prompts"),
                             pytest.param(hard_links, id="one file by two hard links")],
    "tracebacks": [pytest.param(lone_surrogate, id="lone surrogate")],
}


@pytest.mark.parametrize("case", [pytest.param(*c.values, id=f"{category}: {c.id}")
                                  for category, cases in CASES.items() for c in cases])
def test_hostile_evaluate(tmp_path, case):
    case(tmp_path)
