"""ddpo.train end to end on tiny models: metrics, each loss, exact accumulation, deviation weights, epochs, the
schedule, bad flags and input."""

import json
import math
import os
import re
import socket
import subprocess
import sys
import pytest
import torch
import torch.nn.functional as F
from conftest import write_pairs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import ddpo.train as train_mod
from ddpo.data import DataError, load_pairs, tokenize_pairs
from ddpo.losses import LOSSES
from ddpo.models import (load_model, load_tokenizer)
from ddpo.train import main, parse_args
from conftest import FAMILY, METRICS, run, metrics, no_model, strict_rows, pool_pairs


@pytest.mark.parametrize("name", FAMILY)
def test_each_loss_and_its_deviation_weighted_twin_train(tmp_path, tiny_model, capsys, name):
    """Two steps of <name> and of dd-<name> on weighted pairs: finite metrics; the twin reads the weights, the loss
    does not (and says that --deviation is ignored)."""
    plain, _ = run(tmp_path, tiny_model, "--loss", name, "--max-steps", "2", "--deviation", "style", name="plain")
    assert f"--deviation style is ignored: {name} takes no weights" in capsys.readouterr().out
    twin, path = run(tmp_path, tiny_model, "--loss", f"dd-{name}", "--max-steps", "2", "--label-smoothing", "0.2",
                     name="twin")
    for cfg, weighted in ((plain, False), (twin, True)):
        rows = metrics(cfg.output_dir)
        assert [r["step"] for r in rows] == [1, 2]
        assert all(math.isfinite(v) for r in rows for v in r.values()), rows
        assert ({r["weights/max"] for r in rows} != {1.0}) == weighted
        if name != "sft":
            assert all(key in rows[0] for key in METRICS)
        if LOSSES[name].reference:
            assert rows[0]["rewards/margins"] == 0.0  # policy == reference at step 1
    assert json.load(open(os.path.join(path, "train_config.json")))["label_smoothing"] == 0.2


def test_ddpo_with_unit_weights_equals_dpo(tmp_path, tiny_model):
    data = write_pairs(tmp_path / "unweighted.jsonl", weights=False)
    dpo, _ = run(tmp_path, tiny_model, "--loss", "dpo", "--max-steps", "2", name="dpo", data=data)
    ddpo, _ = run(tmp_path, tiny_model, "--loss", "ddpo", "--max-steps", "2", name="ddpo", data=data)
    for a, b in zip(metrics(dpo.output_dir), metrics(ddpo.output_dir)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize("loss", ["ddpo", "dorpo"])
def test_gradient_accumulation_is_exact(tmp_path, tiny_model, loss):
    one, a = run(tmp_path, tiny_model, "--loss", loss, "--max-steps", "1", "--batch-size", "4", name="one")
    acc, b = run(tmp_path, tiny_model, "--loss", loss, "--max-steps", "1", "--batch-size", "1", "--grad-accum", "4",
                 name="acc")
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert metrics(one.output_dir)[0][key] == pytest.approx(metrics(acc.output_dir)[0][key], rel=1e-5), key
    # Adam's first step is about lr * sign(grad): gradients within float noise of 0 may flip by up to 2 * lr
    wa, wb = AutoModelForCausalLM.from_pretrained(a).state_dict(), AutoModelForCausalLM.from_pretrained(b).state_dict()
    for key in wa:
        assert (wa[key] - wb[key]).abs().gt(1e-6).float().mean() < 1e-3, key


def test_bad_input_stops_before_anything_is_written(tmp_path, tiny_model, capsys):
    bad = write_pairs(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                               {"prompt": "p", "chosen": "c", "rejected": "r", "weight": float("nan")}])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--model", tiny_model, "--data", bad, "--output-dir", str(out)])
    assert f"{bad}:2: weight must be finite" in str(e.value)
    assert not out.exists()


