"""Sampling N responses per prompt, optionally with conformative decoding (docs/method.md, section 5).

    python -m ddpo.generate --model runs/ddpo/checkpoint-30 --prompts prompts.jsonl --output samples.jsonl
    python -m ddpo.generate --model packaged:smollm2-135m-instruct --prompts prompts.jsonl --output conf.jsonl \
        --base-model path/to/base --conform-weight 0.3 --base-prompt-format completion

Prompts (JSONL, or any source of ddpo/sources.py; --prompt-field names another column): {"prompt": str | [messages],
"id": optional string or integer, else the prompt's index}; ids are unique. Samples JSONL: one line per sample with
"prompt_id", "prompt", "response", "sample", "model" and every sampling setting; beside it, <output>.meta.json
records what the samples depend on: the model, base model, conform weight, every sampling setting, --batch-prompts,
and the sha256 of the prompts (with the prompts file's path, for reading only). Defaults are the paper's evaluation:
N 4, temperature 1.0, top-k 50, top-p 0.95, repetition penalty 1.1. Temperature must be > 0 (greedy is --top-k 1).

Each step: repetition penalty (HF's rule, on the tokens of the prompt and the response so far), temperature, then
the instruct model's truncation set (top-k, then top-p, then min-p, each on what the previous kept). Conformative
decoding mixes the distributions, p = (1 - w) p_instruct + w p_base, keeps only the instruct model's truncation set
and renormalises; each model keeps its own KV cache and may read its own prompt format. With w = 0 the tokens are
those of plain sampling with the same seed.

Speed: each prompt is run once and its KV cache repeated for its N samples; a step works on the top-k candidates
only (top-p and min-p never reach past them; one logsumexp over the vocabulary gives their probabilities); a
sample that has ended leaves the batch. Top-k keeps every token tied with the k-th logit, as Hugging Face's top-k
does (bf16 logits tie there often). Models with plain causal attention decode in ddpo's segment attention, whose
attention of a new token over the KV cache is two batched matmuls (models.cached_attention, faster than sdpa's CPU
kernel at one query per row). The distribution is the same as before, but the draws are not: since 2026-11-23 a
seed gives other samples than it did before (multinomial over k candidates, and over the rows still going), and
since 2026-12-02 again (the attention's rounding under bf16, and batches of 32 prompts instead of 16), and since
2026-12-03 (the tied tokens at the k-th logit).
The forwards run under bf16 autocast (fp32 weights, bf16 matmuls; sampling from fp32 logits) where bf16 matmuls are
native (--dtype auto; 1.6x the tokens/s of fp32 on 2 AVX512-BF16 cores), else in fp32. The texts depend on the
dtype: it is one of the settings (an output written before the setting existed was float32).

A prompt longer than the context (the smaller max_position_embeddings of the models, minus --max-new-tokens) keeps
its last tokens, as training keeps a prompt's end; how many were cut is printed (the sample lines keep the whole
prompt). No room at all for a prompt is an error.

Prompts are processed in fixed batches of --batch-prompts (x N sequences, left-padded); each batch has its own seeded
generator and is appended to the output (flushed) when done. Rerunning into an existing output resumes it if it is
ours (it has our <output>.meta.json) and was written with the same settings and prompts (the prompts file may have
moved); otherwise an error names the settings that differ and nothing is written. Every complete line must be a
sample of this run (else a file:line error); a torn last line (killed mid-write) is dropped; each batch that misses a
sample is generated again whole, from its seed, and only its missing (prompt_id, sample) lines are appended, so no
sample is written twice. Seeded reproducibility per (prompt, sample) holds across resume: a sample depends on the
seed and its batch (index and prompts), not on interruptions, so a resumed run ends with the file of an uninterrupted
one (tested on CPU; on a GPU as far as its kernels are deterministic, else a resumed batch may differ in the samples
it adds).
"""

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

from ddpo.config import add_config_args, flag, in_range
from ddpo.data import DataError, check_text, prompt_ids, read_records
from ddpo.files import append, atomic_write, check_writable, hold_lock, one_line_errors
from ddpo.malloc import keep_freed_memory
from ddpo.models import (autocast_context, autocast_dtype, check_causal_lm, check_vocabulary, load_model,
                         load_tokenizer, use_segment_attention)

WRITTEN_BY = "ddpo.generate"


