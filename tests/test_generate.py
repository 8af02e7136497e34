"""ddpo.generate: sampling processors, conformative mixing, w = 0 equals plain sampling, resume, bad input."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, read_jsonl, write_jsonl

from ddpo import generate
from ddpo.generate import Sampling, candidates, main, next_token_probs, penalise
from ddpo.models import autocast_dtype, cached_attention, load_model, load_tokenizer, use_segment_attention


def test_repetition_penalty_follows_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert penalise(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def dense(ids, values, V):
    """Candidates' values (B, k) at their token ids in a (B, V) tensor, 0 elsewhere."""
    return torch.zeros(ids.shape[0], V, dtype=values.dtype).scatter(1, ids, values)


def truncation_mask(logits, s):
    """The truncation set (B, V) of candidates()."""
    ids, keep = candidates(logits, s)
    return dense(ids, keep, logits.shape[-1])


def probs(instruct, base, seen, s, w):
    """next_token_probs as a (B, V) distribution."""
    ids, p = next_token_probs(instruct, base, seen, s, w)
    return dense(ids, p, instruct.shape[-1])


def reference_probs(instruct, base, seen, s, w):
    """The rule over the whole vocabulary, sorted in full (the sampler before it kept to the top-k candidates)."""
    li = penalise(instruct, seen, s.repetition_penalty) / s.temperature
    keep = torch.ones_like(li, dtype=torch.bool)
    if s.top_k:
        keep &= li >= li.topk(s.top_k, dim=-1).values[:, -1:]
    if s.top_p < 1.0:
        p = torch.softmax(li.masked_fill(~keep, float("-inf")), dim=-1)
        sorted_p, order = p.sort(dim=-1, descending=True)
        keep &= torch.zeros_like(keep).scatter(-1, order, sorted_p.cumsum(-1) - sorted_p < s.top_p)
    if s.min_p > 0.0:
        p = torch.softmax(li.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= p >= s.min_p * p.max(dim=-1, keepdim=True).values
    p = torch.softmax(li, dim=-1)
    if base is not None:
        p = (1 - w) * p + w * torch.softmax(penalise(base, seen, s.repetition_penalty) / s.temperature, dim=-1)
    p = p * keep
    return p / p.sum(-1, keepdim=True)


def test_truncation_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert truncation_mask(logits, Sampling(top_k=2, top_p=1.0)).tolist() == [[True, True, False, False]]
    # top-p 0.8: 0.5 (mass above 0), 0.3 (0.5 above) kept, 0.15 (0.8 above) dropped
    assert truncation_mask(logits, Sampling(top_k=0, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert truncation_mask(logits, Sampling(top_k=0, top_p=0.81)).tolist() == [[True, True, True, False]]
    # min-p 0.25: keep p >= 0.125
    assert truncation_mask(logits, Sampling(top_k=0, top_p=1.0, min_p=0.25)).tolist() == [[True, True, True, False]]
    # top-p on the top-3's renormalised distribution (0.526, 0.316, 0.158): 0.8 keeps two, 0.85 three
    assert truncation_mask(logits, Sampling(top_k=3, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert truncation_mask(logits, Sampling(top_k=3, top_p=0.85)).tolist() == [[True, True, True, False]]


def test_top_k_keeps_ties_with_the_kth_logit():
    """As Hugging Face's top-k: a token tied with the k-th logit is in the set (bf16 logits tie often)."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0], [3.0, 2.5, 2.0, 1.0, 0.0]])
    assert truncation_mask(logits, Sampling(top_k=2, top_p=1.0)).tolist() == [[True, True, True, True, False],
                                                                                [True, True, False, False, False]]


def test_top_k_on_bf16_logits_equals_hf_top_k():
    """bf16-rounded logits of a 49k vocabulary tie at the 50th at most positions: the set and the distribution
    equal transformers' TopKLogitsWarper then TopPLogitsWarper."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = (torch.randn(64, 49152) * 3).bfloat16().float()
    s = Sampling(top_k=50, top_p=0.95, repetition_penalty=1.0, temperature=1.0)
    ties = ((logits == logits.topk(50, dim=-1).values[:, -1:]).sum(-1) > 1).sum().item()
    assert ties > 32  # the case is real: most rows tie at the 50th logit
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for top_p in (1.0, 0.95):
        s = Sampling(top_k=50, top_p=top_p, repetition_penalty=1.0, temperature=1.0)
        hf = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(50)(None, logits.clone()))
        hf = torch.softmax(hf, dim=-1)
        ours = dense(*next_token_probs(logits, None, seen, s, 0.0), logits.shape[-1])
        if top_p == 1.0:
            torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-5)
        else:  # top-p cuts between tokens of equal probability in either order: compare the sorted distributions
            torch.testing.assert_close(ours.sort(-1).values, hf.sort(-1).values, atol=1e-6, rtol=1e-5)


def test_conformative_mixing_by_hand():
    instruct = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0001]]))
    base = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    s = Sampling(top_k=2, top_p=1.0, repetition_penalty=1.0, temperature=1.0)
    seen = torch.zeros(1, 4, dtype=torch.bool)
    p = probs(instruct, base, seen, s, w=0.5)
    # mix = 0.5 * instruct + 0.5 * base on the instruct top-2 {0, 1}: 0.35, 0.25 -> renormalised 7/12, 5/12
    torch.testing.assert_close(p, torch.tensor([[7 / 12, 5 / 12, 0.0, 0.0]]), atol=1e-4, rtol=1e-4)
    assert probs(instruct, base, seen, s, w=1.0)[0, 3] == 0  # the base alone never leaves the set


