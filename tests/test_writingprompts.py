"""prepare --from writingprompts: euclaise/WritingPrompts_preferences' schema -> the released pools, then train."""

import json
import math

import pytest

datasets = pytest.importorskip("datasets")  # the `data` extra, in the `test` extra too
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from conftest import read_jsonl, write_jsonl  # noqa: E402

import ddpo.prepare as prep  # noqa: E402
from ddpo.models import load_tokenizer  # noqa: E402
from ddpo.train import parse_args, train  # noqa: E402
from ddpo.writingprompts import conversation_tokens, read_writingprompts, transformed_score  # noqa: E402

MAX_TOKENS = 200
PROMPT0 = "The moon is a lie\nWrite it."
# the tiny byte-level chat model counts <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{comment}
# <|im_end|>\n as four special tokens, "user\n" (5), "\n" after each turn (2), "assistant\n" (10) and a token a byte
FITS = "x" * (MAX_TOKENS - 21 - len(PROMPT0))  # exactly MAX_TOKENS: kept (released: <= 2048)
POSTS = [  # the dataset's columns, as on the Hub
    {"post_title": "[WP] The moon is a lie", "post_text": "Write it.", "post_scores": 120,
     "comment_texts": ["A long story about the moon.",
                       "**Welcome to the Prompt!** All top-level comments must be a story or poem.",  # moderator
                       "Short one.",
                       "Sorry, this submission has been removed. Please see the sidebar.",  # a removal notice
                       "Another tale, told twice.", "Another tale, told twice.",  # one response
                       "word " * 400,  # huge: over MAX_TOKENS
                       FITS, FITS + "x"],  # at the limit, and one over it
     "comment_scores": [12, 1, 5, 0, 40, 3, 7, 2, 30], "comment_times": [1, 2, 3, 4, 5, 6, 7, 8, 9]},
    {"post_title": "[CW]", "post_text": "Only the text.", "post_scores": 3,  # a tag-only title
     "comment_texts": ["Nine votes.", "Three votes."], "comment_scores": [9, 3], "comment_times": [1, 2]},
    {"post_title": "No comments yet", "post_text": "", "post_scores": 1,
     "comment_texts": [], "comment_scores": [], "comment_times": []},
    {"post_title": "[ WP ]  Spaced tag", "post_text": "", "post_scores": 1,  # one comment: no pair
     "comment_texts": ["Alone."], "comment_scores": [4], "comment_times": [1]},
    {"post_title": "[OT]", "post_text": "", "post_scores": 1,  # tag-only, no text: an empty prompt
     "comment_texts": ["Lost."], "comment_scores": [6], "comment_times": [1]},
    {"post_title": "Mid [WP] tag", "post_text": "Body", "post_scores": 2,  # a tag not at the start stays
     "comment_texts": ["First.", "Second."], "comment_scores": [0, 0], "comment_times": [1, 2]},
]
SCHEMA = pa.schema([("post_title", pa.string()), ("post_text", pa.string()), ("post_scores", pa.int64()),
                    ("comment_texts", pa.list_(pa.string())), ("comment_scores", pa.list_(pa.int64())),
                    ("comment_times", pa.list_(pa.int64()))])


def write_posts(path, posts=POSTS):
    pq.write_table(pa.Table.from_pylist(posts, schema=SCHEMA), path)
    return str(path)


def released_transform(votes, low, high, unshifted_ends=True):
    """models/utils.py: transform_scores of the released code, for one score, in plain floats."""
    x, lo, hi = votes - low + 1, (low if unshifted_ends else 1), (high if unshifted_ends else high - low + 1)
    for _ in range(100):
        x = math.log(x + 1)
        lo = math.log(lo + 1) if lo > -1 else math.nan
        hi = math.log(hi + 1)
    return 2 * (x - lo) / (hi - lo) - 1


def test_transformed_scores_released_and_intended():
    # intended: the shifted ends map to exactly -1 and 1
    assert transformed_score(0, 0, 40, released=False) == pytest.approx(-1) and \
        transformed_score(40, 0, 40, released=False) == pytest.approx(1)
    # released: the unshifted ends do not (0 votes -> 0.944, the max -> above 1)
    bottom = transformed_score(0, 0, 40)
    assert bottom == pytest.approx(released_transform(0, 0, 40)) and bottom == pytest.approx(0.94373, abs=1e-5)
    top = transformed_score(40, 0, 40)
    assert top == pytest.approx(released_transform(40, 0, 40)) and top > 1
    for votes in (3, 12, 30):
        assert transformed_score(votes, 0, 40) == pytest.approx(released_transform(votes, 0, 40), rel=1e-9)
        intended = transformed_score(votes, 0, 40, False)
        assert intended == pytest.approx(released_transform(votes, 0, 40, False), rel=1e-9)
    assert transformed_score(5, -3, 40) is None  # released: log of a min vote <= -1 is NaN, written as null


