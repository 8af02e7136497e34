"""Pairs JSONL: validation with file:line, tokenisation as TRL, truncation, collation."""

import json
import os
import tempfile

import pytest
from conftest import write_pairs

from ddpo.data import DataError, collate, load_pairs, tokenize_pairs
from ddpo.models import load_tokenizer
from ddpo_kernels.logprobs import IGNORE_INDEX

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM, USER, ASSISTANT = msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello!")


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt": "p", "chosen": "c"}), "missing field 'rejected'"),
    (json.dumps({**GOOD, "chosen": "  "}), "field 'chosen' is empty"),
    (json.dumps({**GOOD, "prompt": []}), "field 'prompt' is an empty message list"),
    (json.dumps({**GOOD, "prompt": 3}), "must be a string or a list of messages"),
    (json.dumps({**GOOD, "chosen": [{"role": "user", "content": "x"}]}), "role 'user' not in ['assistant']"),
    (json.dumps({**GOOD, "rejected": [{"role": "assistant"}]}), "expected {\"role\": str, \"content\": str}"),
    (json.dumps({**GOOD, "weight": "high"}), "weight must be a number"),
    (json.dumps({**GOOD, "weight": True}), "weight must be a number"),
    (json.dumps({**GOOD, "weight": -0.5}), "weight must be >= 0"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "weight": NaN}', "weight must be finite"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "weight": Infinity}', "weight must be finite"),
    # TRL's implicit prompt: conversations only, a shared prefix, then assistant messages only
    (json.dumps({"chosen": "The sky is blue.", "rejected": "The sky is green."}),
     "missing field 'prompt' (an implicit prompt is taken only from conversations"),
    (json.dumps({"chosen": [USER, ASSISTANT], "rejected": "r"}), "missing field 'prompt' (an implicit prompt"),
    (json.dumps({"chosen": [USER, ASSISTANT], "rejected": [msg("user", "Bye"), ASSISTANT]}),
     "'chosen' and 'rejected' share no leading messages"),
    (json.dumps({"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT]}),
     "field 'chosen' has no messages after the implicit prompt (the 2 leading messages it shares with 'rejected')"),
    (json.dumps({"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT, msg("assistant", "More.")]}),
     "field 'chosen' has no messages after the implicit prompt"),
    (json.dumps({"chosen": [USER, ASSISTANT, msg("assistant", "More.")], "rejected": [USER, ASSISTANT]}),
     "field 'rejected' has no messages after the implicit prompt"),
    (json.dumps({"chosen": [SYSTEM, USER, ASSISTANT], "rejected": [SYSTEM, msg("user", "Yo"), ASSISTANT]}),
     "field 'chosen', message 1: role 'user' after the implicit prompt (the 1 leading messages it shares with "
     "'rejected'); what follows the prompt must be assistant messages"),
    (json.dumps({"chosen": [USER, ASSISTANT, msg("user", "And?"), ASSISTANT],
                 "rejected": [USER, msg("assistant", "No")]}),
     "field 'chosen', message 2: role 'user' after the implicit prompt"),
    (json.dumps({"chosen": [USER, ASSISTANT], "rejected": [USER, msg("system", "x")]}),
     "field 'rejected', message 1: role 'system' after the implicit prompt"),
    (json.dumps({"chosen": [USER, {"role": "assistant"}], "rejected": [USER, ASSISTANT]}),
     "field 'chosen', message 1: expected {\"role\": str, \"content\": str}"),
    (json.dumps({"chosen": [msg("user", " "), msg("assistant", "a")],
                 "rejected": [msg("user", " "), msg("assistant", "b")]}),
     "field 'implicit prompt' has only empty messages"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_pairs(tmp_path / "pairs.jsonl", [GOOD, "", line])  # the bad record is on line 3
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_all_problems_are_listed(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", [{**GOOD, "weight": -1}, GOOD, {"prompt": "p"}])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert f"{path}:1: weight" in str(e.value) and f"{path}:3: missing field 'chosen'" in str(e.value)


def test_empty_file_and_missing_path(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no preference pairs"):
        load_pairs(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl or .parquet files"):
        load_pairs(str(tmp_path / "dir"))


def test_directory_and_weights(tmp_path):
    (tmp_path / "d").mkdir()
    write_pairs(tmp_path / "d" / "b.jsonl", [{**GOOD, "weight": 2}])
    write_pairs(tmp_path / "d" / "a.jsonl", [GOOD, {**GOOD, "weight": 0}])
    pairs = load_pairs(str(tmp_path / "d"))
    assert [p.weight for p in pairs] == [None, 0.0, 2.0]
    assert pairs[2].source.endswith("b.jsonl:1")


def test_implicit_prompt_is_the_shared_leading_messages(tiny_model):
    """TRL's conversational implicit prompt: the messages chosen and rejected share (a system message and a whole
    earlier exchange here) are the prompt, the assistant messages after them the completions; tokenised exactly as
    the same pair with an explicit prompt."""
    history = [SYSTEM, USER, ASSISTANT, msg("user", "Tell me a story.")]
    chosen, rejected = ([msg("assistant", "Once, a lighthouse.")],
                        [msg("assistant", "No."), msg("assistant", "Fine: once.")])
    tok = load_tokenizer(tiny_model)
    implicit = load_pairs_from(tok, [{"chosen": history + chosen, "rejected": history + rejected, "weight": 0.5}])[0]
    assert (implicit.prompt, implicit.chosen, implicit.rejected, implicit.weight) == (history, chosen, rejected, 0.5)
    explicit = load_pairs_from(tok, [{"prompt": history, "chosen": chosen, "rejected": rejected}])[0]
    assert (implicit.prompt_ids, implicit.chosen_ids, implicit.rejected_ids) == (
        explicit.prompt_ids, explicit.chosen_ids, explicit.rejected_ids)
    assert tok.decode(implicit.prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tok.decode(implicit.chosen_ids) == "Once, a lighthouse.<|im_end|>\n"


def test_weight_field_reads_the_weight_from_another_field(tmp_path):
    """--weight-field score: the weight is each record's 'score' ('weight' is then ignored), in either format."""
    implicit = {"chosen": [USER, ASSISTANT], "rejected": [USER, msg("assistant", "Go away.")]}
    path = write_pairs(tmp_path / "pairs.jsonl", [{**GOOD, "score": 2, "weight": 7}, {**implicit, "score": 0.25}])
    assert [p.weight for p in load_pairs(path, weight_field="score")] == [2.0, 0.25]
    assert [p.weight for p in load_pairs(path)] == [7.0, None]  # the default 'weight' stays optional
    with pytest.raises(DataError, match="--weight-field: empty field name"):
        load_pairs(path, weight_field="")


@pytest.mark.parametrize("record, message", [
    (GOOD, "missing field 'score' (the weight, named by --weight-field)"),
    ({**GOOD, "weight": 1.0}, "missing field 'score'"),
    ({**GOOD, "score": None}, "score must be a number, got None"),
    ({**GOOD, "score": "high"}, "score must be a number, got 'high'"),
    ({**GOOD, "score": -1}, "score must be >= 0, got -1"),
    ({**GOOD, "score": 1e999}, "score must be finite, got inf"),
])
def test_weight_field_missing_or_invalid_names_file_and_line(tmp_path, record, message):
    path = write_pairs(tmp_path / "pairs.jsonl", [{**GOOD, "score": 1}, record])
    with pytest.raises(DataError) as e:
        load_pairs(path, weight_field="score")
    assert f"{path}:2: {message}" in str(e.value) and f"{path}:1" not in str(e.value)


def test_chat_template_tokenisation(tiny_model):
    tok = load_tokenizer(tiny_model)
    pairs = load_pairs_from(tok, [{"prompt": "Hi", "chosen": "Yes!", "rejected": "No"}])
    p = pairs[0]
    assert tok.decode(p.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(p.chosen_ids) == "Yes!<|im_end|>\n" and tok.decode(p.rejected_ids) == "No<|im_end|>\n"
    # message lists give the same ids as strings
    msgs = load_pairs_from(tok, [{"prompt": [{"role": "user", "content": "Hi"}],
                                  "chosen": [{"role": "assistant", "content": "Yes!"}],
                                  "rejected": [{"role": "assistant", "content": "No"}]}])[0]
    assert (msgs.prompt_ids, msgs.chosen_ids, msgs.rejected_ids) == (p.prompt_ids, p.chosen_ids, p.rejected_ids)


def test_plain_tokenisation_appends_eos(tiny_model_plain):
    tok = load_tokenizer(tiny_model_plain)
    p = load_pairs_from(tok, [{"prompt": "Once", "chosen": " upon", "rejected": " more<|im_end|>"}])[0]
    assert tok.decode(p.prompt_ids) == "Once"
    assert tok.decode(p.chosen_ids) == " upon<|im_end|>" and tok.decode(p.rejected_ids) == " more<|im_end|>"
    with pytest.raises(DataError, match=r"pairs.jsonl:1: message lists need a tokenizer with a chat template"):
        load_pairs_from(tok, [{"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}])


def test_truncation_keeps_prompt_end_and_completion_start(tiny_model_plain):
    tok = load_tokenizer(tiny_model_plain)
    rows = [{"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "xy"},
            {"prompt": "ab", "chosen": "c", "rejected": "d"}]
    pairs = load_pairs_from(tok, rows, max_length=8, max_prompt_length=4, expect=(1, 1))
    assert tok.decode(pairs[0].prompt_ids) == "ghij"  # the end of the prompt
    assert tok.decode(pairs[0].chosen_ids) == "0123"  # the start of the completion, total 8
    assert tok.decode(pairs[0].rejected_ids) == "xy<|im_end|>"
    with pytest.raises(ValueError, match="must be below"):
        tokenize_pairs(pairs, tok, max_length=8, max_prompt_length=8)


@pytest.mark.parametrize("lengths, released, ours", [
    ((40, 600, 300), (40, 384, 300), (40, 472, 300)),  # the prompt fits: both completions cut to 512 - 128
    ((200, 100, 80), (200, 100, 80), (128, 100, 80)),  # the pair fits whole: the long prompt stays
    ((200, 350, 80), (128, 350, 80), (128, 350, 80)),  # cutting the prompt is enough
    ((200, 600, 500), (128, 384, 384), (128, 384, 384)),
    ((40, 472, 300), (40, 472, 300), (40, 472, 300)),  # exactly 512
    ((40, 473, 10), (40, 384, 10), (40, 472, 10)),
    ((300, 100, 80), (300, 100, 80), (128, 100, 80)),  # the pair fits: the released rule keeps a 300-token prompt
])
def test_orpo_truncation_follows_the_released_rule(tiny_model_plain, lengths, released, ours):
    """ORPO/DORPO as released (TRL 0.8's ORPO tokenisation, max_length 512, max_prompt_length 128): only a pair
    whose prompt + longer completion exceeds 512 is cut, the prompt to its last 128, then both completions to 384.
    The DPO rule (every other loss) cuts any prompt over 128 and each completion to 512 - prompt."""
    from ddpo.losses import LOSSES

    tok = load_tokenizer(tiny_model_plain)
    p, c, r = lengths  # one token a character; a completion's last token is its end of turn
    row = {"prompt": "p" * p, "chosen": "c" * (c - 1), "rejected": "r" * (r - 1)}
    assert (LOSSES["orpo"].truncation, LOSSES["orpo"].orpo_rule, LOSSES["dorpo"].orpo_rule) == ((512, 128), True, True)
    assert not any(loss.orpo_rule for name, loss in LOSSES.items() if name not in ("orpo", "dorpo"))
    for orpo_rule, expected in ((True, released), (False, ours)):
        pairs = load_pairs(write_pairs(os.path.join(tempfile.mkdtemp(), "pairs.jsonl"), [row]))
        tokenize_pairs(pairs, tok, 512, 128, orpo_rule)
        assert (len(pairs[0].prompt_ids), len(pairs[0].chosen_ids), len(pairs[0].rejected_ids)) == expected


def load_pairs_from(tok, rows, max_length=0, max_prompt_length=0, expect=(0, 0)):
    path = write_pairs(os.path.join(tempfile.mkdtemp(), "pairs.jsonl"), rows)
    pairs = load_pairs(path)
    stats = tokenize_pairs(pairs, tok, max_length, max_prompt_length)
    assert (stats["prompts_truncated"], stats["completions_truncated"]) == expect
    return pairs


def test_collate_layout(tiny_model_plain):
    tok = load_tokenizer(tiny_model_plain)
    pairs = load_pairs_from(tok, [{"prompt": "ab", "chosen": "cde", "rejected": "f"},
                                  {"prompt": "g", "chosen": "h", "rejected": "ijkl"}])
    batch = collate(pairs, tok.pad_token_id)
    input_ids, attention_mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    assert input_ids.shape == (4, 6)  # rows: chosen 0, chosen 1, rejected 0, rejected 1
    assert tok.decode(input_ids[2][attention_mask[2].bool()]) == "abf<|im_end|>"
    assert attention_mask.sum(1).tolist() == [6, 3, 4, 6]
    assert (labels[0] != IGNORE_INDEX).tolist() == [False, False, True, True, True, True]
    assert (labels[1] != IGNORE_INDEX).tolist() == [False, True, True, False, False, False]
    assert (input_ids[1, 3:] == tok.pad_token_id).all()


def test_a_prompt_without_a_token_of_its_own_is_refused(tmp_path):
    """A plain-text prompt that merges with its completions' first token (a BPE merge, no BOS) leaves the
    completions with nothing before them to predict their first token: a file:line error, not a silent skew."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["ab"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="\n")
    pairs = load_pairs(write_pairs(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "yes", "rejected": "no"},
                                                          {"prompt": "a", "chosen": "bc", "rejected": "bd"}]))
    with pytest.raises(DataError, match=r"p.jsonl:2: the prompt has no token of its own"):
        tokenize_pairs(pairs, tokenizer)
    tokenize_pairs(pairs[:1], tokenizer)


def test_orpo_rule_without_max_length_cuts_nothing(tiny_model_plain):
    tok = load_tokenizer(tiny_model_plain)
    row = {"prompt": "p" * 200, "chosen": "c" * 99, "rejected": "r" * 79}
    for orpo_rule, prompt in ((True, 200), (False, 128)):
        pairs = load_pairs(write_pairs(os.path.join(tempfile.mkdtemp(), "pairs.jsonl"), [row]))
        tokenize_pairs(pairs, tok, 0, 128, orpo_rule)
        assert len(pairs[0].prompt_ids) == prompt
