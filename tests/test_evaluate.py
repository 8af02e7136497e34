"""ddpo.evaluate: the `diversity` package's README values, ROUGE-L by hand and against the DP, skipped prompts,
outputs."""

import json
import os
import random
import re
from collections import OrderedDict

import pytest
import torch

import ddpo.evaluate
from ddpo.data import DataError
from ddpo.evaluate import (MAX_ROUGE_TOKENS, compression_ratio, distinct_n, evaluate, homogenization, lcs_length,
                           main, ngram_diversity, reading, rouge_l, sign_flip_p)

README = [
    "I enjoy walking with my cute dog for the rest of the day, but this time it was hard for me to figure out what to "
    "do with it. When I finally looked at this for a few moments, I immediately thought.",
    "I enjoy walking with my cute dog. The only time I felt like walking was when I was working, so it was awesome for "
    "me. I didn't want to walk for days. I am really curious how she can walk with me",
    "I enjoy walking with my cute dog (Chama-I-I-I-I-I), and I really enjoy running. I play in a little game I play "
    "with my brother in which I take pictures of our houses.",
]


def test_diversity_package_readme_values():
    assert round(compression_ratio(README), 3) == 1.641
    assert round(ngram_diversity(README, 4), 3) == 3.315


def test_rouge_l_and_distinct_by_hand():
    assert rouge_l("a b c d".split(), "a c d e".split()) == pytest.approx(0.75)  # LCS 3 of 4 and 4
    assert rouge_l(["x"], ["y"]) == 0.0
    assert homogenization(["the same text", "the same text"]) == 1.0
    assert distinct_n(["a b a", "b a"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "b a"], 2) == pytest.approx(2 / 3)