@dataclass
class Sampling:
    n: int = flag(4, "samples per prompt", type=in_range(int, 1))
    # bounded where the logits stay finite: a seen logit of 30 divided by 1e-300 is inf, and the draw NaN
    temperature: float = flag(1.0, "softmax temperature", type=in_range(float, 1e-3, 1e3))
    top_k: int = flag(50, "keep the k most likely tokens (0 = off)", type=in_range(int, 0))
    top_p: float = flag(0.95, "then the smallest set of mass >= top_p (1 = off)",
                        type=in_range(float, 0, 1, above=True))
    min_p: float = flag(0.0, "then tokens of probability >= min_p x the top one's (0 = off)",
                        type=in_range(float, 0, 1))
    repetition_penalty: float = flag(1.1, "Hugging Face's: seen tokens' logits divided (if > 0) or multiplied by it",
                                     type=in_range(float, 1e-3, 1e3))
    max_new_tokens: int = flag(256, "tokens per response at most", type=in_range(int, 1))
    seed: int = flag(0, "each batch of prompts draws from a stream seeded by seed and its index",
                   type=in_range(int, 0, 2**32 - 1))


def penalise(logits, seen, penalty):
    """HF's repetition penalty: seen tokens' positive logits are divided by it, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def candidates(logits, s):
    """The truncation set of (temperature-scaled) logits (B, V): top-k, then top-p, then min-p, each on what the
    previous kept. Top-k keeps every token whose logit is at least the k-th largest, as Hugging Face's top-k does, so
    a tie at the k-th logit (frequent in bf16) keeps all the tied tokens. Returns the candidates' token ids (B, k'),
    sorted by logit, and which of them are kept (B, k'), k' >= k being the widest row's top-k set; top-p and min-p
    never reach past the top-k, so nothing outside them is sorted (k' = V when top-k is off)."""
    values, ids = logits.topk(min(s.top_k or logits.shape[-1], logits.shape[-1]), dim=-1)  # (B, k), descending
    kth = values[:, -1:]
    # ties with the k-th logit belong to the top-k set: widen to the row with the most of them
    wide = int((logits >= kth).sum(-1).max())
    if wide > values.shape[-1]:
        values, ids = logits.topk(wide, dim=-1)
    keep = values >= kth
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)  # the distribution over the top-k
    if s.top_p < 1.0:
        keep &= probs.cumsum(-1) - probs < s.top_p  # the mass ranked above a token is below top_p
    if s.min_p > 0.0:  # a ratio to the top token's probability: the same over the top-k as over the top-p set
        keep &= probs >= s.min_p * probs[:, :1]
    return ids, keep


def next_token_probs(logits_instruct, logits_base, seen, s, w):
    """The sampling distribution on the instruct model's truncation set: candidate ids (B, k) and their probabilities
    (B, k), 0 outside the set, summing to 1. Conformative decoding (a base model's logits) mixes the distributions,
    p = (1 - w) p_instruct + w p_base, each over the whole vocabulary, before keeping the set and renormalising."""
    li = penalise(logits_instruct, seen, s.repetition_penalty) / s.temperature
    ids, keep = candidates(li, s)
    p = torch.exp(li.gather(-1, ids) - li.logsumexp(-1, keepdim=True))  # p_instruct of the candidates
    if logits_base is not None:
        lb = penalise(logits_base, seen, s.repetition_penalty) / s.temperature
        p = (1.0 - w) * p + w * torch.exp(lb.gather(-1, ids) - lb.logsumexp(-1, keepdim=True))
    p = p * keep
    return ids, p / p.sum(-1, keepdim=True)


def render_prompt(tokenizer, prompt, completion_style=False):
    """Token ids of a prompt: as training sees it (data.prompt_ids) for chat models; the plain text of its messages
    for a tokenizer without a chat template, and followed by a blank line in completion style (a base model)."""
    if tokenizer.chat_template and not completion_style:
        return prompt_ids(tokenizer, prompt)
    text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
    return tokenizer(text + ("\n\n" if completion_style else ""))["input_ids"]


class Stream:
    """One model's running state: its own prompt ids, attention mask, positions and KV cache, over the rows that are
    still sampling (rows whose sample has ended are dropped, so they cost nothing)."""

    def __init__(self, model, rows, pad_id):
        T = max(len(r) for r in rows)
        device = next(model.parameters()).device
        self.model = model
        self.ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], device=device)  # (P, T) left-padded
        self.mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)  # (P, T)
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.past = None

    @torch.no_grad()
    def prefill(self, n):
        """Run the prompts once, then repeat every row n times (a prompt's samples share its prefill). Returns the
        next-token logits (P n, V), rows grouped by prompt."""
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                         logits_to_keep=1)
        self.past = out.past_key_values
        self.past.batch_repeat_interleave(n)
        self.mask, self.pos = self.mask.repeat_interleave(n, 0), self.pos[:, -1:].repeat_interleave(n, 0)
        return out.logits[:, -1].float().repeat_interleave(n, 0)

    @torch.no_grad()
    def step(self, tokens):
        """Append one token (R,) to every row; returns the next-token logits (R, V)."""
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)
        self.pos = self.pos + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float()

    def keep(self, rows):
        """Keep only these rows (R',) of the batch."""
        self.mask, self.pos = self.mask[rows], self.pos[rows]
        self.past.batch_select_indices(rows)


