"""ddpo.generate: sampling processors, conformative mixing, w = 0 equals plain sampling, resume, bad input."""

import pytest
import torch
from conftest import make_tiny_model, read_jsonl, write_jsonl

from ddpo.generate import Sampling, main, next_token_probs, penalise, truncation_mask


def test_repetition_penalty_follows_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert penalise(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_truncation_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert truncation_mask(logits, Sampling(top_k=2, top_p=1.0)).tolist() == [[True, True, False, False]]
    # top-p 0.8: 0.5 (mass above 0), 0.3 (0.5 above) kept, 0.15 (0.8 above) dropped
    assert truncation_mask(logits, Sampling(top_k=0, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert truncation_mask(logits, Sampling(top_k=0, top_p=0.81)).tolist() == [[True, True, True, False]]
    # min-p 0.25: keep p >= 0.125
    assert truncation_mask(logits, Sampling(top_k=0, top_p=1.0, min_p=0.25)).tolist() == [[True, True, True, False]]


def test_conformative_mixing_by_hand():
    instruct = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0001]]))
    base = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    s = Sampling(top_k=2, top_p=1.0, repetition_penalty=1.0, temperature=1.0)
    seen = torch.zeros(1, 4, dtype=torch.bool)
    p = next_token_probs(instruct, base, seen, s, w=0.5)
    # mix = 0.5 * instruct + 0.5 * base on the instruct top-2 {0, 1}: 0.35, 0.25 -> renormalised 7/12, 5/12
    torch.testing.assert_close(p, torch.tensor([[7 / 12, 5 / 12, 0.0, 0.0]]), atol=1e-4, rtol=1e-4)
    assert next_token_probs(instruct, base, seen, s, w=1.0)[0, 3] == 0  # the base alone never leaves the set


def test_mixture_is_a_distribution_inside_the_truncation_set():
    g = torch.Generator().manual_seed(0)
    instruct, base = torch.randn(5, 100, generator=g) * 3, torch.randn(5, 100, generator=g) * 3
    seen = torch.rand(5, 100, generator=g) < 0.1
    s = Sampling(top_k=20, top_p=0.9, min_p=0.05)
    for w in (0.0, 0.3, 1.0):
        p = next_token_probs(instruct, base, seen, s, w)
        keep = truncation_mask(penalise(instruct, seen, s.repetition_penalty) / s.temperature, s)
        torch.testing.assert_close(p.sum(-1), torch.ones(5))
        assert (p[~keep] == 0).all() and (p >= 0).all()


PROMPTS = [{"prompt": "Tell a tale."}, {"prompt": "A poem, please."}, {"prompt": [{"role": "user", "content": "Why?"}], "id": "q"}]


def test_w0_equals_plain_sampling_and_w_changes_it(tmp_path, tiny_model):
    base = make_tiny_model(tmp_path / "base", seed=1)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = ["--model", tiny_model, "--prompts", prompts, "--max-new-tokens", "12", "--n", "3", "--batch-prompts", "2"]
    main(common + ["--output", str(tmp_path / "plain.jsonl")])
    main(common + ["--output", str(tmp_path / "w0.jsonl"), "--base-model", base, "--conform-weight", "0"])
    main(common + ["--output", str(tmp_path / "w1.jsonl"), "--base-model", base, "--conform-weight", "1",
                   "--base-prompt-format", "completion"])
    plain, w0, w1 = (read_jsonl(tmp_path / f) for f in ("plain.jsonl", "w0.jsonl", "w1.jsonl"))
    assert len(plain) == 9 and [r["prompt_id"] for r in plain[::3]] == ["0", "1", "q"]
    assert [r["response"] for r in plain] == [r["response"] for r in w0]
    assert [r["response"] for r in plain] != [r["response"] for r in w1]
    assert w1[0]["conform_weight"] == 1.0 and w1[0]["top_k"] == 50 and w1[0]["repetition_penalty"] == 1.1


def test_resume_skips_finished_batches_and_drops_a_torn_line(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = ["--model", tiny_model, "--prompts", prompts, "--max-new-tokens", "8", "--n", "2", "--batch-prompts", "1"]
    main(common + ["--output", str(tmp_path / "full.jsonl")])
    full = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "part.jsonl").write_text("".join(full[:2]) + full[2][:10])  # batch 0 done, batch 1 torn
    main(common + ["--output", str(tmp_path / "part.jsonl")])
    assert (tmp_path / "part.jsonl").read_text() == "".join(full)


def test_mismatched_tokenizers_and_bad_prompts(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    other = make_tiny_model(tmp_path / "other", vocab_extra=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(other)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(ValueError, match="one vocabulary"):
        main(["--model", tiny_model, "--prompts", prompts, "--output", str(tmp_path / "o.jsonl"), "--base-model", other])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(SystemExit, match=f"{bad}:2: missing field 'prompt'"):
        main(["--model", tiny_model, "--prompts", bad, "--output", str(tmp_path / "o.jsonl")])
