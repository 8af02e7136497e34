"""Hostile input to ddpo.train, one row a case (issue 29): each ends in one line naming the file or flag, before any
model loads where the files tell, leaves no temporary and changes no file that was there. Every row failed on the
code of 2026-12-07 (17a792b): a traceback, or a run that went on."""

import os
import shutil

import pytest
import torch
from conftest import check_hostile, write_pairs

from ddpo import train

torch.set_num_threads(1)  # tiny models: more threads only contend on a shared machine

BASE = ["--max-steps", "1", "--batch-size", "2", "--dtype", "float32", "--loss", "dpo"]


def argv(h, m, *extra, out="out", data=None):
    data = data or write_pairs(h.tmp / "pairs.jsonl")
    return ["--data", data, "--model", m["tiny"], "--output-dir", str(h.tmp / out) if out else "", *BASE, *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, hostile_models):
    """A finished run (checkpoint-1), and the reference cache of one with --precompute-ref: cases copy them."""
    root = tmp_path_factory.mktemp("hostile-finished")
    os.environ["DDPO_CACHE"] = str(root / "cache")
    try:
        for name, extra in (("out", ()), ("cached", ("--precompute-ref",))):
            train.main(["--data", write_pairs(root / "pairs.jsonl"), "--model", hostile_models["tiny"], "--output-dir",
                        str(root / name), *BASE, *extra])
    finally:
        del os.environ["DDPO_CACHE"]
    return root


def trained(h):
    """A copy of the finished run's output directory in this case's tmp; returns its path."""
    return shutil.copytree(h.finished / "out", h.tmp / "out")


def cache_in(h, directory):
    os.environ["DDPO_CACHE"] = directory
    h.request.addfinalizer(lambda: os.environ.pop("DDPO_CACHE"))


def data_dir_with(kind):
    def setup(h, m):
        d = h.tmp / "data"
        d.mkdir()
        write_pairs(d / "a.jsonl")
        (d / "b.jsonl").mkdir() if kind == "directory" else os.symlink(h.tmp / "gone", d / "b.jsonl")
        return argv(h, m, data=str(d))
    return setup


def tamper(change):
    """The finished run, tampered with by `change(h, out)`, resumed for one more step."""
    def setup(h, m):
        change(h, trained(h))
        return [*argv(h, m), "--resume", "--max-steps", "2"]
    return setup


def truncate(name):
    def change(h, out):
        path = out / "checkpoint-1" / name
        path.write_bytes(path.read_bytes()[:100])
    return change


def state_step_text(h, out):
    path = out / "checkpoint-1" / "trainer_state.pt"
    torch.save({**torch.load(path, weights_only=True), "step": "1"}, path)


def checkpoint_entry(kind):
    def change(h, out):
        if kind == "file":  # older than checkpoint-1: pruned after the step (keep 2)
            (out / "checkpoint-0").write_text("not a checkpoint")
        elif kind == "link":
            os.symlink(h.tmp / "elsewhere", out / "checkpoint-0")
        else:
            shutil.copytree(out / "checkpoint-1", out / "checkpoint-²")
    return change


def reference_cache(kind):
    """--precompute-ref finds its cache truncated or of another shape."""
    def setup(h, m):
        cache = shutil.copytree(h.finished / "cache", h.tmp / "cache")
        cache_in(h, str(cache))
        (path,) = (cache / "ref_logps").iterdir()
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:50])
        else:
            torch.save(torch.zeros(3, 2), path)
        return argv(h, m, "--precompute-ref")
    return setup


def cache_immutable(h, m):
    cache_in(h, str(h.tmp / "cache"))
    os.makedirs(h.tmp / "cache" / "ref_logps")
    h.immutable(h.tmp / "cache" / "ref_logps")
    return argv(h, m, "--precompute-ref")


def full_disk(h, m):
    h.mount(h.tmp / "disk", "size=300k")  # room for the metrics, not for a checkpoint
    return argv(h, m, out="disk/out")


def file_size_limit(h, m):
    h.limit_file_size(60_000)  # the model's safetensors are about 120 kB
    return argv(h, m)


