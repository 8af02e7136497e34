"""ddpo.prepare: pairing rules, weights against the worked example, edge cases, bad flags and input, remote code."""

import json
import os
import re

import pytest
import torch

import ddpo.prepare as prep
from ddpo.quality import proxy_score
from conftest import read_jsonl, write_jsonl
from ddpo.deviation import mean_cosine_distance
from test_deviation import SEM, STY, released_weights


def run(tmp_path, rows, *extra):
    out = tmp_path / "pairs.jsonl"
    summary = prep.prepare(prep.parse_args(["--input", write_jsonl(tmp_path / "in.jsonl", rows), "--output", str(out),
                                            *extra]))
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
    monkeypatch.setattr(prep, "load_embedder", lambda name, **kw: FixedEmbedder(tables[name]))
    rows = [{"prompt": "x", "chosen": "c1", "rejected": "r1"}, {"prompt": "x", "chosen": "c2", "rejected": "r2"}]
    for deviation, expected in [("semantic", [0.2055, 0.0]), ("style", [0.8888, 2.5266]), ("both", [2.3109, 0.0])]:
        pairs, summary = run(tmp_path, rows, "--deviation", deviation, "--semantic-embedder", "sem",
                             "--style-embedder", "sty")
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


def random_pools(tmp_path, monkeypatch, n_prompts, n, seed, score_levels=None):
    """Pools of n responses with random scores and random 2-metric embeddings, served by FixedEmbedders."""
    g = torch.Generator().manual_seed(seed)
    rows, tables = [], {"sem": {}, "sty": {}}
    for p in range(n_prompts):
        scores = torch.randint(0, score_levels or 1000, (n,), generator=g).tolist()
        for i in range(n):
            text = f"response {i} to prompt {p}"
            tables["sem"][text], tables["sty"][text] = torch.randn(8, generator=g), torch.randn(5, generator=g)
            rows.append({"prompt": f"prompt {p}", "response": text, "score": scores[i]})
    monkeypatch.setattr(prep, "load_embedder", lambda name, **kw: FixedEmbedder(tables[name]))
    return rows, tables


def released_divpo(texts, scores, tables, pool, rho=0.25, m_pairs=2):
    """The released DivPO rule with loops: k from the pool's size, top-k and bottom-k by score (stable), the combined
    deviation of both metrics computed within each set, the m most deviating of the top, the m least of the bottom."""
    n = len(pool)
    k = int(min(max(m_pairs, n * rho), n / 2))
    order = sorted(pool, key=lambda i: -scores[i])
    high, low = order[:k], order[-k:]

    def within(members):
        return released_weights([[tables[m][texts[i]].numpy() for i in members] for m in ("sem", "sty")])

    dh, dl = within(high), within(low)
    m = min(m_pairs, k)
    return ({high[i] for i in sorted(range(k), key=lambda i: -dh[i])[:m]},
            {low[i] for i in sorted(range(k), key=lambda i: dl[i])[:m]})


@pytest.mark.parametrize("pool", ["pairs", "all"])
def test_divpo_follows_the_released_rule(tmp_path, monkeypatch, pool):
    """Chosen: the most deviating of the top-k, deviation *within* the top-k; rejected: the least deviating of the
    bottom-k, within it; both metrics; the pool is the responses the gap pairing used (or all, --pool all)."""
    import random

    # 6 score levels make ties, so the gap pairing leaves some responses out
    rows, tables = random_pools(tmp_path, monkeypatch, 20, 16, seed=0, score_levels=6)
    smaller_pools = 0
    for p in range(20):  # one prompt per call: its gap pairing is the first draw of the seeded stream
        mine = [r for r in rows if r["prompt"] == f"prompt {p}"]
        got, _ = run(tmp_path, mine, "--pairing", "divpo", "--deviation", "both", "--semantic-embedder", "sem",
                     "--style-embedder", "sty", "--pool", pool, "--gap", "2", "--seed", "0")
        texts, scores = [r["response"] for r in mine], [r["score"] for r in mine]
        used = sorted({i for pr in prep.pair_gap(scores, random.Random(0), 2.0) for i in pr})
        smaller_pools += len(used) < 16
        want_chosen, want_rejected = released_divpo(texts, scores, tables, used if pool == "pairs" else list(range(16)))
        assert {texts.index(x["chosen"]) for x in got} == want_chosen, p
        assert {texts.index(x["rejected"]) for x in got} == want_rejected, p
        assert all(x["weight"] == 1.0 for x in got)
        assert all(x["meta"]["group_size"] == (len(used) if pool == "pairs" else 16) for x in got)  # the ranked pool
    assert smaller_pools > 0 if pool == "pairs" else True


