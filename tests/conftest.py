"""Shared fixtures: tiny Llama models with a byte-level tokenizer, built from a config (no hub, no download).

Triton kernels run under TRITON_INTERPRET=1 on CPU; the variable must be set before triton is imported.
On a machine with CUDA it is left unset and the same kernel tests run on the GPU.
"""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_tiny_model(path, chat_template=True, seed=0, vocab_extra=0):
    """A 2-layer Llama over a 256-byte vocabulary (+ specials), saved with its tokenizer to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
                                        additional_special_tokens=["<|im_start|>"])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer) + vocab_extra, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_model_plain(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


STORIES = [
    ("Write a story about a lighthouse.", "The keeper counted ships until the sea forgot him.",
     "A lighthouse was there."),
    ("Write a poem about rain.", "Rain stitched the roofs together, thread by grey thread.", "Rain is wet. It falls."),
    ("Describe a dragon.", "It slept on a hoard of library cards, each one overdue.", "The dragon was big."),
    ("A story in six words.", "Sold: map, never folded, still lost.", "Short story here."),
    ("Write about a clock.", "The clock ran backwards on Sundays, just to be heard.", "The clock ticked."),
    ("A letter to the moon.", "Dear Moon, the tides send their regards and an invoice.", "Hello moon."),
]


def make_tiny_encoder(path, words):
    """A 1-layer BERT over a word-level vocabulary ([PAD], [UNK], then `words`), saved with its tokenizer to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    return str(path)


def make_tiny_reward_model(path, policy):
    """A random 2-layer Llama sequence classifier (one label) with the tiny policy's tokenizer, saved to `path`."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from ddpo.models import load_tokenizer

    tokenizer = load_tokenizer(policy)
    config = LlamaConfig.from_pretrained(policy, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    """One line per row: a dict as JSON, a string as it is (to write broken lines)."""
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_pairs(path, rows=None, weights=True):
    """A pairs JSONL of the STORIES, with weights 0.5, 1.0, 1.5, ... when `weights`."""
    return write_jsonl(path, rows if rows is not None else [
        {"prompt": p, "chosen": c, "rejected": r, **({"weight": 0.5 * (i % 4 + 1)} if weights else {})}
        for i, (p, c, r) in enumerate(STORIES)
    ])