def test_trl_conversations_with_an_implicit_prompt_and_a_weight_field_train(tmp_path, tiny_model):
    """TRL's conversational format (no 'prompt': chosen and rejected share their system and user turns) weighted by
    another field, 'score': the steps use those scores as weights, and resuming under another --weight-field is
    refused (it is other training)."""
    from conftest import STORIES

    system = {"role": "system", "content": "You write short fiction."}
    data = write_pairs(tmp_path / "trl.jsonl", [
        {"chosen": [system, {"role": "user", "content": p}, {"role": "assistant", "content": c}],
         "rejected": [system, {"role": "user", "content": p}, {"role": "assistant", "content": r}],
         "score": 0.5 * (i % 4 + 1)} for i, (p, c, r) in enumerate(STORIES)])
    cfg, _ = run(tmp_path, tiny_model, "--loss", "ddpo", "--weight-field", "score", "--max-steps", "2",
                 "--batch-size", str(len(STORIES)), data=data)
    rows = metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["rewards/margins"] == 0.0
    assert all((r["weights/min"], r["weights/max"]) == (0.5, 2.0) for r in rows)
    assert json.load(open(os.path.join(cfg.output_dir, "train_config.json")))["weight_field"] == "score"
    with pytest.raises(DataError, match="weight_field 'score' there, 'weight' now"):
        run(tmp_path, tiny_model, "--loss", "ddpo", "--max-steps", "3", "--batch-size", str(len(STORIES)), "--resume",
            data=data)