@pytest.mark.parametrize("top_k, top_p, min_p", [(20, 0.9, 0.05), (0, 0.9, 0.0), (50, 1.0, 0.0), (7, 0.5, 0.3)])
def test_candidate_sampling_equals_the_rule_over_the_whole_vocabulary(top_k, top_p, min_p):
    """The distribution over the top-k candidates equals the rule computed over all V tokens, for plain and
    conformative sampling (continuous random logits: no ties at the k-th)."""
    g = torch.Generator().manual_seed(0)
    instruct, base = torch.randn(5, 300, generator=g) * 3, torch.randn(5, 300, generator=g) * 3
    seen = torch.rand(5, 300, generator=g) < 0.1
    s = Sampling(top_k=top_k, top_p=top_p, min_p=min_p, temperature=0.8)
    for w, other in ((0.0, None), (0.3, base), (1.0, base)):
        p = probs(instruct, other, seen, s, w)
        torch.testing.assert_close(p, reference_probs(instruct, other, seen, s, w), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p.sum(-1), torch.ones(5))


PROMPTS = [{"prompt": "Tell a tale."}, {"prompt": "A poem, please."},
           {"prompt": [{"role": "user", "content": "Why?"}], "id": "q"}]


@pytest.mark.parametrize("Tq", [1, 3])
def test_cached_attention_equals_masked_sdpa(Tq):
    """The last Tq queries against a KV cache of Tk keys with left padding, grouped query heads: sdpa with the
    bottom-right causal mask and the key mask, materialised."""
    B, H, KV, Tk, D = 3, 6, 2, 9, 8
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, Tq, D), torch.randn(B, KV, Tk, D), torch.randn(B, KV, Tk, D)
    keys = torch.ones(B, Tk, dtype=torch.long)
    keys[1, :2], keys[2, :5] = 0, 0  # left padding
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) & keys[:, None, None, :].bool()  # (B, 1, Tq, Tk)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(cached_attention(q, k, v, keys), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached_attention(q, k, v, None, scaling=0.3),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:1], scale=0.3,
                                                              enable_gqa=True).transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_segment_attention_decodes_as_sdpa(tiny_model):
    """Prefill of left-padded prompts and cached decoding under segment attention give sdpa's logits at every step,
    and the same samples."""
    tokenizer = load_tokenizer(tiny_model)
    rows = [generate.render_prompt(tokenizer, p["prompt"]) for p in PROMPTS]
    assert len({len(r) for r in rows}) == len(rows)  # padded prompts
    sdpa, segments = load_model(tiny_model).eval(), load_model(tiny_model).eval()
    assert use_segment_attention(segments)
    streams = [generate.Stream(m, rows, tokenizer.pad_token_id) for m in (sdpa, segments)]
    logits = [stream.prefill(2) for stream in streams]
    for step in range(6):
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5, msg=f"step {step}")
        token = logits[0].argmax(-1)
        logits = [stream.step(token) for stream in streams]
    s = Sampling(n=3, max_new_tokens=10)
    texts = [generate.generate_batch(m, tokenizer, rows, s, torch.Generator().manual_seed(0)) for m in (sdpa, segments)]
    assert texts[0] == texts[1]


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


def cut(full, part, lines, torn):
    """part = the first `lines` lines of full and `torn` characters of the next, as a kill -9 mid-write leaves it."""
    rows = full.read_text().splitlines(keepends=True)
    part.write_text("".join(rows[:lines]) + rows[lines][:torn] if torn else "".join(rows[:lines]))
    shutil.copy(str(full) + ".meta.json", str(part) + ".meta.json")


