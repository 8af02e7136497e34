"""ddpo.evaluate: the `diversity` package's README values, ROUGE-L by hand and against the DP, skipped prompts,
outputs."""

import json
import random

import pytest

from ddpo.evaluate import (MAX_ROUGE_TOKENS, compression_ratio, distinct_n, homogenization, lcs_length, main,
                           ngram_diversity, rouge_l)

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
    main([same, varied, "--names", "same", "varied", "--output-dir", str(out), "--semantic-embedder", "stylometric"])
    m = {n: json.load(open(out / f"{n}.metrics.json")) for n in ("same", "varied")}
    assert m["same"]["skipped_prompts"] == ["c"] and m["same"]["prompts"] == 2
    assert "fewer than 2 samples" in capsys.readouterr().out
    assert m["same"]["homogenization"]["mean"] == 1.0 and m["varied"]["homogenization"]["mean"] < 0.5
    assert m["same"]["style_diversity"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["varied"]["style_diversity"]["mean"] > 0.1
    lo, hi = m["varied"]["quality"]["ci95"]
    assert lo <= m["varied"]["quality"]["mean"] <= hi
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "| varied | 2 |" in (out / "report.md").read_text()


def test_bad_samples_file(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(SystemExit, match=f"{path}:2: missing field 'response'"):
        main([str(path), "--output-dir", str(tmp_path / "e"), "--semantic-embedder", "stylometric"])
