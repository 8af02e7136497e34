"""Deviation weights (DESIGN.md 2), vectorised over ragged groups, plus the embedders that feed them.

A group is the pool of responses to one prompt. Responses are rows of an embedding matrix, and `group` (M,) says
which prompt each row belongs to (ids 0..G-1, any order). Nothing loops over groups or pairs in Python:

  mean cosine distance   dev_i = 1/(n-1) sum_{j!=i} (1 - e_i.e_j) = 1 - (e_i.S_g - e_i.e_i) / (n-1),
                         S_g = sum of the unit embeddings of group g: O(M D) instead of O(sum n^2 D)
  min-max to [-1, 1]     d_i = 2 (dev_i - min_g) / (max_g - min_g) - 1, and 0 where max_g - min_g <= EQUAL_TOL
  geometric mean         p_i = prod_m ((d_i^m + 1) / 2) ^ (1/K)
  weights                w_i = p_i / mean_g(p), and 1 where mean_g(p) is 0 (all p equal, e.g. N = 2)

A group of one response has no deviation (dev 0, w 1). EQUAL_TOL guards the released code's `max == min` test
against float noise: without it, identical responses whose deviations differ by 1e-16 would get weights 0 and 2.

Embedders (`load_embedder`): any transformers encoder by hub name or path with mean pooling (semantic: the paper's
jinaai/jina-embeddings-v3; style: AnnaWegmann/Style-Embedding), `packaged:all-minilm-l6-v2` (the offline semantic
default), and `stylometric`, the offline style stand-in: a profile of function-word and punctuation rates and
sentence- and word-length statistics, standardised over the texts embedded together, so that it measures *how*
a text is written and not what it is about.
"""

import json
import math
import os
import re

import torch

from ddpo.data import DataError
from ddpo.models import check_model_path

EQUAL_TOL = 1e-6


def mean_cosine_distance(embeddings, group):
    """embeddings (M, D), group (M,) long -> dev (M,): mean cosine distance to the other members of the group."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)  # (M, D)
    G = int(group.max()) + 1
    sums = torch.zeros(G, e.shape[1], dtype=e.dtype, device=e.device).index_add_(0, group, e)  # (G, D)
    n = torch.bincount(group, minlength=G).to(e.dtype)[group]  # (M,) size of each row's group
    cos_to_others = ((e * sums[group]).sum(-1) - (e * e).sum(-1)) / (n - 1).clamp(min=1)
    return torch.where(n > 1, 1.0 - cos_to_others, torch.zeros_like(n))


def group_minmax(values, group):
    """Min-max each group's values to [-1, 1]; 0 for groups whose spread is at most EQUAL_TOL."""
    G = int(group.max()) + 1
    lo = torch.full((G,), math.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, group, values, "amin")
    hi = torch.full((G,), -math.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, group, values, "amax")
    spread = (hi - lo)[group]
    scaled = 2.0 * (values - lo[group]) / spread.clamp(min=EQUAL_TOL) - 1.0
    return torch.where(spread > EQUAL_TOL, scaled, torch.zeros_like(values))


def combine(normalised):
    """Geometric mean in [0, 1] of K min-maxed deviations, each (M,) in [-1, 1]."""
    stacked = torch.stack([(d + 1.0) / 2.0 for d in normalised])  # (K, M)
    return stacked.prod(0) ** (1.0 / len(normalised))


def group_weights(p, group):
    """w = p / mean over the group of p; 1 where that mean is 0."""
    G = int(group.max()) + 1
    sums = torch.zeros(G, dtype=p.dtype, device=p.device).index_add_(0, group, p)
    mean = sums[group] / torch.bincount(group, minlength=G).to(p.dtype)[group]
    return torch.where(mean > 0, p / mean.clamp(min=1e-300), torch.ones_like(p))


def deviation_weights(embeddings_per_metric, group):
    """The whole of DESIGN.md 2 for K metrics: returns (weights (M,), raw deviations [(M,)] per metric)."""
    devs = [mean_cosine_distance(e, group) for e in embeddings_per_metric]
    return group_weights(combine([group_minmax(d, group) for d in devs]), group), devs


def chosen_weights(weights, chosen_index, min_weight=0.0):
    """Weights of the chosen responses, clamped from below (the paper's minimum-weight ablation, on *chosen*)."""
    return weights[chosen_index].clamp(min=min_weight)


# ----------------------------------------------------------------------------------------------- embedders

class Encoder:
    """A transformers encoder with mean pooling over real tokens and L2 normalisation, batched, truncated.

    A model that ships its own code (an `auto_map` in its config, as jinaai/jina-embeddings-v3) runs it only with
    trust_remote_code; without, it is refused rather than loaded as the stock class its config names."""

    def __init__(self, name_or_path, device=None, batch_size=32, max_length=None, trust_remote_code=False):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from ddpo.models import quiet_transformers, resolve

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
        self.model = AutoModel.from_pretrained(path, config=config, trust_remote_code=trust_remote_code).to(self.device).eval()
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
METRICS = {"none": [], "semantic": ["semantic"], "style": ["style"], "both": ["semantic", "style"]}


def load_embedder(name_or_path, device=None, trust_remote_code=False):
    if name_or_path == "stylometric":
        return Stylometric()
    return Encoder(name_or_path, device=device, trust_remote_code=trust_remote_code)


def check_embedder(name_or_path, flag):
    """A one-line DataError for an embedder path that is no model directory (models.check_model_path)."""
    if name_or_path != "stylometric":
        check_model_path(name_or_path, flag)