@pytest.mark.parametrize("batch_prompts, lines, torn", [
    (1, 2, 10),  # batch 0 done, batch 1 torn in its first line
    (3, 3, 10),  # one batch of 6 lines: 3 written, the 4th torn
    (3, 1, 0),   # 1 line written, no torn line
    (3, 5, -1),  # all but the last newline written
])
def test_resume_writes_exactly_the_missing_samples(tmp_path, tiny_model, batch_prompts, lines, torn):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = ["--model", tiny_model, "--prompts", prompts, "--max-new-tokens", "8", "--n", "2",
              "--batch-prompts", str(batch_prompts)]
    main(common + ["--output", str(tmp_path / "full.jsonl")])
    cut(tmp_path / "full.jsonl", tmp_path / "part.jsonl", lines, torn)
    moved = shutil.copy(prompts, str(tmp_path / "moved.jsonl"))  # the prompts file may move
    main(common + ["--prompts", moved, "--output", str(tmp_path / "part.jsonl")])
    assert (tmp_path / "part.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_resume_keeps_the_outputs_batches_and_refuses_to_finish_an_older_samplers_output(tmp_path, tiny_model):
    """Without --batch-prompts a resumed output keeps its own batches (so its seeds), not today's default; an output of
    the sampler before 2026-11-23 (no 'sampler' in its settings file) is accepted when complete, refused when not."""
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out, meta = tmp_path / "s.jsonl", tmp_path / "s.jsonl.meta.json"
    common = ["--model", tiny_model, "--prompts", prompts, "--max-new-tokens", "6", "--n", "2", "--output", str(out)]
    main(common + ["--batch-prompts", "2"])
    full = out.read_text()
    out.write_text("".join(full.splitlines(keepends=True)[:3]))  # interrupted in batch 1
    main(common)
    assert out.read_text() == full
    settings = json.loads(meta.read_text())
    del settings["sampler"]
    meta.write_text(json.dumps(settings))
    main(common)  # complete: nothing is drawn
    assert out.read_text() == full
    out.write_text("".join(full.splitlines(keepends=True)[:3]))
    with pytest.raises(SystemExit, match=r"s.jsonl: written by an earlier version of the sampler \(sampler 1, now 4\)"):
        main(common)


def test_outputs_written_before_the_dtype_setting_were_float32(tmp_path, tiny_model):
    """An output from before --dtype (no 'dtype' in its settings file or lines) is read as float32: a rerun with
    --dtype float32 finishes it, one with bfloat16 is refused, naming the setting."""
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out, meta = tmp_path / "s.jsonl", tmp_path / "s.jsonl.meta.json"
    common = ["--model", tiny_model, "--prompts", prompts, "--max-new-tokens", "6", "--n", "2", "--output", str(out)]
    main(common + ["--dtype", "float32"])
    full = out.read_text()
    settings = json.loads(meta.read_text())
    del settings["dtype"]
    meta.write_text(json.dumps(settings))
    lines = [json.loads(line) for line in full.splitlines()]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "dtype"}) + "\n" for r in lines[:3]))
    with pytest.raises(SystemExit, match=r"s.jsonl: holds samples with other settings: dtype: 'float32' there, "
                                         r"'bfloat16' now; choose another --output \(or --dtype float32 to go on"):
        main(common + ["--dtype", "bfloat16"])
    main(common + ["--dtype", "float32"])
    done = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in done] == [r["response"] for r in lines] and len(done) == len(PROMPTS) * 2


@pytest.mark.parametrize("flags, differing", [
    (["--n", "3"], "n"), (["--seed", "1"], "seed"), (["--top-p", "0.9"], "top_p"),
    (["--batch-prompts", "1"], "batch_prompts"), (["--model", "OTHER"], "model"),
    (["--prompts", "EDITED"], "prompts_sha256"), (["--dtype", "NOT_AUTO"], "dtype"),
])
def test_rerun_with_other_settings_is_refused(tmp_path, tiny_model, flags, differing):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    output = tmp_path / "o.jsonl"
    common = ["--model", tiny_model, "--prompts", prompts, "--output", str(output), "--max-new-tokens", "4", "--n", "2"]
    main(common)
    before = output.read_bytes()
    other = {"OTHER": lambda: make_tiny_model(tmp_path / "other", seed=1),
             "EDITED": lambda: write_jsonl(tmp_path / "edited.jsonl",
                                           PROMPTS[:2] + [{"prompt": "Why not?", "id": "q"}]),
             "NOT_AUTO": lambda: "float32" if autocast_dtype("auto", torch.device("cpu")) else "bfloat16"}
    flags = [other[f]() if f in other else f for f in flags]
    with pytest.raises(SystemExit, match=f"o.jsonl: holds samples with other settings: {differing}: "):
        main(common + flags)
    assert output.read_bytes() == before


