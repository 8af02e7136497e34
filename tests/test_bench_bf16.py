"""bench.bf16's measure of the rewards' bf16 noise: each pair's DPO logit on the same weights in fp32 and under bf16
autocast (the figure in bench/RESULTS.md and the README's --dtype paragraph)."""

import torch
from conftest import make_tiny_model, write_pairs

from bench.bf16 import logit_noise
from ddpo.data import load_pairs, make_batch, tokenize_pairs
from ddpo.models import load_model, load_tokenizer, sequence_logps


def test_logit_noise_is_zero_at_the_start_and_bf16_rounding_after_it(tmp_path, tiny_model):
    data = write_pairs(tmp_path / "pairs.jsonl")
    err, true = logit_noise(tiny_model, tiny_model, data)  # the policy is the reference: every logit is exactly 0
    assert err.tolist() == true.tolist() == [0.0] * 6
    other = make_tiny_model(tmp_path / "other", seed=1)  # another policy: logits of its own, bf16 off them a little
    err, true = logit_noise(tiny_model, other, data, beta=0.1)
    pairs = load_pairs(data)
    tokenize_pairs(pairs, load_tokenizer(tiny_model))
    policy, ref = load_model(other), load_model(tiny_model)
    expected = []
    with torch.no_grad():
        for pair in pairs:  # the fp32 logit by hand, from the log-probs of chosen and rejected
            batch = make_batch([pair], load_tokenizer(tiny_model).pad_token_id, torch.device("cpu"), packing=False)
            (pc, pr), (rc, rr) = sequence_logps(policy, batch)[0], sequence_logps(ref, batch)[0]
            expected.append(abs(0.1 * ((pc - rc) - (pr - rr)).item()))
    torch.testing.assert_close(true, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert (err > 0).any() and (err < 0.05 * true.max() + 0.01).all()