def stop_ids(model, tokenizer):
    ids = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id} | set(ids if isinstance(ids, list) else [] if ids is None else [ids])


def generate_batch(model, tokenizer, rows, s, generator, base=None, base_rows=None, w=0.0):
    """N samples for each prompt, given its token ids (rows; base_rows for the base model): a list (per prompt) of N
    response strings. A sample ends at a stop token (or --max-new-tokens) and leaves the batch."""
    instruct = Stream(model, rows, tokenizer.pad_token_id)
    other = Stream(base, base_rows, tokenizer.pad_token_id) if base else None
    eos = stop_ids(model, tokenizer)
    eos_ids = torch.tensor(sorted(eos), device=instruct.ids.device)
    B = len(rows) * s.n
    active = torch.arange(B, device=instruct.ids.device)  # which samples the batch's rows are
    prompt_tokens = instruct.ids.repeat_interleave(s.n, 0)  # (B, T)
    seen = torch.zeros(B, model.get_output_embeddings().weight.shape[0], device=prompt_tokens.device).scatter_add_(
        1, prompt_tokens, instruct.mask.repeat_interleave(s.n, 0).float()) > 0  # (B, V) tokens the penalty applies to
    tokens = [[] for _ in range(B)]
    logits_i, logits_b = instruct.prefill(s.n), other.prefill(s.n) if other else None
    for i in range(s.max_new_tokens):
        ids, p = next_token_probs(logits_i, logits_b, seen, s, w)
        token = ids.gather(-1, torch.multinomial(p, 1, generator=generator))[:, 0]  # (R,)
        for row, t in zip(active.tolist(), token.tolist()):
            tokens[row].append(t)
        seen[torch.arange(len(token)), token] = True
        going = ~torch.isin(token, eos_ids)
        if not going.any() or i == s.max_new_tokens - 1:  # no forward for a token nobody will sample after
            break
        if not going.all():  # drop the rows whose sample has ended
            rows_left = going.nonzero()[:, 0]
            active, token, seen = active[rows_left], token[rows_left], seen[rows_left]
            for stream in (instruct, other) if other else (instruct,):
                stream.keep(rows_left)
        logits_i = instruct.step(token)
        logits_b = other.step(token) if other else None
    texts = [tokenizer.decode([t for t in seq if t not in eos], skip_special_tokens=True).strip() for seq in tokens]
    return [texts[i * s.n:(i + 1) * s.n] for i in range(len(rows))]


def batch_generator(s, index, device):
    """The generator of prompt batch `index`: seeded by --seed and the batch's index alone, so a sample depends on
    neither interruptions nor which process samples its batch."""
    return torch.Generator(device=device).manual_seed(s.seed * 1_000_003 + index)


BEFORE = {"dtype": "float32"}  # settings that outputs written before them had: every sample was fp32 until 2026-11-23
SAMPLER = 4  # the version of the draws a seed gives: 2 since 2026-11-23 (top-k candidates, ended rows leave), 3 since
# 2026-12-02 (cached decoding in segment attention: other rounding than sdpa's, so other draws under bf16), 4 since
# 2026-12-03 (top-k keeps the tokens tied with the k-th: another set, and more candidates a row)
MAX_ROWS = 4096  # sequences sampled together at most: 4,096 rows of SmolLM2's 49,152 logits are 0.8 GB in fp32
BATCH_PROMPTS = 32  # prompts per batch (x N rows): on 2 CPU cores 24 prompts in one batch of 96 rows sample 1.08x the
# tokens/s of batches of 16 (bench/generate.py, 2026-12-02)