@pytest.mark.parametrize("loss", ["ddpo", "dd-ipo"])  # the fused kernel's loss; its weights times IPO's loss
def test_in_step_deviation_equals_prepared_weights(tmp_path, tiny_model, loss):
    import ddpo.prepare as prep

    data = pool_pairs(tmp_path / "pool_pairs.jsonl")
    weighted = str(tmp_path / "weighted.jsonl")
    prep.prepare(prep.parse_args(["--input", data, "--output", weighted, "--deviation", "style"]))
    common = ("--loss", loss, "--max-steps", "2", "--batch-size", "16")
    offline, _ = run(tmp_path, tiny_model, *common, name="offline", data=weighted)
    in_step, _ = run(tmp_path, tiny_model, *common, "--deviation", "style", "--kernels", "triton", name="in_step",
                     data=data)
    for a, b in zip(metrics(offline.output_dir), metrics(in_step.output_dir)):
        for key in ("loss", "weights/mean", "weights/min", "weights/max", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert metrics(in_step.output_dir)[0]["weights/max"] > 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_schedule_equals_hugging_face(schedule, warmup):
    """Warm-up starts at 0 (so --warmup-steps 1 is a real warm-up step), then decays as transformers' schedules."""
    from transformers import (
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    cfg = parse_args(["--data", "x", "--warmup-steps", str(warmup), "--schedule", schedule])
    hf = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[schedule]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = hf(opt, warmup, 10)
    ours = train_mod.lr_lambda(cfg, 10)
    for step in range(10):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12), step
    if warmup:
        assert ours(0) == 0.0


RAGGED = [1, 1, 3, 1, 3, 1, 1, 2, 3]  # pairs per prompt: prompt-grouped micro-batches pack differently every epoch


def ragged_pairs(path):
    rows, marks = [], [".", "!", "?", ";", "...", ","]
    for g, k in enumerate(RAGGED):
        texts = [f"Tale {g}{marks[j % 6]} " + "word " * (j + 1) + marks[(j + g) % 6] * (j % 3 + 1)
                 for j in range(k + 1)]
        rows += [{"prompt": f"Write tale {g}.", "chosen": texts[j + 1], "rejected": texts[j]} for j in range(k)]
    return write_pairs(path, rows)


def test_optimizer_steps_train_every_pair_once_per_epoch():
    from ddpo.data import optimizer_steps

    for per_step in (1, 2):
        plan = optimizer_steps(22, 4, per_step, seed=42, epochs=2)
        for epoch in (0, 1):
            steps = [batches for position, batches in plan if epoch < position <= epoch + 1]
            assert sorted(i for batches in steps for b in batches for i in b) == list(range(22))
        assert plan[-1][0] == 2.0
        assert plan[0][1] != plan[len(plan) // 2][1]  # each epoch in its own order
    assert len(optimizer_steps(22, 4, 1, seed=42, epochs=1.5)) == 6 + 3
    assert len(optimizer_steps(16, 4, 1, seed=0, max_steps=11)) == 11  # three epochs of 4 steps, cut at 11


def test_deviation_over_epochs_of_ragged_pools(tmp_path, tiny_model):
    """The audit's case: ragged pools, --batch-size 4 --seed 42 --epochs 2 raised IndexError at step 10."""
    from ddpo.data import optimizer_steps

    cfg, path = run(tmp_path, tiny_model, "--loss", "ddpo", "--deviation", "style", "--batch-size", "4", "--seed", "42",
                    "--epochs", "2", data=ragged_pairs(tmp_path / "ragged.jsonl"))
    rows = metrics(cfg.output_dir)
    assert len(rows) == len(optimizer_steps(sum(RAGGED), 4, 1, 42, 2))
    assert rows[-1]["epoch"] == 2.0 and path.endswith(f"checkpoint-{len(rows)}")


@pytest.mark.parametrize("loss", ["ddpo", "dorpo"])
def test_in_step_accumulation_is_exact(tmp_path, tiny_model, loss):
    """One step over 3 prompts (3, 2 and 4 pairs) as one micro-batch or as three: the same loss and gradient.
    DORPO (released) takes the mean weight of the whole step, also when weights are computed in-step."""
    data = pool_pairs(tmp_path / "pool_pairs.jsonl")
    common = ("--loss", loss, "--deviation", "style", "--max-steps", "1", "--kernels", "triton")
    one, _ = run(tmp_path, tiny_model, *common, "--batch-size", "16", name="one", data=data)
    acc, _ = run(tmp_path, tiny_model, *common, "--batch-size", "4", "--grad-accum", "3", name="acc", data=data)
    a, b = metrics(one.output_dir)[0], metrics(acc.output_dir)[0]
    for key in ("loss", "grad_norm", "weights/mean", "weights/max"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_sft_is_the_mean_token_nll_of_the_chosen_responses(tmp_path, tiny_model):
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model)
    pairs = load_pairs(write_pairs(tmp_path / "pairs.jsonl"))
    tokenize_pairs(pairs, tok)
    nll = []
    for p in pairs:  # from the full logits of each chosen sequence, one at a time
        ids = torch.tensor([p.prompt_ids + p.chosen_ids])
        logits = model(input_ids=ids).logits[0, len(p.prompt_ids) - 1:-1]
        nll.append(F.cross_entropy(logits, torch.tensor(p.chosen_ids)).item())
    cfg, _ = run(tmp_path, tiny_model, "--loss", "sft", "--max-steps", "4", "--batch-size", "6")
    rows = metrics(cfg.output_dir)
    assert rows[0]["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert rows[0]["logps/chosen"] == pytest.approx(-rows[0]["loss"], rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] and "rewards/margins" not in rows[0]


BAD_FLAGS = [("--max-grad-norm", "-1"), ("--beta", "0"), ("--beta", "-0.1"), ("--beta", "inf"), ("--beta", "nan"),
             ("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--max-steps", "-1"), ("--epochs", "0"),
             ("--epochs", "inf"), ("--epochs", "nan"), ("--batch-size", "0"), ("--grad-accum", "0"),
             ("--log-every", "0"), ("--save-every", "-1"), ("--warmup-steps", "-1"), ("--lora-r", "-1"),
             ("--lora-alpha", "0"), ("--lora-dropout", "1"), ("--lora-dropout", "-0.1"), ("--orpo-lambda", "-1"),
             ("--orpo-lambda", "nan"), ("--min-weight", "-1"), ("--min-weight", "inf"), ("--weight-decay", "-1"),
             ("--max-length", "-2"), ("--max-prompt-length", "-2"), ("--keep-checkpoints", "-1"), ("--seed", "-1"),
             ("--device", "cuda:99"), ("--device", "nonsense"), ("--device", "meta"), ("--kernels", "triton"),
             ("--label-smoothing", "0.5"), ("--label-smoothing", "-0.1"), ("--simpo-gamma", "-1"),
             ("--simpo-gamma", "inf"), ("--rpo-alpha", "-1"), ("--rpo-alpha", "nan")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_bad_flags_are_refused_at_parse_time(tmp_path, tiny_model, monkeypatch, capsys, flag, value):
    """Each numeric flag out of range, a device that is not there, Triton on the CPU without its interpreter."""
    monkeypatch.setattr(train_mod, "load_tokenizer", no_model)
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read when --kernels triton is parsed
    with pytest.raises(SystemExit) as e:
        main(["--model", tiny_model, "--data", write_pairs(tmp_path / "pairs.jsonl"), "--output-dir",
              str(tmp_path / "out"), "--device", "cpu", flag, value])
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def live_pid():
    """The pid of a running process other than this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


GOOD_PAIRS = '{"prompt": "p", "chosen": "c", "rejected": "r"}\n'


BAD_INPUTS = [  # files under tmp_path (pairs.jsonl is --data, out the --output-dir), extra flags, the error
    pytest.param({}, ["--model", "./no/such/model"], r"--model ./no/such/model: no such directory", id="missing model"),
    pytest.param({}, ["--ref-model", "{tmp}/ref"], r"--ref-model .*/ref: no such directory", id="missing ref model"),
    pytest.param({"m/notes.txt": ""}, ["--model", "{tmp}/m"], r"--model .*/m: not a model directory \(no config.json\)",
                 id="model directory without config"),
    pytest.param({}, ["--model", "packaged:nope"], r"--model packaged:nope: unknown packaged model",
                 id="unknown packaged"),
    pytest.param({}, ["--deviation", "semantic", "--semantic-embedder", "./no/such/embedder"],
                 r"--semantic-embedder ./no/such/embedder: no such directory", id="missing embedder"),
    pytest.param({"f": ""}, ["--output-dir", "{tmp}/f"], r"--output-dir .*/f: .*/f is not a directory",
                 id="output dir is a file"),
    pytest.param({"f": ""}, ["--output-dir", "{tmp}/f/out"], r"--output-dir .*/f/out: .*/f is not a directory",
                 id="output dir inside a file"),
    pytest.param({"pairs.jsonl": GOOD_PAIRS.encode() + b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n'}, [],
                 r"^error: .*pairs.jsonl:2: invalid UTF-8", id="invalid utf-8"),
    pytest.param({"out/.lock": "{pid} {host}\n"}, [], r"--output-dir .*/out: in use by pid \d+ on .*/out/.lock\)",
                 id="output dir locked by a live run"),
    pytest.param({"out/.lock": "12 elsewhere\n"}, [], r"in use by pid 12 on elsewhere", id="locked from another host"),
    pytest.param({"out/metrics.jsonl": "my notes\n"}, [], r"holds a metrics.jsonl that ddpo.train did not write",
                 id="a foreign metrics.jsonl"),
    pytest.param({"out/metrics.jsonl": "my notes\n", "out/train_config.json": '{"loss": "x"}'}, [],
                 r"holds a metrics.jsonl that ddpo.train did not write", id="a foreign metrics.jsonl and config"),
]


@pytest.mark.parametrize("files, flags, error", BAD_INPUTS)
def test_bad_input_is_refused_before_a_model_loads(tmp_path, tiny_model, monkeypatch, live_pid, files, flags, error):
    monkeypatch.setattr(train_mod, "load_tokenizer", no_model)
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    files = {"pairs.jsonl": GOOD_PAIRS, **files}
    for name, content in files.items():
        if isinstance(content, str):
            content = content.replace("{pid}", str(live_pid)).replace("{host}", socket.gethostname()).encode()
        files[name] = content
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(files[name])
    argv = ["--model", tiny_model, "--data", str(tmp_path / "pairs.jsonl"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv + [f.format(tmp=tmp_path) for f in flags])
    assert re.search(error, str(e.value.code)) and "\n" not in str(e.value.code), e.value.code
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)
    for name, content in files.items():  # nothing written, nothing rewritten
        assert (tmp_path / name).read_bytes() == content


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_is_refused_before_a_model_loads(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(train_mod, "load_policy", no_model)
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="ro is not writable"):
        main(["--model", tiny_model, "--data", write_pairs(tmp_path / "p.jsonl"),
              "--output-dir", str(tmp_path / "ro" / "o")])


def certain_model(path):
    """A plain-text model certain of its EOS everywhere: a huge constant direction in the residual stream, read only
    by the EOS row of the output layer (log-prob 0 for EOS, about -1e5 for any other token)."""
    from conftest import make_tiny_model

    make_tiny_model(path, chat_template=False)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), load_tokenizer(str(path))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 1e4
    model.save_pretrained(path)
    return str(path), tokenizer.eos_token


@pytest.mark.parametrize("loss", ["orpo", "dorpo"])
def test_orpo_on_a_response_the_model_is_certain_of_stays_finite(tmp_path, loss):
    """Mean log-prob 0 (P = 1, odds infinite): log1mexp caps it, so the log-odds and every gradient stay finite."""
    model, eos = certain_model(tmp_path / "certain")
    data = write_pairs(tmp_path / "pairs.jsonl", [{"prompt": "Say it.", "chosen": eos, "rejected": "no", "weight": 2.0},
                                                  {"prompt": "Again.", "chosen": eos, "rejected": "nope"}])
    cfg, path = run(tmp_path, model, "--loss", loss, "--max-steps", "2", data=data)
    rows = strict_rows(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert rows[0]["logps/chosen"] == 0.0 and rows[0]["rewards/margins"] > 0 and len(rows) == 2
    assert all(w.isfinite().all() for w in load_file(os.path.join(path, "model.safetensors")).values())


def test_an_unreachable_hub_name_is_one_line(tmp_path, monkeypatch):
    """A hub name that is not in the local cache while the hub cannot be reached: one line, nothing written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--data", write_pairs(tmp_path / "p.jsonl"), "--model", "someorg/no-such-model",
              "--output-dir", str(out)])
    assert str(e.value).startswith("error: someorg/no-such-model: cannot load it") and "\n" not in str(e.value)
    assert not out.exists()


def test_a_fractional_last_epoch_is_cut_exactly_and_positioned_in_its_epoch():
    from ddpo.data import optimizer_steps

    plan = optimizer_steps(40, 4, 1, seed=0, epochs=1.1)  # 10 steps an epoch: 10 + 1, not 10 + 2
    assert len(plan) == 11 and plan[-1][0] == pytest.approx(1.1)
    plan = optimizer_steps(40, 4, 1, seed=0, epochs=0.5)
    assert len(plan) == 5 and plan[-1][0] == pytest.approx(0.5)


def test_in_step_weights_equal_prepared_ones_from_pools_with_unpaired_responses(tmp_path, tiny_model):
    """prepare from pools (a fifth response in no pair, standardised with the others by the stylometric embedder if
    it embedded every response) and the in-step kernel over the pairs file it writes: one set of weights."""
    import ddpo.prepare as prep

    texts = ["The sea kept our letters.", "Waves. Waves again!", "A gull read the tide aloud, slowly, to no one.",
             "Salt; rope; a bell -- then nothing.", "Quiet harbour, quiet boats, and one lamp left on all night long."]
    rows = [{"prompt": f"Write about {p}.", "response": f"{t} ({p})" if k else t, "score": s}
            for k, p in enumerate(["the sea", "a port"]) for t, s in zip(texts, [1, 9, 4, 7, 2])]
    pools = write_pairs(tmp_path / "pools.jsonl", rows)
    weighted = str(tmp_path / "weighted.jsonl")
    prep.prepare(prep.parse_args(["--input", pools, "--output", weighted, "--deviation", "style", "--gap", "3"]))
    assert {json.loads(line)["meta"]["group_size"] for line in open(weighted)} == {4}  # one response left out
    common = ("--loss", "ddpo", "--max-steps", "1", "--batch-size", "16", "--kernels", "triton")
    offline, _ = run(tmp_path, tiny_model, *common, name="offline", data=weighted)
    in_step, _ = run(tmp_path, tiny_model, *common, "--deviation", "style", name="in_step", data=weighted)
    a, b = metrics(offline.output_dir)[0], metrics(in_step.output_dir)[0]
    for key in ("loss", "weights/mean", "weights/min", "weights/max"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("line, error", [
    ("[" * 100000 + "]" * 100000, "JSON nested too deeply"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "weight": 1' + "0" * 400 + "}", "must be finite"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "weight": 1' + "0" * 5000 + "}", "malformed JSON"),
])
def test_hostile_json_is_a_file_line_error(tmp_path, line, error):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_PAIRS + line + "\n")
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: .*{error}"):
        load_pairs(str(path))


def test_a_text_over_the_size_ddpo_reads_is_a_file_line_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_PAIRS + json.dumps({"prompt": "p", "chosen": "c" * 4_000_001, "rejected": "r"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'chosen' has 4,000,001 characters, over the 4,000,000"):
        load_pairs(str(path))
