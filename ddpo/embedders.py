"""Embedders: texts -> unit-length embeddings (N, D), the inputs of the deviation weights (ddpo/deviation.py).

    embed = load_embedder("packaged:all-minilm-l6-v2")    # semantic, offline default
    embed = load_embedder("stylometric")                  # style, offline stand-in
    embed = load_embedder("jinaai/jina-embeddings-v3", trust_remote_code=True)   # the paper's semantic embedder
    e = embed(["a story", "another story"])               # (2, D), float32, rows of norm 1
    w = pool_weights(pairs, [embed])                       # each pair's chosen weight, from its prompt's pool

Encoder: any transformers encoder by hub name or path, mean pooling over real tokens (semantic: the paper's
jinaai/jina-embeddings-v3, offline `packaged:all-minilm-l6-v2`; style: AnnaWegmann/Style-Embedding). Stylometric,
the offline style stand-in: a profile of function-word and punctuation rates and sentence- and word-length
statistics, standardised over the texts embedded together, so that it measures *how* a text is written and not
what it is about (docs/method.md, section 2).
"""

import json
import os
import re

import torch

from ddpo.data import DataError, response_pools
from ddpo.deviation import kernel_weights
from ddpo.models import check_model_path, load_weights, quiet_transformers, resolve

CHARS_PER_TOKEN = 64  # the first max_length tokens of any but a pathological text lie in max_length x 64 chars


class Encoder:
    """A transformers encoder with mean pooling over real tokens and L2 normalisation, batched, truncated.

    A model that ships its own code (an `auto_map` in its config, as jinaai/jina-embeddings-v3) runs it only with
    trust_remote_code; without, it is refused rather than loaded as the stock class its config names."""

    def __init__(self, name_or_path, device=None, batch_size=32, max_length=None, trust_remote_code=False):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        quiet_transformers()
        path = resolve(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except ValueError as e:  # a config class that exists only in the model's own code
            if "trust_remote_code" not in str(e):
                raise
            config = None
        if not trust_remote_code and (config is None or "AutoModel" in (getattr(config, "auto_map", None) or {})):
            raise DataError(f"{name_or_path}: the model ships its own code; pass --trust-remote-code to run it "
                            "(only for a model you trust)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = load_weights(AutoModel, path, config=config, trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length or self.default_max_length(path)

    def default_max_length(self, path):
        st_config = os.path.join(path, "sentence_bert_config.json")
        if os.path.exists(st_config):
            with open(st_config) as f:
                return json.load(f)["max_seq_length"]
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        return min(512, limit, self.tokenizer.model_max_length)

    @torch.no_grad()
    def __call__(self, texts):
        # only the first max_length tokens count: cut runaway texts before the tokenizer sees them whole
        texts = [t[:self.max_length * CHARS_PER_TOKEN] for t in texts]
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out)


FUNCTION_WORDS = (
    "the a an and but or so because if then when while as of in on at to from with by for about into over after "
    "before under i you he she it we they me him her us them my your his its our their this that these those "
    "is was are were be been being have has had do did not no very just only all some there here what who which"
).split()
PUNCTUATION = list(",.;:!?-\"'()") + ["...", "\u2014"]


def stylometric_profile(text):
    """Raw style features of one text: function-word and punctuation rates, sentence/word length statistics."""
    words = re.findall(r"[A-Za-z']+", text)
    lower = [w.lower() for w in words]
    n_words = max(1, len(words))
    n_chars = max(1, len(text))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    sent_lens = torch.tensor([len(re.findall(r"[A-Za-z']+", s)) for s in sentences] or [0], dtype=torch.float64)
    word_lens = torch.tensor([len(w) for w in words] or [0], dtype=torch.float64)
    counts = {w: 0 for w in FUNCTION_WORDS}
    for w in lower:
        if w in counts:
            counts[w] += 1
    features = [counts[w] / n_words for w in FUNCTION_WORDS]
    features += [text.count(p) / n_chars * 100 for p in PUNCTUATION]
    features += [
        sent_lens.mean().item(), sent_lens.std(unbiased=False).item(), word_lens.mean().item(),
        word_lens.std(unbiased=False).item(), len(set(lower)) / n_words, sum(w[0].isupper() for w in words) / n_words,
        text.count("\n") / n_words * 100, text.count('"') / n_words,
    ]
    return features


class Stylometric:
    """Offline style embedder: stylometric profiles standardised (z-scored) over the texts embedded together."""

    def __call__(self, texts):
        x = torch.tensor([stylometric_profile(t) for t in texts], dtype=torch.float64)  # (N, F)
        x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp(min=1e-8)
        return torch.nn.functional.normalize(x, dim=-1).float()


DEFAULT_EMBEDDERS = {"semantic": "packaged:all-minilm-l6-v2", "style": "stylometric"}


def load_embedder(name_or_path, device=None, trust_remote_code=False):
    """A callable texts -> unit embeddings (N, D): `stylometric`, or a transformers encoder by hub name or path."""
    if name_or_path == "stylometric":
        return Stylometric()
    return Encoder(name_or_path, device=device, trust_remote_code=trust_remote_code)


def check_embedder(name_or_path, flag):
    """A one-line DataError for an embedder path that is no model directory (models.check_model_path)."""
    if name_or_path != "stylometric":
        check_model_path(name_or_path, flag)


def pool_weights(pairs, embed, min_weight=0.0, use_triton=None):
    """The chosen weight (P,) of each pair from its prompt's pool (the texts of the prompt's pairs, data.response_pools)
    embedded by each of `embed` (loaded embedders, deviation.METRICS order): the fused kernel's weights, once per set
    of pools (ddpo.train --deviation: the run's pairs; ddpo.online: each round's). Equal to ddpo.prepare's (tested)."""
    texts, text_prompt, _, pair_chosen = response_pools(pairs)
    embeddings = [e(texts) for e in embed]
    return kernel_weights(embeddings, text_prompt, pair_chosen, min_weight, use_triton).float()