def test_pools_match_the_hand_checked_expectation(tmp_path, tiny_model):
    count = conversation_tokens(load_tokenizer(tiny_model))
    assert count(PROMPT0, FITS) == MAX_TOKENS  # the hand count of the template above
    groups, counts = read_writingprompts(write_posts(tmp_path / "wp.parquet"), count, MAX_TOKENS)
    pools = [(g["prompt"], g["responses"], g["scores"]) for g in groups.values()]
    assert pools == [
        (PROMPT0, ["A long story about the moon.", "Short one.", "Another tale, told twice.", FITS],
         [12.0, 5.0, 40.0, 2.0]),
        ("\nOnly the text.", ["Nine votes.", "Three votes."], [9.0, 3.0]),
        ("Spaced tag\n", ["Alone."], [4.0]),
        ("Mid [WP] tag\nBody", ["First.", "Second."], [0.0, 0.0]),
    ]
    assert list(groups) == [f"{tmp_path}/wp.parquet:row {i}" for i in (0, 1, 3, 5)]  # one pool a post
    assert counts == {"posts": 6, "no_comment_posts": 1, "empty_prompt_posts": 1, "comments": 15,
                      "dropped_moderator": 2, "dropped_long": 2, "dropped_empty": 0, "dropped_duplicate": 1,
                      "min_votes": 0, "max_votes": 40}
    # the min and max votes are over every comment before filtering (released), so 40 is the top, 0 the bottom
    assert groups[f"{tmp_path}/wp.parquet:row 0"]["transformed"][2] == (
        pytest.approx(released_transform(40, 0, 40)), pytest.approx(1.0))
    # without a token limit the long comments stay
    groups, counts = read_writingprompts(str(tmp_path / "wp.parquet"))
    assert counts["dropped_long"] == 0 and len(next(iter(groups.values()))["responses"]) == 6


def test_schema_errors_name_the_row(tmp_path):
    bad = [dict(POSTS[1], comment_scores=[9])]
    with pytest.raises(prep.DataError, match=r"wp\.parquet:row 0: 2 comment_texts but 1 comment_scores"):
        read_writingprompts(write_posts(tmp_path / "wp.parquet", bad))
    pq.write_table(pa.Table.from_pylist([{"title": "x"}]), tmp_path / "other.parquet")
    with pytest.raises(prep.DataError, match=r"other\.parquet:row 0: missing column 'post_title'"):
        read_writingprompts(str(tmp_path / "other.parquet"))
    # wrong types in a JSONL of that schema: one line each, not a TypeError
    for field, value, error in (("post_title", 7, "post_title must be a string, got int"),
                                ("comment_texts", "a comment", "comment_texts must be a list, got str")):
        write_jsonl(tmp_path / "wp.jsonl", [dict(POSTS[1], **{field: value})])
        with pytest.raises(prep.DataError, match=rf"wp\.jsonl:1: {error}"):
            read_writingprompts(str(tmp_path / "wp.jsonl"))


def test_prepare_then_train_offline_from_the_parquet(tmp_path, tiny_model):
    wp = write_posts(tmp_path / "wp.parquet")
    out = tmp_path / "pairs.jsonl"
    prep.main(["--from", "writingprompts", "--input", wp, "--output", str(out), "--model", tiny_model,
               "--max-response-tokens", str(MAX_TOKENS), "--deviation", "style", "--gap", "5"])
    pairs = read_jsonl(out)
    # post 0: one seeded gap pair of 4 responses, then one more of the 2 left (both unequal); post 1: 9 over 3 votes;
    # the one-comment post and the equal-votes post make none
    assert [p["prompt"] for p in pairs] == [PROMPT0, PROMPT0, "\nOnly the text."]
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert {p["chosen"] for p in pairs[:2]} | {p["rejected"] for p in pairs[:2]} == {
        "A long story about the moon.", "Short one.", "Another tale, told twice.", FITS}
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == ("Nine votes.", "Three votes.")
    for p in pairs:
        votes = (p["chosen_score"], p["rejected_score"])
        assert p["meta"]["transformed_score"] == {
            "released": [pytest.approx(released_transform(s, 0, 40)) for s in votes],
            "intended": [pytest.approx(released_transform(s, 0, 40, False)) for s in votes]}
    meta = json.load(open(str(out) + ".meta.json"))
    assert meta["source"]["kind"] == "parquet" and len(meta["source"]["sha256"]) == 64
    assert meta["written_by"] == "ddpo.prepare" and meta["flags"]["schema"] == "writingprompts"
    # train reads the pairs as JSONL, and as parquet (other column names, mapped by flags) and a save_to_disk directory
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected", "weight")} for p in pairs]
    pq.write_table(pa.Table.from_pylist([{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"],
                                          "weight": r["weight"]} for r in rows]), tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    columns = ["--prompt-field", "question", "--chosen-field", "good", "--rejected-field", "bad"]
    losses = []
    for name, data, flags in [("jsonl", str(out), []), ("parquet", str(tmp_path / "pairs.parquet"), columns),
                              ("disk", str(tmp_path / "saved"), [])]:
        cfg = parse_args(["--model", tiny_model, "--data", data, "--output-dir", str(tmp_path / name), "--loss", "ddpo",
                          "--max-steps", "2", "--batch-size", "3", "--dtype", "float32", "--lr", "1e-3", *flags])
        train(cfg)
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses.append([json.loads(line)["loss"] for line in f])
    assert losses[0] == losses[1] == losses[2] and all(math.isfinite(x) for x in losses[0])


def test_trl_output_format(tmp_path, tiny_model):
    out = tmp_path / "trl.jsonl"
    prep.main(["--from", "writingprompts", "--input", write_posts(tmp_path / "wp.parquet"), "--output", str(out),
               "--max-response-tokens", "0", "--deviation", "style", "--output-format", "trl"])
    rows = read_jsonl(out)
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "weight", "chosen_score", "rejected_score"}
    assert rows[-1]["prompt"] == [{"role": "user", "content": "\nOnly the text."}]
    assert rows[-1]["chosen"] == [{"role": "assistant", "content": "Nine votes."}]
    assert rows[-1]["rejected"] == [{"role": "assistant", "content": "Three votes."}]
    assert all(r["weight"] >= 0 for r in rows)
    # TRL's format is one ddpo.train reads back, weights and all
    from ddpo.data import load_pairs
    pairs = load_pairs(str(out))
    assert [p.weight for p in pairs] == [r["weight"] for r in rows] and pairs[-1].chosen == rows[-1]["chosen"]