def check_rows(n, batch_prompts, prompts, flag="--batch-prompts"):
    """A one-line DataError for a batch of more than MAX_ROWS sequences: refused, not chunked (a seed's draws depend on
    the batch), so memory stays bounded (every sequence holds a row of logits and its KV cache)."""
    if (rows := n * min(batch_prompts, prompts)) > MAX_ROWS:
        raise DataError(f"--n {n} x {min(batch_prompts, prompts)} prompts a batch: {rows:,} sequences sampled at "
                        f"once, over the {MAX_ROWS:,} ddpo samples together; lower "
                        + (flag if n <= MAX_ROWS else "--n (the rest into another --output, with another --seed)"))


def sample(model, tokenizer, prompts, s, batch_prompts=BATCH_PROMPTS, batches=None, base=None, w=0.0,
           base_prompt_format="chat", dtype=None):
    """Yield (batch index, [per prompt: s.n responses]) for the batches of batch_prompts prompts ({"prompt": str |
    [messages]} dicts) at `batches` (default: all): each batch seeded by its index, prompts cut to what fits the
    models' context, so a batch gives the same texts wherever and whenever it runs. With `base`: conformative
    decoding at weight w, the base model reading the prompt as base_prompt_format says. dtype: the autocast dtype of
    the forwards (None: fp32), a setting the texts depend on."""
    limit = prompt_limit([m for m in (model, base) if m is not None], s.max_new_tokens)
    device = next(model.parameters()).device
    for index in range(math.ceil(len(prompts) / batch_prompts)) if batches is None else batches:
        chunk = prompts[index * batch_prompts:][:batch_prompts]
        rows = [render_prompt(tokenizer, p["prompt"])[-limit:] for p in chunk]
        base_rows = [render_prompt(tokenizer, p["prompt"], base_prompt_format == "completion")[-limit:]
                     for p in chunk] if base else None
        with autocast_context(device, dtype)():  # per batch: a generator must not leave autocast on in its caller
            texts = generate_batch(model, tokenizer, rows, s, batch_generator(s, index, device), base, base_rows, w)
        yield index, texts