@pytest.mark.parametrize("extra, error", [
    ('{"note": "mine"}\n', "o.jsonl:7: not a sample"),
    ("FIRST", "o.jsonl:7: sample 0 of prompt '0' is already on line 1"),
    ('not json\n', "o.jsonl:7: not a sample"),
])
def test_our_output_with_foreign_lines_is_refused(tmp_path, tiny_model, extra, error):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    output = tmp_path / "o.jsonl"
    common = ["--model", tiny_model, "--prompts", prompts, "--output", str(output), "--max-new-tokens", "4", "--n", "2"]
    main(common)
    with open(output, "a") as f:
        f.write(output.read_text().splitlines(keepends=True)[0] if extra == "FIRST" else extra)
    before = output.read_bytes()
    with pytest.raises(SystemExit, match=error):
        main(common)
    assert output.read_bytes() == before


def test_long_prompts_keep_their_end(tmp_path, tiny_model, monkeypatch, capsys):
    rows = []

    class Recording(generate.Stream):
        def __init__(self, model, prompt_rows, pad_id):
            rows.extend(prompt_rows)
            super().__init__(model, prompt_rows, pad_id)

    monkeypatch.setattr(generate, "Stream", Recording)
    long = "a story " * 100 + "THE END"  # 800 bytes: over 512 - 8 tokens of the tiny model
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": long}, {"prompt": "short"}])
    common = ["--model", tiny_model, "--prompts", prompts, "--n", "1"]
    main(common + ["--max-new-tokens", "8", "--output", str(tmp_path / "o.jsonl")])
    assert "1 of 2 prompts are longer than 504 tokens" in capsys.readouterr().out
    tokenizer = generate.load_tokenizer(tiny_model)
    assert rows[0] == generate.render_prompt(tokenizer, long)[-504:] and len(read_jsonl(tmp_path / "o.jsonl")) == 2
    with pytest.raises(SystemExit, match="--max-new-tokens 512 leaves no room for a prompt in a context of 512"):
        main(common + ["--max-new-tokens", "512", "--output", str(tmp_path / "none.jsonl")])
    assert not os.path.exists(tmp_path / "none.jsonl.meta.json")


