"""ddpo.prepare: pairing rules, weights against the worked example, edge cases and bad input."""

import json

import pytest
import torch

import ddpo.prepare as prep
from ddpo.quality import proxy_score
from conftest import read_jsonl, write_jsonl
from test_deviation import SEM, STY


def run(tmp_path, rows, *extra):
    out = tmp_path / "pairs.jsonl"
    summary = prep.prepare(prep.parse_args(["--input", write_jsonl(tmp_path / "in.jsonl", rows), "--output", str(out), *extra]))
    return read_jsonl(out), summary


class FixedEmbedder:
    """Looks up the embedding of each text in a table: the worked example without a model."""

    def __init__(self, table):
        self.table = table

    def __call__(self, texts):
        return torch.stack([self.table[t] for t in texts])


def test_pairs_input_reproduces_the_worked_example(tmp_path, monkeypatch):
    texts = ["c1", "r1", "c2", "r2"]
    tables = {"sem": dict(zip(texts, SEM)), "sty": dict(zip(texts, STY))}
    monkeypatch.setattr(prep, "load_embedder", lambda name: FixedEmbedder(tables[name]))
    rows = [{"prompt": "x", "chosen": "c1", "rejected": "r1"}, {"prompt": "x", "chosen": "c2", "rejected": "r2"}]
    for deviation, expected in [("semantic", [0.2055, 0.0]), ("style", [0.8888, 2.5266]), ("both", [2.3109, 0.0])]:
        pairs, summary = run(tmp_path, rows, "--deviation", deviation, "--semantic-embedder", "sem", "--style-embedder", "sty")
        assert [p["weight"] for p in pairs] == pytest.approx(expected, abs=1e-4), deviation
        assert pairs[0]["meta"]["group_size"] == 4 and pairs[0]["meta"]["pairing"] == "input"
    pairs, summary = run(tmp_path, rows, "--deviation", "both", "--semantic-embedder", "sem", "--style-embedder", "sty",
                         "--min-weight", "0.2")
    assert [p["weight"] for p in pairs] == pytest.approx([2.3109, 0.2], abs=1e-4)
    assert summary["weight_zero_share"] == 0.0


def pool(prompt, scored):
    return [{"prompt": prompt, "response": r, "score": s} for r, s in scored]


STORIES = [f"Story number {i} about {w}, told {h}." for i, (w, h) in
           enumerate([("a fox", "slowly"), ("the sea", "in verse"), ("a clock", "backwards"), ("rain", "twice"),
                      ("a key", "by a child"), ("salt", "at dawn"), ("a map", "in whispers"), ("glass", "loudly")])]


def test_gap_pairing_is_seeded_and_uses_each_response_once(tmp_path):
    rows = pool("p", zip(STORIES, [1, 9, 2, 8, 3, 7, 4, 6]))
    a, _ = run(tmp_path, rows, "--deviation", "style", "--seed", "3")
    b, _ = run(tmp_path, rows, "--deviation", "style", "--seed", "3")
    assert a == b and len(a) == 4
    used = [p["chosen"] for p in a] + [p["rejected"] for p in a]
    assert len(set(used)) == 8
    assert all(p["chosen_score"] > p["rejected_score"] for p in a)
    assert sum(abs(p["chosen_score"] - p["rejected_score"]) >= 5 for p in a) >= 2  # wide pairs first
    assert sum(p["weight"] for p in a) > 0


def test_divpo_picks_deviating_high_and_typical_low(tmp_path, monkeypatch):
    # 8 responses, rho 0.25, M 2: k = int(min(max(2, 2), 4)) = 2, m = 2
    rows = pool("p", zip(STORIES, [9, 8, 7, 6, 5, 4, 2, 1]))
    pairs, _ = run(tmp_path, rows, "--pairing", "divpo", "--deviation", "style")
    assert len(pairs) == 2 and all(p["weight"] == 1.0 for p in pairs)
    assert {p["chosen"] for p in pairs} == set(STORIES[:2]) and {p["rejected"] for p in pairs} == set(STORIES[-2:])
    # N = 12, rho 0.25: k = 3, chosen = the 2 most deviating of the top 3
    rows = pool("q", zip(STORIES + ["Alpha beta.", "Gamma delta.", "Epsilon zeta eta!", "Theta?"], range(12, 0, -1)))
    pairs, _ = run(tmp_path, rows, "--pairing", "divpo", "--deviation", "style", "--pairs-per-prompt", "2")
    dev = {p["chosen"]: p["meta"]["deviation"]["style"][0] for p in pairs}
    assert len(pairs) == 2 and set(dev) <= set(STORIES[:3])


