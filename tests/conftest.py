"""Shared fixtures: tiny Llama models with a byte-level tokenizer, built from a config (no hub, no download).

Triton kernels run under TRITON_INTERPRET=1 on CPU; the variable must be set before triton is imported.
On a machine with CUDA it is left unset and the same kernel tests run on the GPU.
"""

import json
import os
import re
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddpo.train import parse_args, train  # noqa: E402

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


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class Hostile:
    """One hostile case of a command's table (tests/test_hostile_*.py): its setup builds files under `tmp` and
    returns the argv; `outcome` runs the command's main in this process (a file size limit: in a child process) and
    says what it did; the helpers make what needs root (a small disk, a read-only disk, an immutable file), undone
    when the test ends, and skip without root."""

    def __init__(self, tmp, request):
        self.tmp, self.request, self.fsize = tmp, request, None

    def root(self, what):
        if os.geteuid() != 0:
            pytest.skip(f"{what} needs root")

    def mount(self, path, options):
        """A fresh tmpfs at `path` (mount options, e.g. size=64k or ro), unmounted when the test ends."""
        import subprocess

        self.root("mount")
        os.makedirs(path, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        self.request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(path)], check=True))
        return str(path)

    def immutable(self, path):
        """chattr +i on `path` (nobody, root included, may change, replace or remove it), undone when the test ends."""
        import subprocess

        self.root("chattr +i")
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here")
        self.request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        return str(path)

    def limit_file_size(self, size):
        """Run the command in a child process whose files may not grow past `size` bytes (RLIMIT_FSIZE)."""
        self.fsize = size

    def files(self):
        """Every file under tmp with its bytes, and every entry's name (a leftover .tmp-* shows in them)."""
        found = {}
        for directory, dirs, names in os.walk(self.tmp):
            for name in dirs + names:
                path = os.path.join(directory, name)
                found[path] = read_bytes(path) if os.path.isfile(path) and not os.path.islink(path) else None
        return found

    def outcome(self, module, argv, capsys):
        """("ok" | "error" | "usage" | "traceback", message): exit 0, a one-line `error: ...` (exit 1), an argparse
        error (exit 2, its last line), or an uncaught exception (its type and first line)."""
        if self.fsize is not None:
            return self.child(module, argv)
        import importlib

        try:
            importlib.import_module(module).main(argv)
        except SystemExit as e:
            if isinstance(e.code, str):
                return "error", e.code
            return ("usage" if e.code == 2 else f"exit {e.code}"), capsys.readouterr().err.strip().splitlines()[-1]
        except Exception as e:
            return "traceback", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return "ok", ""

    def child(self, module, argv):
        import resource
        import subprocess
        import sys

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize, resource.RLIM_INFINITY))

        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=600,
                              preexec_fn=limit, cwd=self.tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        if "Traceback" in proc.stderr:
            return "traceback", last
        return {0: "ok", 1: "error", 2: "usage"}.get(proc.returncode, f"exit {proc.returncode}"), last


@pytest.fixture(scope="session")
def hostile_models(tmp_path_factory, tiny_model):
    """The tiny policy, and models that are wrong for it: an encoder, its own code, another vocabulary."""
    root = tmp_path_factory.mktemp("hostile-models")
    own_code = shutil.copytree(tiny_model, root / "own-code")
    config = json.loads((own_code / "config.json").read_text())
    config.update(model_type="mymodel", auto_map={"AutoModelForCausalLM": "modeling_mymodel.MyModelForCausalLM"})
    (own_code / "config.json").write_text(json.dumps(config))
    unknown = shutil.copytree(tiny_model, root / "unknown")
    (unknown / "config.json").write_text(json.dumps({**json.loads((unknown / "config.json").read_text()),
                                                     "model_type": "nosuchmodel"}))
    return {"tiny": tiny_model, "encoder": make_tiny_encoder(root / "encoder", ["the", "a"]),
            "own_code": str(own_code), "unknown": str(unknown),
            "vocab": make_tiny_model(root / "vocab", vocab_extra=8)}


def check_hostile(case, tmp_path, request, capsys, module, setup_args=(), **shared):
    """Run one row (name, setup, expected kind, regex) of a hostile table: the command gives the expected one line,
    leaves no temporary (.tmp-*) behind and changes no file that was there before it ran."""
    name, setup, kind, pattern = case
    h = Hostile(tmp_path, request)
    vars(h).update(shared)  # what the table's fixtures built once (a finished run, ...)
    argv = setup(h, *setup_args)
    before = {path: data for path, data in h.files().items() if data is not None}
    got, message = h.outcome(module, argv, capsys)
    assert (got, "\n" in message) == (kind, False), f"{name}: {got}: {message}"
    assert re.search(pattern, message), f"{name}: {message}"
    after = h.files()
    assert not [p for p in after if os.path.basename(p).startswith(".tmp-")], f"{name}: a temporary is left"
    assert {p: after.get(p) for p in before} == before, f"{name}: a file that was there changed"


# shared by the ddpo.train tests (test_train, test_checkpoints, test_logps, test_monitor, ...)
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "weights/mean", "weights/min", "weights/max"]


def run(tmp_path, tiny_model, *extra, name="run", data=None):
    out = str(tmp_path / name)
    data = data or write_pairs(tmp_path / "pairs.jsonl")
    cfg = parse_args(["--model", tiny_model, "--data", data, "--output-dir", out, "--lr", "1e-3", "--dtype", "float32",
                      *extra])  # fp32 unless a test says: --dtype auto is bf16 on CPUs with native bf16, and tests
    return cfg, train(cfg)  # here compare two paths to ~1e-5


def metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


FAMILY = ["ipo", "hinge", "robust", "cdpo", "rpo", "simpo", "sft"]  # beside dpo/ddpo and orpo/dorpo


def pool_pairs(path):
    """Three prompts with 3, 2 and 4 pairs over shared responses: pools of 4, 3 and 5 texts."""
    stories = {"sea": ["The sea kept our letters.", "Waves. Waves again!",
                       "A gull read the tide aloud, slowly, to no one.", "Salt; rope; a bell -- then nothing."],
               "clock": ["It ticked.", "The clock ran backwards on Sundays, just to be heard.",
                         "Tick? Tock? Who asks?"],
               "fox": ["The fox sat.", "A fox, a fence, a famine of hens.", "She said: 'run.' He did not.",
                       "Red fur in the snow, and the hunter looked away.", "Fox!"]}
    rows = []
    for prompt, texts in stories.items():
        for i in range(1, len(texts)):
            rows.append({"prompt": f"Write about a {prompt}.", "chosen": texts[i], "rejected": texts[i - 1]})
    return write_pairs(path, rows)


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


def strict_rows(path):
    """metrics.jsonl rows; NaN and Infinity (not JSON) fail."""
    def refuse(token):
        raise ValueError(f"{token} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]
