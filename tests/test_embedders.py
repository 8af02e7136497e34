"""Embedders: the stylometric profile sees style, not content; the encoder pools real tokens only and truncates."""

import pytest
import torch
from conftest import make_tiny_encoder

from ddpo.embedders import Encoder, Stylometric


def test_stylometric_ignores_content_and_sees_style():
    texts = ["The cat sat on the mat. It was warm.", "The dog lay on the rug. It was cold.",
             '"Run!" she screamed; then -- silence... Who knew? Nobody, nobody at all!']
    e = Stylometric()(texts)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3))
    assert (e[0] @ e[1]).item() == pytest.approx(1.0, abs=1e-6)  # same style, other content: distance 0
    assert (e[0] @ e[2]).item() < 0.5


def test_encoder_pools_real_tokens_only_and_truncates(tmp_path):
    enc = Encoder(make_tiny_encoder(tmp_path, "a b c d e f g h".split()), device="cpu", batch_size=2, max_length=6)
    alone = enc(["a b"])
    batched = enc(["a b", "c d e f g h a b c d e"])  # the long text pads the short one and is truncated
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(enc(["c d e f g h"])[0], batched[1], atol=1e-5, rtol=1e-5)  # cut to 6 tokens


def test_encoder_cuts_a_runaway_text_before_tokenizing_it(tmp_path, monkeypatch):
    """Only the first max_length tokens count, so a 6 MB text embeds as its start, and the tokenizer never sees it
    whole (a 50 MB text used to take the tokenizer past 8 GB)."""
    enc = Encoder(make_tiny_encoder(tmp_path, "a b c".split()), device="cpu", max_length=8)
    seen = []
    tokenize = enc.tokenizer.__class__.__call__
    monkeypatch.setattr(enc.tokenizer.__class__, "__call__", lambda self, texts, **k: (
        seen.extend(len(t) for t in texts), tokenize(self, texts, **k))[1])
    runaway = "a b c " * 1_000_000
    torch.testing.assert_close(enc([runaway])[0], enc(["a b c a b c a b c"])[0])
    assert max(seen) <= 8 * 64