def test_divpo_keeps_pairs_with_equal_scores(tmp_path, monkeypatch):
    rows, _ = random_pools(tmp_path, monkeypatch, 1, 8, seed=1)
    for r, score in zip(rows, [9, 5, 5, 5, 5, 5, 5, 1]):
        r["score"] = score  # k = 2: top {9, 5}, bottom {5, 1}
    pairs, _ = run(tmp_path, rows, "--pairing", "divpo", "--semantic-embedder", "sem", "--style-embedder", "sty",
                   "--pool", "all")
    assert len(pairs) == 2


def test_weights_are_computed_over_the_kept_pairs(tmp_path, monkeypatch):
    """Released order: pair, cut to --max-per-prompt (highest winners first), then deviation over the texts of the
    pairs kept. With 2 pairs kept of 8 responses, each prompt's pool is those 4 texts (weights mean 1 over them)."""
    rows, tables = random_pools(tmp_path, monkeypatch, 12, 8, seed=2)
    pairs, _ = run(tmp_path, rows, "--deviation", "both", "--semantic-embedder", "sem", "--style-embedder", "sty",
                   "--max-per-prompt", "2", "--sort-by-score")
    chosen_weights = []
    for p in range(12):
        got = [x for x in pairs if x["prompt"] == f"prompt {p}"]
        assert len(got) == 2 and got[0]["chosen_score"] >= got[1]["chosen_score"]
        texts = [x["chosen"] for x in got] + [x["rejected"] for x in got]
        want = released_weights([[tables[m][t].numpy() for t in texts] for m in ("sem", "sty")])
        assert [x["weight"] for x in got] == pytest.approx(want[:2].tolist(), abs=1e-9)
        assert all(x["meta"]["group_size"] == 4 for x in got)
        chosen_weights += want[:2].tolist()
    assert 0.5 < sum(chosen_weights) / len(chosen_weights) < 1.5  # the old whole-pool weights averaged about 0.1
    whole, _ = run(tmp_path, rows, "--deviation", "both", "--semantic-embedder", "sem", "--style-embedder", "sty",
                   "--max-per-prompt", "2", "--sort-by-score", "--pool", "all")
    assert all(x["meta"]["group_size"] == 8 for x in whole)


def test_an_unpaired_response_does_not_move_the_weights(tmp_path, monkeypatch):
    """A pool of 5 with distinct scores: gap pairing uses 4, and the fifth is in no pair and in no weight."""
    rows, tables = random_pools(tmp_path, monkeypatch, 1, 5, seed=3)
    pairs, _ = run(tmp_path, rows, "--deviation", "semantic", "--semantic-embedder", "sem")
    texts = [x["chosen"] for x in pairs] + [x["rejected"] for x in pairs]
    assert len(pairs) == 2 and len(set(texts)) == 4
    want = released_weights([[tables["sem"][t].numpy() for t in texts]])
    assert [x["weight"] for x in pairs] == pytest.approx(want[:2].tolist(), abs=1e-9)


def test_diverse_ns_keeps_the_pair_the_rule_selects(tmp_path, monkeypatch):
    """A (10 words, score 5), B (10 words, 5), C (3 words, 9), D (11 words, 1); semantic deviation A > D > B > C.
    Candidates (more diverse chosen, quality not lower, lengths within 10%): (A, B) and (A, D); greedy by diversity
    gain takes (A, B), which uses A: exactly one pair."""
    texts = ["a b c d e f g h i j", "k l m n o p q r s t", "u v w", "x y z a b c d e f g h"]
    table = dict(zip(texts, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.25, 0.0], [1.0, 0.6, 0.0]])))
    monkeypatch.setattr(prep, "load_embedder", lambda name, **kw: FixedEmbedder(table))
    dev = mean_cosine_distance(torch.stack(list(table.values())), torch.zeros(4, dtype=torch.long)).tolist()
    assert dev[0] > dev[3] > dev[1] > dev[2]
    rows = pool("p", zip(texts, [5, 5, 9, 1]))
    pairs, _ = run(tmp_path, rows, "--pairing", "diverse-ns", "--deviation", "semantic", "--semantic-embedder", "x")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(texts[0], texts[1])]
    assert pairs[0]["weight"] == 1.0 and pairs[0]["meta"]["diversity_gain"] > 0
    assert pairs[0]["meta"]["group_size"] == 4  # the pool it ranked, not the 2 texts of the pair kept


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


def no_model(*args, **kwargs):
    raise AssertionError("a scorer or embedder was loaded")