def read_prompts(path, prompt_field="prompt", digest=None):
    """The prompts at `path` (any source of ddpo.sources; the prompt read from the column `prompt_field`) as
    [{"id", "prompt"}]; `digest`: as read_records'."""
    prompts, sources = [], {}
    for source, rec in read_records(path, {"prompt": prompt_field}, digest):
        if "prompt" not in rec:
            raise DataError(f"{source}: missing field 'prompt'")
        if (problem := check_text(rec["prompt"], "prompt")):
            raise DataError(f"{source}: {problem}")
        pid = rec.get("id", len(prompts))
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(f"{source}: 'id' must be a string or an integer, got {pid!r}")
        if str(pid) in sources:
            raise DataError(f"{source}: duplicate prompt id {str(pid)!r} (also {sources[str(pid)]})")
        sources[str(pid)] = source
        prompts.append({"id": str(pid), "prompt": rec["prompt"]})
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def prompts_sha256(prompts):
    text = json.dumps([[p["id"], p["prompt"]] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def meta_path(output):
    return output + ".meta.json"


def read_meta(path):
    """Our settings file, {} when there is none; a file there that is not ours is refused."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("written_by") != WRITTEN_BY:
        raise DataError(f"{path}: not a ddpo.generate settings file; choose another --output or remove it")
    return meta


def sample_problem(rec, prompts_by_id, settings):
    """Why a line of an existing output is not a sample of this run, or None."""
    if not isinstance(rec, dict) or not isinstance(rec.get("response"), str):
        return "not a sample line of ddpo.generate"
    if not (isinstance(rec.get("prompt_id"), str) and rec["prompt_id"] in prompts_by_id):
        return f"prompt_id {rec.get('prompt_id')!r} is not in --prompts"
    if rec.get("prompt") != prompts_by_id[rec["prompt_id"]]:
        return f"the prompt of {rec['prompt_id']!r} differs from the one in --prompts"
    if type(rec.get("sample")) is not int or not 0 <= rec["sample"] < settings["n"]:
        return f"sample {rec.get('sample')!r} is not in 0..{settings['n'] - 1}"
    differ = [k for k in settings if rec.get(k, BEFORE.get(k)) != settings[k]]
    return f"written with other settings: {', '.join(differ)}" if differ else None


def written_samples(output, meta, prompts, settings):
    """The (prompt_id, sample) pairs already in the output, and the byte length of its complete lines. Refuses an
    output that is not ours, was written with other settings, or holds a line that is not a sample of this run."""
    old = read_meta(meta_path(output))
    if not os.path.exists(output):
        return set(), 0
    if not old:
        raise DataError(f"{output}: exists and was not written by ddpo.generate (no {meta_path(output)}); "
                        "choose another --output or remove it")
    if (differ := [k for k in meta if k != "sampler" and old.get(k, BEFORE.get(k)) != meta[k]]):
        raise DataError(f"{output}: holds samples with other settings: "
                        + ", ".join(f"{k}: {old.get(k, BEFORE.get(k))!r} there, {meta[k]!r} now" for k in differ)
                        + "; choose another --output"
                        + (f" (or --dtype {old.get('dtype', BEFORE['dtype'])} to go on with it)"
                           if "dtype" in differ else ""))
    with open(output, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]  # a torn last line (killed mid-write) is no sample
    by_id = {p["id"]: p["prompt"] for p in prompts}
    lines = {}
    for lineno, raw in enumerate(complete.split(b"\n")[:-1], 1):
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            rec = None
        if (problem := sample_problem(rec, by_id, settings)):
            raise DataError(f"{output}:{lineno}: {problem}")
        key = (rec["prompt_id"], rec["sample"])
        if key in lines:
            raise DataError(f"{output}:{lineno}: sample {key[1]} of prompt {key[0]!r} is already on line {lines[key]}")
        lines[key] = lineno
    # a complete output is kept whichever sampler wrote it: nothing is left to draw
    if old.get("sampler", 1) != meta["sampler"] and len(lines) < len(prompts) * settings["n"]:
        raise DataError(f"{output}: written by an earlier version of the sampler (sampler {old.get('sampler', 1)}, now "
                        f"{meta['sampler']}), whose draws differ: choose another --output to finish it")
    return set(lines), len(complete)


def dtype_name(dtype):
    """The name of an autocast dtype (None: fp32) in the samples' settings."""
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


def prompt_limit(models, max_new_tokens, flag="--max-new-tokens"):
    """Prompt tokens that fit: the smallest context (max_position_embeddings) of the models minus max_new_tokens."""
    context = min(getattr(m.config, "max_position_embeddings", None) or sys.maxsize for m in models)
    if context - max_new_tokens < 1:
        raise DataError(f"{flag} {max_new_tokens} leaves no room for a prompt in a context of {context}")
    return context - max_new_tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="packaged:smollm2-135m-instruct", help="hub name, local path or packaged:<name>")
    p.add_argument("--prompts", required=True, help="prompts: JSONL or parquet (file or directory), a save_to_disk "
                   "directory, or a Hub dataset ORG/NAME[:split]")
    p.add_argument("--prompt-field", default="prompt", help="the column of --prompts holding the prompt")
    p.add_argument("--output", required=True, help="samples JSONL, with <output>.meta.json; rerun to resume it")
    p.add_argument("--base-model", default="", help="conformative decoding: the base model to mix in")
    p.add_argument("--conform-weight", type=in_range(float, 0, 1), default=0.0,
                   help="w in p = (1 - w) p_instruct + w p_base")
    p.add_argument("--base-prompt-format", default="chat", choices=["chat", "completion"],
                   help="how the base model reads the prompt: the chat template, or the plain prompt text")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: bf16 autocast (fp32 weights, bf16 matmuls); auto: bfloat16 where bf16 matmuls are "
                        "native (CUDA, CPUs with AVX512-BF16 or AMX), else float32; the texts depend on it")
    p.add_argument("--batch-prompts", type=in_range(int, 1), default=None,
                   help=f"prompts per batch (x n sequences), part of what a seed's samples depend on (default: "
                        f"{BATCH_PROMPTS}, or the value of the output being resumed)")
    add_config_args(p, Sampling, {"sampling": [f.name for f in fields(Sampling)]})
    return p.parse_args(argv)