BAD_FLAGS = [("--n", "0"), ("--temperature", "0"), ("--temperature", "-1"), ("--temperature", "nan"),
             ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-k", "-1"), ("--min-p", "-0.1"),
             ("--min-p", "1.5"), ("--min-p", "nan"), ("--repetition-penalty", "0"), ("--repetition-penalty", "-1"),
             ("--repetition-penalty", "nan"), ("--batch-prompts", "0"), ("--conform-weight", "1.5"),
             ("--conform-weight", "-0.5"), ("--conform-weight", "nan"), ("--max-new-tokens", "0"),
             ("--seed", "-1"), ("--temperature", "inf")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_bad_flags_are_refused_at_parse_time(tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setattr(generate, "load_tokenizer", no_model)
    monkeypatch.setattr(generate, "load_model", no_model)
    with pytest.raises(SystemExit) as e:
        main(["--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--output", str(tmp_path / "o.jsonl"),
              flag, value])
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


GOOD = '{"prompt": "Tell a tale."}\n'
BAD_INPUTS = [  # files under tmp_path (p.jsonl is the prompts file, o.jsonl the output), extra flags, the error
    pytest.param({"p.jsonl": '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n'}, [],
                 r"p.jsonl:2: duplicate prompt id 'x' \(also .*p.jsonl:1\)", id="equal explicit ids"),
    pytest.param({"p.jsonl": '{"prompt": "a", "id": "1"}\n{"prompt": "b"}\n'}, [],
                 r"p.jsonl:2: duplicate prompt id '1'", id="explicit id equals a default id"),
    pytest.param({"p.jsonl": '{"prompt": "a", "id": 7}\n{"prompt": "b", "id": "7"}\n'}, [],
                 r"p.jsonl:2: duplicate prompt id '7'", id="integer and string ids"),
    pytest.param({"p.jsonl": '{"prompt": "a", "id": null}\n'}, [], r"p.jsonl:1: 'id' must be a string or an integer",
                 id="null id"),
    pytest.param({"p.jsonl": GOOD.encode() + b'{"prompt": "caf\xe9"}\n'}, [], r"p.jsonl:2: invalid UTF-8",
                 id="invalid utf-8"),
    pytest.param({"p.jsonl": GOOD + '{"prompt": "a\\ud800b"}\n'}, [], r"p.jsonl:2: lone surrogate",
                 id="lone surrogate"),
    pytest.param({}, ["--output", "{tmp}"], r"--output .*: is a directory", id="output is a directory"),
    pytest.param({}, ["--output", "{tmp}/p.jsonl/o.jsonl"], r"--output .*p.jsonl/o.jsonl: cannot write there",
                 id="output's directory is a file"),
    pytest.param({}, ["--model", "./no/such/model"], r"--model ./no/such/model: no such directory", id="missing model"),
    pytest.param({}, ["--base-model", "{tmp}/base"], r"--base-model .*/base: no such directory", id="missing base"),
    pytest.param({"m/notes.txt": ""}, ["--model", "{tmp}/m"], r"--model .*/m: not a model directory \(no config.json\)",
                 id="model directory without config"),
    pytest.param({}, ["--model", "packaged:nope"], r"--model packaged:nope: unknown packaged model",
                 id="unknown packaged"),
    pytest.param({"o.jsonl": '{"note": 1}\n{"note": 2}'}, [], r"o.jsonl: exists and was not written by ddpo.generate",
                 id="foreign output with a torn last line"),
    pytest.param({"o.jsonl": ""}, [], r"o.jsonl: exists and was not written by ddpo.generate",
                 id="foreign empty output"),
    pytest.param({"o.jsonl.meta.json": "{}"}, [], r"o.jsonl.meta.json: not a ddpo.generate settings file",
                 id="foreign sidecar"),
    pytest.param({"o.jsonl.lock": "12 elsewhere\n"}, [], r"--output .*o.jsonl: in use by pid 12 on elsewhere",
                 id="output being written by another run"),
]


@pytest.mark.parametrize("files, flags, error", BAD_INPUTS)
def test_bad_input_is_refused_before_a_model_loads(tmp_path, tiny_model, monkeypatch, files, flags, error):
    monkeypatch.setattr(generate, "load_tokenizer", no_model)
    monkeypatch.setattr(generate, "load_model", no_model)
    files = {"p.jsonl": GOOD, **files}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = ["--model", tiny_model, "--prompts", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match=error):
        main(argv + [f.format(tmp=tmp_path) for f in flags])
    assert sorted(os.listdir(tmp_path)) == sorted({name.split("/")[0] for name in files})  # nothing written
    for name, content in files.items():  # nothing rewritten
        assert (tmp_path / name).read_bytes() == (content if isinstance(content, bytes) else content.encode())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused_before_a_model_loads(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(generate, "load_model", no_model)
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="cannot write there"):
        main(["--model", tiny_model, "--prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS),
              "--output", str(tmp_path / "ro" / "o.jsonl")])


def test_mismatched_tokenizers_and_bad_prompts(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    other = make_tiny_model(tmp_path / "other")  # the same vocabulary size (else its config.json refuses it first)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(other)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(SystemExit, match=f"--base-model {other}: conformative decoding needs one vocabulary"):
        main(["--model", tiny_model, "--prompts", prompts, "--output", str(tmp_path / "o.jsonl"),
              "--base-model", other])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(SystemExit, match=f"{bad}:2: missing field 'prompt'"):
        main(["--model", tiny_model, "--prompts", bad, "--output", str(tmp_path / "o.jsonl")])


def test_the_output_lock_is_released_and_a_dangling_link_lock_is_an_error(tmp_path, tiny_model):
    """generate holds <output>.lock while it writes (two runs into one output would append every sample twice);
    it is gone after the run; a lock that is a dangling link (no run's) is a one-line error, not a spin."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    argv = ["--model", tiny_model, "--prompts", prompts, "--output", str(tmp_path / "o.jsonl"), "--n", "2",
            "--max-new-tokens", "2"]
    main(argv)
    assert sorted(os.listdir(tmp_path)) == ["o.jsonl", "o.jsonl.meta.json", "p.jsonl"]
    os.symlink(tmp_path / "nowhere", tmp_path / "o.jsonl.lock")
    with pytest.raises(SystemExit, match=r"o.jsonl.lock is not a lock file this tool wrote"):
        main(argv)