POOL = [{"prompt": "p", "response": f"Answer number {i}.", "score": i} for i in range(4)]
BAD_FLAGS = [("--rho", "0"), ("--rho", "1.5"), ("--rho", "nan"), ("--pairs-per-prompt", "0"), ("--gap", "-1"),
             ("--gap", "nan"), ("--gap", "inf"), ("--length-tolerance", "-1"), ("--length-tolerance", "nan"),
             ("--budget", "-1"), ("--max-per-prompt", "-1"), ("--min-weight", "-1"), ("--min-weight", "nan"),
             ("--min-weight", "inf"), ("--quality-eps", "nan"), ("--score", "bogus"), ("--score", "reward-model:")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_bad_flags_are_refused_at_parse_time(tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setattr(prep, "load_embedder", no_model)
    monkeypatch.setattr(prep, "load_scorer", no_model)
    with pytest.raises(SystemExit) as e:
        prep.main(["--input", write_jsonl(tmp_path / "in.jsonl", POOL), "--output", str(tmp_path / "o.jsonl"),
                   flag, value])
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


GOOD = json.dumps(POOL[0]) + "\n" + json.dumps(POOL[1]) + "\n"
BAD_INPUTS = [  # files under tmp_path (in.jsonl is --input, o.jsonl --output), extra flags, the error
    pytest.param({}, ["--deviation", "semantic", "--semantic-embedder", "./no/such/embedder"],
                 r"--semantic-embedder ./no/such/embedder: no such directory", id="missing embedder"),
    pytest.param({"e/notes.txt": ""}, ["--semantic-embedder", "{tmp}/e"],
                 r"--semantic-embedder .*/e: not a model directory \(no config.json\)", id="embedder without config"),
    pytest.param({}, ["--semantic-embedder", "packaged:nope"], r"--semantic-embedder packaged:nope: unknown packaged",
                 id="unknown packaged embedder"),
    pytest.param({}, ["--score", "reward-model:{tmp}/rm"], r"--score reward-model: .*/rm: no such directory",
                 id="missing reward model"),
    pytest.param({}, ["--output", "{tmp}"], r"--output .*: is a directory", id="output is a directory"),
    pytest.param({}, ["--output", "{tmp}/in.jsonl/o.jsonl"], r"--output .*in.jsonl/o.jsonl: cannot write there",
                 id="output's directory is a file"),
    pytest.param({}, ["--output", "{tmp}/in.jsonl"], r"--output .*in.jsonl: is the input .*in.jsonl",
                 id="output is the input"),
    pytest.param({"d/a.jsonl": GOOD}, ["--input", "{tmp}/d", "--output", "{tmp}/d/pairs.jsonl"],
                 r"--output .*d/pairs.jsonl: is the input .*/d or inside it", id="output inside the input directory"),
    pytest.param({"in.jsonl": GOOD.encode() + b'{"prompt": "caf\xe9", "response": "r", "score": 1}\n'}, [],
                 r"^error: .*in.jsonl:3: invalid UTF-8", id="invalid utf-8"),
    pytest.param({"o.jsonl.meta.json": "{}"}, [], r"--output: .*o.jsonl.meta.json exists and is not a ddpo.prepare "
                 "meta file", id="a meta file we did not write"),
    pytest.param({}, ["--from", "writingprompts", "--model", "{tmp}/none"], r"--model .*/none: no such directory",
                 id="writingprompts' tokenizer missing"),
]


@pytest.mark.parametrize("files, flags, error", BAD_INPUTS)
def test_bad_input_is_refused_before_a_model_loads(tmp_path, monkeypatch, files, flags, error):
    monkeypatch.setattr(prep, "load_embedder", no_model)
    monkeypatch.setattr(prep, "load_scorer", no_model)
    files = {"in.jsonl": GOOD, **files}
    files = {name: content if isinstance(content, bytes) else content.encode() for name, content in files.items()}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--deviation", "both"]
    with pytest.raises(SystemExit) as e:
        prep.main(argv + [f.format(tmp=tmp_path) for f in flags])  # a repeated flag: the last one wins
    assert re.search(error, str(e.value.code)) and "\n" not in str(e.value.code), e.value.code
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused_before_a_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "load_embedder", no_model)
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="cannot write there"):
        prep.main(["--input", write_jsonl(tmp_path / "in.jsonl", POOL), "--output", str(tmp_path / "ro" / "o.jsonl")])


def test_leftover_temporaries_are_removed_and_the_output_follows_the_umask(tmp_path):
    (tmp_path / ".tmp-pairs.jsonl-0123456789abcdef").write_text("half")  # what kill -9 during the write leaves
    (tmp_path / ".tmp-other.jsonl-0123456789abcdef").write_text("not ours to remove")
    old = os.umask(0o027)
    try:
        run(tmp_path, POOL, "--deviation", "style")
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.glob(".tmp-*")) == [".tmp-other.jsonl-0123456789abcdef"]
    assert (tmp_path / "pairs.jsonl").stat().st_mode & 0o777 == 0o640