def generate(args):
    prompts = read_prompts(args.prompts, args.prompt_field)
    check_writable(args.output)
    config = check_causal_lm(args.model)
    if args.base_model:
        check_vocabulary(config, check_causal_lm(args.base_model, "--base-model"), args.base_model, "--base-model")
    s = Sampling(**{k: getattr(args, k) for k in asdict(Sampling())})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = autocast_dtype(args.dtype, device)
    settings = {"model": args.model, **asdict(s), "base_model": args.base_model or None,
                "conform_weight": args.conform_weight,
                "base_prompt_format": args.base_prompt_format if args.base_model else None,
                "dtype": dtype_name(dtype)}
    if args.batch_prompts is None:  # an output being resumed keeps its batches (and so its seeds)
        resumed = read_meta(meta_path(args.output)) if os.path.exists(args.output) else {}
        args.batch_prompts = resumed.get("batch_prompts", BATCH_PROMPTS)
    check_rows(s.n, args.batch_prompts, len(prompts))
    meta = {"written_by": WRITTEN_BY, "sampler": SAMPLER, **settings, "batch_prompts": args.batch_prompts,
            "prompts_sha256": prompts_sha256(prompts)}
    # one writer per output: a second run into it would append every sample again
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with hold_lock(args.output + ".lock", f"--output {args.output}"):
        return write_samples(args, prompts, s, settings, meta, device, dtype)


def write_samples(args, prompts, s, settings, meta, device, dtype):
    """generate's work under the output's lock: what is not yet written, sampled and appended batch by batch."""
    done, complete = written_samples(args.output, meta, prompts, settings)
    tokenizer = load_tokenizer(args.model)
    if args.base_model and tokenizer.get_vocab() != load_tokenizer(args.base_model).get_vocab():
        raise DataError(f"--base-model {args.base_model}: conformative decoding needs one vocabulary, and its "
                        f"tokenizer's differs from {args.model}'s")
    model = load_model(args.model, device=device).eval()
    base = load_model(args.base_model, device=device).eval() if args.base_model else None
    for m in (model, base) if base else (model,):  # cached decoding without sdpa's CPU kernel, where it fits
        use_segment_attention(m)
    limit = prompt_limit([m for m in (model, base) if m is not None], s.max_new_tokens)
    rows = [render_prompt(tokenizer, p["prompt"]) for p in prompts]
    completion = args.base_prompt_format == "completion"
    base_rows = [render_prompt(tokenizer, p["prompt"], completion) for p in prompts] if base else rows
    if (long := sum(max(len(a), len(b)) > limit for a, b in zip(rows, base_rows))):  # sample() keeps their ends
        print(f"{long} of {len(prompts)} prompts are longer than {limit} tokens (the context less --max-new-tokens): "
              f"each keeps its last {limit}", flush=True)
    size = args.batch_prompts
    todo = [index for index in range(math.ceil(len(prompts) / size))  # the batches with a sample still to write
            if any((p["id"], j) not in done for p in prompts[index * size:][:size] for j in range(s.n))]
    print(f"generating {s.n} samples for {sum(len(prompts[i * size:][:size]) for i in todo)} prompts "
          f"({len(done)} samples written before) with {args.model}"
          + (f" + {args.conform_weight} x {args.base_model}" if base else "") + f" ({settings['dtype']})", flush=True)
    if not os.path.exists(args.output):
        atomic_write(meta_path(args.output), json.dumps({**meta, "prompts": args.prompts}, indent=1) + "\n")
    elif complete < os.path.getsize(args.output):
        os.truncate(args.output, complete)  # the torn last line of our own output
    batches = sample(model, tokenizer, prompts, s, size, todo, base, args.conform_weight, args.base_prompt_format,
                     dtype)
    for index, responses in tqdm(batches, desc="generate", total=len(todo), dynamic_ncols=True):
        lines = [json.dumps({"prompt_id": p["id"], "prompt": p["prompt"], "response": r, "sample": j, **settings},
                            ensure_ascii=False) + "\n"
                 for p, rs in zip(prompts[index * size:][:size], responses) for j, r in enumerate(rs)
                 if (p["id"], j) not in done]
        append(args.output, "".join(lines), sync=True)
    return args.output


def main(argv=None):
    keep_freed_memory()
    one_line_errors(generate, parse_args(argv))


if __name__ == "__main__":
    main()
