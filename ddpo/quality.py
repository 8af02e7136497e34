"""Quality scores for responses: a reward model by path, or an offline proxy.

    scorer = load_scorer("proxy")                      # or "reward-model:/path/to/rm"
    scores = scorer(prompts, responses)                # list of floats, one per response

Reward model: any AutoModelForSequenceClassification (first logit is the reward). The prompt and response are
rendered with the reward model's chat template when it has one, else joined by a blank line. Each text is scored
on its own, unpadded, so the last real token is pooled whatever the tokenizer's padding side.

Proxy (offline, deterministic; a stand-in for a reward model, not a judge of writing): in [0, 10],
    10 * length * non_repetition * (0.5 + 0.5 * richness) * ending
  length          min(1, words / 60): short texts score low, and length stops paying at 60 words
  non_repetition  distinct word trigrams / word trigrams: repeating phrases scores low
  richness        distinct words / words over the first 100 words (length-independent type-token ratio)
  ending          1 if the text ends on terminal punctuation, else 0.8 (cut-off generations)
"""

import re

import torch


def proxy_score(text):
    words = re.findall(r"[\w']+", text.lower())
    if len(words) < 3:
        return 0.0
    trigrams = list(zip(words, words[1:], words[2:]))
    head = words[:100]
    length = min(1.0, len(words) / 60)
    non_repetition = len(set(trigrams)) / len(trigrams)
    richness = len(set(head)) / len(head)
    ending = 1.0 if re.search(r"[.!?\"'\u201d)]\s*$", text) else 0.8
    return 10.0 * length * non_repetition * (0.5 + 0.5 * richness) * ending


class RewardModel:
    def __init__(self, path, device=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ddpo.models import load_weights

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_weights(AutoModelForSequenceClassification, path).to(self.device).eval()

    def render(self, prompt, response):
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt if isinstance(prompt, str) else prompt[-1]["content"]},
                        {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return self.tokenizer(f"{prompt}\n\n{response}", truncation=True)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts, responses):
        scores = []
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([self.render(prompt, response)], device=self.device)  # (1, T): no padding to pool past
            scores.append(self.model(input_ids=ids).logits[0, 0].float().item())
        return scores


def scorer_spec(spec):
    """spec itself if it names a scorer (proxy, or reward-model:PATH with a PATH), else ValueError."""
    if spec == "proxy" or (spec.startswith("reward-model:") and spec.split(":", 1)[1]):
        return spec
    raise ValueError(f"unknown scorer {spec!r}: use proxy or reward-model:PATH")


def load_scorer(spec):
    if scorer_spec(spec) == "proxy":
        return lambda prompts, responses: [proxy_score(r) for r in responses]
    return RewardModel(spec.split(":", 1)[1])