def lcs_dp(a, b):
    """The reference: the textbook O(len a * len b) dynamic programme."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_bit_parallel_lcs_equals_dp():
    rng = random.Random(0)
    for _ in range(300):
        vocab = rng.choice([2, 3, 5, 50])
        a = [rng.randrange(vocab) for _ in range(rng.randrange(0, 80))]
        b = [rng.randrange(vocab) for _ in range(rng.randrange(0, 80))]
        assert lcs_length(a, b) == lcs_dp(a, b)
    assert lcs_length(list("abcabba"), list("cbabac")) == 4  # CLRS's example


def test_rouge_l_on_long_responses():
    rng = random.Random(1)
    a = [rng.randrange(1000) for _ in range(20_000)]
    b = a[::2] + [rng.randrange(1000, 2000) for _ in range(10_000)]  # every other token of a, then new ones
    assert lcs_length(a, b) == 10_000 and rouge_l(a, b) == pytest.approx(0.5)
    long = " ".join(f"w{i}" for i in range(MAX_ROUGE_TOKENS + 5_000))
    assert homogenization([long, long + " tail"]) == 1.0  # capped: the tokens past the cap are not compared


def test_report_files_and_single_sample_prompts(tmp_path, capsys):
    def samples(path, texts_per_prompt):
        with open(path, "w") as f:
            for pid, texts in texts_per_prompt.items():
                for t in texts:
                    f.write(json.dumps({"prompt_id": pid, "prompt": f"prompt {pid}", "response": t}) + "\n")
        return str(path)

    same = samples(tmp_path / "same.jsonl", {"a": ["The cat sat.", "The cat sat.", "The cat sat."],
                                             "b": ["A dog ran far.", "A dog ran far."], "c": ["Alone."]})
    varied = samples(tmp_path / "varied.jsonl", {"a": ["The cat sat.", "Storms! Who called them?", "nine, ten; eleven"],
                                                 "b": ["A dog ran far.", "\"Quiet,\" she said -- and waited..."]})
    out = tmp_path / "eval"
    main([same, varied, "--names", "same", "varied", "--output-dir", str(out), "--semantic-embedder", "stylometric",
          "--baseline", "same"])
    m = {n: json.load(open(out / f"{n}.metrics.json")) for n in ("same", "varied")}
    assert m["same"]["skipped_prompts"] == ["c"] and m["same"]["prompts"] == 2
    printed = capsys.readouterr().out
    assert "fewer than 2 samples" in printed and "\nvaried - same: semantic diversity +" in printed
    assert "vs_baseline" not in m["same"] and m["varied"]["baseline"] == "same"
    v = m["varied"]["vs_baseline"]
    assert v["homogenization"]["prompts"] == 2 and v["homogenization"]["p_value"] == 0.5  # 2 prompts: 2 of 4 flips
    assert v["homogenization"]["diff"] == pytest.approx(m["varied"]["homogenization"]["mean"] - 1.0)
    assert set(v["quality"]) == {"diff", "ci95", "p_value", "prompts", "per_prompt_sd", "relative_pct", "relative_ci95"}
    report = (out / "report.md").read_text()
    assert "difference to same" in report and "| varied | 2 | +" in report and "varied - same: " in report
    assert m["same"]["homogenization"]["mean"] == 1.0 and m["varied"]["homogenization"]["mean"] < 0.5
    assert m["same"]["style_diversity"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["varied"]["style_diversity"]["mean"] > 0.1
    lo, hi = m["varied"]["quality"]["ci95"]
    assert lo <= m["varied"]["quality"]["mean"] <= hi
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "| varied | 2 |" in (out / "report.md").read_text()
    # the cited metrics: identical samples are one class of Vendi score and effective rank 1
    for metric in ("vendi_score", "effective_rank", "distinct_classes"):
        assert m["same"][metric]["mean"] == pytest.approx(1.0), metric
        assert m["varied"][metric]["mean"] > 1.2 and f"| {metric} " in report, metric
    assert m["same"]["slop_score"]["mean"] == 0.0 and "slop_score" in report


def test_bad_samples_file(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(SystemExit, match=f"{path}:2: missing field 'response'"):
        main([str(path), "--output-dir", str(tmp_path / "e"), "--semantic-embedder", "stylometric"])


def embed(texts):
    """A tiny deterministic embedder: (number of characters, of words, of 'w's) per text."""
    return torch.tensor([[len(t), len(t.split()), t.count("w") + 1.0] for t in texts])


def score(prompts, texts):
    """A fake quality scorer: the number each text starts with."""
    return [float(t.split()[0]) for t in texts]


def fake_run(keys, shift=0, extra_words=0):
    """Prompt i's two samples start with i * i (+ shift) and i * i + 1 (+ shift), so its mean quality is
    i * i + 0.5 (+ shift); extra_words adds words to every sample."""
    return OrderedDict((f"p{i}", {"prompt": f"prompt {i}", "responses": [
        " ".join([str(i * i + j + shift)] + ["w"] * (2 + j + extra_words)) for j in range(2)]}) for i in keys)


@pytest.mark.parametrize("prompts", [8, 20])  # exact sign-flip p, then Monte Carlo
def test_paired_known_difference(prompts):
    keys = range(prompts)
    r = evaluate({"a": fake_run(keys), "b": fake_run(keys, shift=3, extra_words=2)}, embed, embed, score,
                 baseline="a")
    assert "vs_baseline" not in r["a"] and r["b"]["baseline"] == "a"
    v = r["b"]["vs_baseline"]
    for metric, diff in (("quality", 3.0), ("length", 2.0)):  # every prompt's difference is exactly the constant
        assert v[metric]["diff"] == pytest.approx(diff) and v[metric]["ci95"] == pytest.approx([diff, diff])
        assert v[metric]["prompts"] == prompts and v[metric]["per_prompt_sd"] == pytest.approx(0, abs=1e-12)
    assert v["quality"]["p_value"] == (2 / 2 ** 8 if prompts == 8 else pytest.approx(1 / 10_001))
    base = sum(i * i + 0.5 for i in keys) / prompts
    assert v["quality"]["relative_pct"] == pytest.approx(300 / base)
    lo, hi = r["a"]["quality"]["ci95"]  # the baseline's own bootstrap draws the same prompts: 3 / its means
    assert v["quality"]["relative_ci95"] == pytest.approx([300 / hi, 300 / lo], rel=1e-2)
    line = reading(r)[0]
    assert line.startswith("b - a: semantic diversity ") and ", style diversity " in line
    assert f", quality +{300 / base:.1f}% [" in line


@pytest.mark.parametrize("prompts", [8, 20])
def test_paired_identical_runs(prompts):
    r = evaluate({"a": fake_run(range(prompts)), "b": fake_run(range(prompts))}, embed, embed, score, baseline="a")
    for metric, v in r["b"]["vs_baseline"].items():
        assert v["diff"] == 0.0 and v["ci95"] == [0.0, 0.0] and v["p_value"] == 1.0, metric
    assert r["b"]["vs_baseline"]["quality"]["relative_ci95"] == [0.0, 0.0]


def test_sign_flip_p_by_hand():
    # [1, 2, 3]: of the 8 signed sums (6, 4, 2, 0, 0, -2, -4, -6) two reach |6|
    assert sign_flip_p([1.0, 2.0, 3.0]) == 2 / 8
    # [1, 1, 1, -1], observed sum 2: the 16 signed sums are 4 once, 2 four times, 0 six times, -2 four, -4 once
    assert sign_flip_p([1.0, 1.0, 1.0, -1.0]) == 10 / 16
    # float ties: the all-plus sum, added in another order than the observed one, rounds below it; it still counts
    assert sign_flip_p([0.05, 0.3, 0.7, 0.1, 0.1, 0.05]) == 2 / 64
    d = torch.randn(17, generator=torch.Generator().manual_seed(0)) + 0.3
    exact, monte_carlo = sign_flip_p(d, exact_up_to=17), sign_flip_p(d)
    assert 0.01 < exact < 0.99 and monte_carlo == pytest.approx(exact, abs=0.015)


def test_paired_by_prompt_key():
    other = fake_run(reversed(range(9)), shift=1)  # another order, and a prompt p8 the baseline lacks
    del other["p5"]  # a prompt only the baseline has
    other["p3"]["responses"] = other["p3"]["responses"][:1]  # one sample: left out of b, so of the pairing
    r = evaluate({"a": fake_run(range(8)), "b": other}, embed, embed, score, baseline="a")
    v = r["b"]["vs_baseline"]["quality"]
    assert v["prompts"] == 6 and v["diff"] == pytest.approx(1.0) and v["ci95"] == pytest.approx([1.0, 1.0])
    assert r["b"]["skipped_prompts"] == ["p3"]


def test_paired_errors():
    with pytest.raises(DataError, match="--baseline 'c' is not a run name"):
        evaluate({"a": fake_run(range(3)), "b": fake_run(range(3))}, embed, embed, score, baseline="c")
    with pytest.raises(DataError, match=r"b and the baseline a share 1 prompt\(s\)"):
        evaluate({"a": fake_run(range(3)), "b": fake_run(range(2, 5))}, embed, embed, score, baseline="a")


def write_samples(path, keys, n=2, data=None):
    path.write_bytes(data or b"".join(json.dumps({"prompt_id": k, "prompt": f"p{k}", "response": f"story {k} {j}"})
                                      .encode() + b"\n" for k in keys for j in range(n)))
    return str(path)


def a(t):
    t.mkdir(exist_ok=True)
    return write_samples(t / "a.jsonl", "ijk")


def b(t):
    return write_samples(t / "b.jsonl", "kji")


BAD_INPUTS = {  # id: tmp_path -> (arguments, the error)
    "names count": lambda t: ([a(t), b(t), "--names", "x"], "--names: 1 names for 2 samples files"),
    "names empty flag": lambda t: ([a(t), b(t), "--names"], "--names: 0 names for 2 samples files"),
    "names ..": lambda t: ([a(t), b(t), "--names", "x", "../y"], r"--names: '\.\./y' is not a safe file name"),
    "names /": lambda t: ([a(t), b(t), "--names", "x", "y/z"], "--names: 'y/z' is not a safe file name"),
    "names \\": lambda t: ([a(t), b(t), "--names", "x", "y\\z"], r"--names: 'y\\\\z' is not a safe file name"),
    "names leading .": lambda t: ([a(t), b(t), "--names", "x", ".y"], "--names: '.y' is not a safe file name"),
    "names empty": lambda t: ([a(t), b(t), "--names", "x", ""], "--names: '' is not a safe file name"),
    "names twice": lambda t: ([a(t), b(t), "--names", "x", "x"], "--names: run names must be distinct"),
    "default names twice": lambda t: ([a(t), a(t / "sub")], "--names: run names must be distinct .* got a a"),
    "same file twice": lambda t: ([a(t), str(t / "." / "a.jsonl"), "--names", "x", "y"],
                                  "a.jsonl: the same samples file is given twice"),
    "same file by a hard link": lambda t: ([a(t), (os.link(t / "a.jsonl", t / "h.jsonl"), str(t / "h.jsonl"))[1],
                                            "--names", "x", "y"], "a.jsonl: the same samples file is given twice"),
    "one id for two prompts": lambda t: ([a(t), write_samples(t / "i.jsonl", "", data=b'{"prompt_id": 1, '
                                          b'"prompt": "p", "response": "r"}\n{"prompt_id": "1", "prompt": "q", '
                                          b'"response": "s"}\n')],
                                         r"i.jsonl:2: prompt_id '1' names another prompt than on an earlier line"),
    "unknown baseline": lambda t: ([a(t), b(t), "--baseline", "c"], r"--baseline 'c' is not a run name \(runs: a, b\)"),
    "one shared prompt": lambda t: ([a(t), write_samples(t / "c.jsonl", "kl"), "--baseline", "a"],
                                    r"c and the baseline a share 1 prompt\(s\)"),
    "unknown quality": lambda t: ([a(t), b(t), "--quality", "judge"], "--quality: unknown scorer 'judge'"),
    "output dir is a file": lambda t: ([a(t), b(t), "--output-dir", a(t)],
                                       r"--output-dir .*a.jsonl is not a directory"),
    "output dir in a file": lambda t: ([a(t), b(t), "--output-dir", a(t) + "/eval"],
                                       r"--output-dir .*a.jsonl is not a directory"),
    "invalid utf-8": lambda t: ([a(t), write_samples(t / "u.jsonl", "", data=b'{"prompt": "p", "response": "r"}\n'
                                                     b'{"prompt": "p", "response": "caf\xe9"}\n')],
                                r"u.jsonl:2: invalid UTF-8 \(invalid continuation byte at byte 33\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_one_line_before_any_model(tmp_path, monkeypatch, case):
    argv, message = BAD_INPUTS[case](tmp_path)
    monkeypatch.setattr(ddpo.evaluate, "load_embedder", lambda name: pytest.fail("an embedder was loaded"))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(["--output-dir", str(tmp_path / "eval"), *argv])  # a case's own --output-dir comes later and wins
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    assert re.search(message, str(e.value.code)), e.value.code
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_output_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(ddpo.evaluate, "load_embedder", lambda name: pytest.fail("an embedder was loaded"))
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="ro is not writable"):
        main([a(tmp_path), "--output-dir", str(tmp_path / "ro" / "eval")])