def remote_code_encoder(path, marker):
    """A tiny BERT whose config points AutoModel at its own modeling file, which touches `marker` when imported."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    BertModel(BertConfig(vocab_size=2, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         auto_map={"AutoModel": "modeling_remote.RemoteModel"})).save_pretrained(path)
    (path / "modeling_remote.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                             "from transformers import BertModel\n\n\n"
                                             "class RemoteModel(BertModel):\n    pass\n")


def test_remote_code_runs_only_with_trust_remote_code_whatever_the_name(tmp_path, monkeypatch):
    """A local directory named like the paper's embedder (jinaai/...) used to run its code unasked."""
    import sys

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies the code
    monkeypatch.setattr(sys, "path", list(sys.path))
    marker = tmp_path / "ran"
    remote_code_encoder(tmp_path / "jinaai" / "remote", marker)
    argv = ["--input", write_jsonl(tmp_path / "in.jsonl", POOL), "--output", str(tmp_path / "o.jsonl"), "--deviation",
            "semantic", "--semantic-embedder", "jinaai/remote"]
    with pytest.raises(SystemExit,
                       match="^error: jinaai/remote: the model ships its own code; pass --trust-remote-code"):
        prep.main(argv)
    assert not marker.exists() and not (tmp_path / "o.jsonl").exists()
    prep.main(argv + ["--trust-remote-code"])
    assert marker.exists() and len(read_jsonl(tmp_path / "o.jsonl")) == 2


def test_no_pair_at_all_is_one_error_line(tmp_path):
    rows = pool("ties", [("Tie one.", 5), ("Tie two.", 5)]) + pool("one", [("Only answer.", 3)])
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        prep.main(["--input", path, "--output", str(tmp_path / "pairs.jsonl"), "--deviation", "style"])
    assert "no pair could be formed" in str(e.value) and not (tmp_path / "pairs.jsonl").exists()


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_an_output_that_is_the_input_by_another_name_is_refused(tmp_path, monkeypatch, link):
    monkeypatch.setattr(prep, "load_embedder", no_model)
    source = write_jsonl(tmp_path / "in.jsonl", POOL)
    (os.symlink if link == "symlink" else os.link)(source, tmp_path / "out.jsonl")
    with pytest.raises(SystemExit, match=r"--output .*out.jsonl: is the input"):
        prep.main(["--input", source, "--output", str(tmp_path / "out.jsonl")])
    assert [json.loads(line) for line in open(source)] == POOL


def test_a_score_beyond_float_range_is_a_file_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "load_embedder", no_model)
    path = tmp_path / "in.jsonl"
    path.write_text(GOOD + '{"prompt": "p", "response": "r", "score": -1' + "0" * 400 + "}\n")
    with pytest.raises(SystemExit, match=r"in.jsonl:3: score must be a finite number, got -1000"):
        prep.main(["--input", str(path), "--output", str(tmp_path / "o.jsonl")])


def released_gap(scores, rng, gap):
    """The released gap pairing as written: rebuild the candidate lists every round."""
    unused, pairs = set(range(len(scores))), []
    while True:
        candidates = [(i, j) for i in sorted(unused) for j in sorted(unused) if i < j and scores[i] != scores[j]]
        wide = [(i, j) for i, j in candidates if abs(scores[i] - scores[j]) >= gap]
        if not candidates:
            return pairs
        i, j = rng.choice(wide or candidates)
        unused -= {i, j}
        pairs.append((i, j) if scores[i] > scores[j] else (j, i))


def test_gap_pairing_draws_exactly_as_the_released_loop():
    import random

    for seed in range(40):
        r = random.Random(seed)
        n = r.randint(0, 24)
        scores = [r.choice([r.randint(-3, 8), r.uniform(-3, 8)]) for _ in range(n)]  # ties, ints and floats
        for gap in (0.0, 1.0, 2.5, 100.0):
            assert prep.pair_gap(scores, random.Random(seed), gap) == released_gap(scores, random.Random(seed), gap)
    r = random.Random(1)
    scores = [r.randint(0, 50) for _ in range(3000)]  # 3,000 responses (the released loop: over 5 minutes)
    pairs = prep.pair_gap(scores, random.Random(0), 5.0)
    assert len(pairs) >= 1400 and len({i for p in pairs for i in p}) == 2 * len(pairs)
    assert all(scores[c] > scores[r] for c, r in pairs)