def test_diverse_ns_respects_quality_and_length(tmp_path):
    rows = pool("p", [("a b c d e f g h i j", 5), ("k l m n o p q r s t", 5), ("u v w", 9), ("x y z a b c d e f g h", 1)])
    pairs, _ = run(tmp_path, rows, "--pairing", "diverse-ns", "--deviation", "style", "--length-tolerance", "0.1")
    for p in pairs:
        lc, lr = len(p["chosen"].split()), len(p["rejected"].split())
        assert abs(lc - lr) / lr <= 0.1 and p["chosen_score"] >= p["rejected_score"]
        dc, dr = p["meta"]["deviation"]["style"]
        assert p["meta"]["diversity_gain"] > 0 and dc > dr
    pairs, _ = run(tmp_path, rows, "--pairing", "diverse-ns", "--deviation", "style", "--length-tolerance", "0.1",
                   "--budget", "1")
    assert len(pairs) <= 1


def test_edge_cases_are_counted(tmp_path):
    rows = (pool("one", [("Only answer.", 3)])
            + pool("two", [("First answer here.", 1), ("Second answer here!", 9)])
            + pool("dup", [("Same text.", 1), ("Same text.", 1), ("Other text, longer one.", 9)])
            + pool("ties", [("Tie one.", 5), ("Tie two.", 5)])
            + pool("empty", [("", 1), ("   ", 2), ("Real answer.", 3), ("Another real one.", 8)])
            + pool("long", [("word " * 5000, 2), ("another " * 4000 + "end.", 7)]))
    pairs, s = run(tmp_path, rows, "--deviation", "style")
    assert s["single_response_prompts"] == 1 and s["dropped_duplicate"] == 1 and s["dropped_empty"] == 2
    assert s["no_pair_prompts"] == 1  # ties: equal scores form no pair
    by_prompt = {p["prompt"]: p for p in pairs}
    assert by_prompt["two"]["weight"] == 1.0  # two responses: weight 1
    assert set(by_prompt) == {"two", "dup", "empty", "long"}


@pytest.mark.parametrize("line, message", [
    ("{oops", "malformed JSON"),
    (json.dumps({"prompt": "p", "response": "r"}), "missing 'score'"),
    (json.dumps({"prompt": "p", "response": "r", "score": "high"}), "score must be a finite number"),
    (json.dumps({"prompt": "", "response": "r", "score": 1}), "field 'prompt' is empty"),
    (json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}), "a pairs record in a file of pool records"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, line, message):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "response": "r", "score": 1}, line])
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(SystemExit) as e:
        prep.main(["--input", path, "--output", str(out), "--deviation", "style"])
    assert f"{path}:2:" in str(e.value) and message in str(e.value)
    assert not out.exists()


def test_proxy_scores_need_no_input_scores_and_do_not_reward_short_or_repetitive_text(tmp_path):
    story = ("The lighthouse keeper kept a ledger of every ship that passed, and on the last page, in a hand that was "
             "not his, someone had written the name of a ship that would not be built for a hundred years. He waited.")
    assert proxy_score(story) > proxy_score("A ship.") and proxy_score(story) > proxy_score("the ship sailed " * 20)
    rows = [{"prompt": "p", "response": t} for t in (story, "A ship.", "the ship sailed " * 20)]
    pairs, _ = run(tmp_path, rows, "--score", "proxy", "--deviation", "style")
    assert pairs[0]["chosen"] == story