def immutable_metrics(h, m):
    out = trained(h)
    h.immutable(out / "metrics.jsonl")
    return [*argv(h, m), "--resume", "--max-steps", "2"]


def symlink_loop(h, m):
    os.symlink(h.tmp / "loop-b", h.tmp / "loop-a")
    os.symlink(h.tmp / "loop-a", h.tmp / "loop-b")
    return argv(h, m, out="loop-a/out")


CASES = [  # name, setup -> argv, expected outcome, its message
    # readers
    ("data dir: a subdirectory named *.jsonl", data_dir_with("directory"), "error", r"b\.jsonl: is a directory, not a"),
    ("data dir: a dangling link named *.jsonl", data_dir_with("link"), "error", r"b\.jsonl: is a broken link"),
    # flags and models found wrong only after loading
    ("--lora-targets naming nothing", lambda h, m: argv(h, m, "--lora-r", "2", "--lora-targets", "nothing"),
     "error", r"--lora-targets nothing: no nn\.Linear"),
    ("--lora-targets lm_head", lambda h, m: argv(h, m, "--lora-r", "2", "--lora-targets", "lm_head"),
     "error", r"--lora-targets lm_head: names the output layer"),
    ("an encoder as --model", lambda h, m: argv(h, m, "--model", m["encoder"]), "error",
     r"--model .*encoder: not a causal language model \(model type bert, BertModel\)"),
    ("an unknown model type", lambda h, m: argv(h, m, "--model", m["unknown"]), "error",
     r"model type 'nosuchmodel' is unknown"),
    ("a model shipping its own code", lambda h, m: argv(h, m, "--model", m["own_code"]), "error",
     r"--model .*own-code: the model ships its own code"),
    ("--ref-model with another vocabulary", lambda h, m: argv(h, m, "--ref-model", m["vocab"]), "error",
     r"--ref-model .*vocab: a vocabulary of 267 tokens, the model's has 259"),
    # output paths
    ("--output-dir empty", lambda h, m: argv(h, m, out=""), "error", r"--output-dir: an empty path"),
    ("--output-dir through a symlink loop", symlink_loop, "error", r"loop-a is a broken link or a link loop"),
    ("--output-dir name too long", lambda h, m: argv(h, m, out="x" * 300), "error", r"x{300}.*File name too long"),
    # disk full, file size limits, immutable files
    ("disk full at the checkpoint", full_disk, "error", r"disk/out/checkpoint-1: cannot write it \(No space left"),
    ("file size limit at the checkpoint", file_size_limit, "error", r"checkpoint-1: cannot write it \(File too large"),
    ("immutable metrics.jsonl on resume", immutable_metrics, "error", r"metrics\.jsonl: cannot write it \(Operation "
     r"not permitted"),
    ("immutable reference cache directory", cache_immutable, "error", r"ref_logps/\w+\.pt: cannot write it"),
    # tampered checkpoints and caches
    ("truncated model.safetensors", tamper(truncate("model.safetensors")), "error",
     r"checkpoint-1.*cannot load it"),
    ("trainer_state.pt of wrong types", tamper(state_step_text), "error",
     r"trainer_state\.pt: not a trainer state of ddpo\.train"),
    ("checkpoint-² (a non-ASCII digit)", tamper(checkpoint_entry("digit")), "error",
     r"checkpoint-²: not a checkpoint name"),
    ("a checkpoint entry that is a file", tamper(checkpoint_entry("file")), "error",
     r"checkpoint-0: is a file, and ddpo\.train writes checkpoints as directories"),
    ("a checkpoint entry that is a link", tamper(checkpoint_entry("link")), "error", r"checkpoint-0: is a link"),
    ("a truncated reference cache", reference_cache("truncated"), "error",
     r"\.pt: not a reference cache of these 6 pairs"),
    ("a reference cache of another shape", reference_cache("shape"), "error",
     r"\.pt: not a reference cache of these 6 pairs"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_train(case, tmp_path, request, capsys, hostile_models, finished):
    check_hostile(case, tmp_path, request, capsys, "ddpo.train", (hostile_models,), finished=finished)
