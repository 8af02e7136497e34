"""Evaluation during training, and where a run's metrics go: ddpo.train's --eval-* and --report-to flags.

    python -m ddpo.train --data pairs.jsonl --eval-data held_out.jsonl --eval-every 50 --output-dir runs/ddpo
    python -m ddpo.train --data pairs.jsonl --eval-prompts prompts.jsonl --eval-samples 4 --eval-every 50 \
        --report-to tensorboard --output-dir runs/ddpo

An evaluation runs after the update of every --eval-every-th step and of the last step (--eval-every 0: the last
alone), before that step's checkpoint. It is its own metrics.jsonl row, {"step", "epoch", "eval_...",
"eval_runtime"}, after the step's training row; --resume trims it with the rows after the checkpoint.

Held-out pairs (--eval-data, read and checked with the training data, before any model loads): the training
objective of one step holding every held-out pair, without gradient or update, under TRL's names with its eval_
prefix: eval_loss, eval_rewards/chosen, eval_rewards/rejected, eval_rewards/margins, eval_rewards/accuracies,
eval_logps/chosen, eval_logps/rejected (ORPO/DORPO also eval_nll_loss, eval_log_odds_ratio) and
eval_weights/mean, /min, /max. The pairs are tokenised and truncated as the training pairs and run in micro-batches
of --batch-size through ddpo/step.py's micro_batch. Their weights are their own data's (--weight-field,
--min-weight); with --deviation, the deviation weights of their own pools (each prompt's held-out texts, embedded
once at start, step.chosen_weights); DORPO (released) takes the mean over all held-out pairs. Reference
log-probs come from the training reference (with --precompute-ref they are cached too, before the copy is freed).

Sampled diversity (--eval-prompts, ddpo.generate's prompts format): the policy samples --eval-samples responses for
every prompt with ddpo.generate's sampler (generate.sample: its batches of generate.BATCH_PROMPTS prompts, its
seeds from --seed, its default settings but --max-new-tokens from --eval-max-new-tokens), so each evaluation draws
with the same random numbers and steps differ by the model alone, under training's autocast, and the texts are
those `python -m ddpo.generate --model checkpoint-<step> --n K --max-new-tokens M --seed S --dtype D` writes (D: the
--dtype of training). They are scored with ddpo.evaluate's code (evaluate.evaluate), logged as the means over prompts
eval_semantic_diversity, eval_style_diversity, eval_compression_ratio, eval_ngram_diversity, eval_homogenization,
eval_distinct_1, eval_distinct_2, eval_length, eval_vendi_score, eval_effective_rank, eval_distinct_classes
(threshold 0.9), eval_slop_score and eval_quality (--eval-quality: proxy or reward-model:PATH), with
--semantic-embedder and --style-embedder (the stylometric style profile is standardised over each evaluation's
samples), and written to eval_samples/step-<N>.jsonl in ddpo.generate's samples format (ddpo.evaluate reads them).
Sampling runs in eval mode (gradient checkpointing off, so the KV cache is used) with ddpo.generate's attention
(segment attention where it fits, also under --no-packing).

Under torchrun every rank runs its share of the held-out micro-batches (as many passes each, which FSDP's
collectives need) and the sums are gathered; for sampling each rank runs its share of the prompt batches (each batch
has its own seed, so the texts are one process's), the texts are gathered, rank 0 embeds and scores them and hands
the row to every rank, so a non-finite value stops all ranks alike. Sampling is refused with --fsdp (the policy is
sharded). Only rank 0 writes.

A non-finite value (a held-out 'weight' of 1e308, weights that overflow) stops the run with an error naming the
step, before the step's checkpoint.

Reporting (Reporter, rank 0): metrics.jsonl and the printed line always; --report-to tensorboard writes event files
beside metrics.jsonl (tags train/<name> and eval/<name>, as transformers' TensorBoardCallback names them; a resumed
run purges the events after its checkpoint); --report-to wandb logs the same tags to one wandb run per start (project
$WANDB_PROJECT, default ddpo; its files under <output-dir>/wandb). Both are optional packages: a missing one, or a
wandb that is not logged in (no WANDB_API_KEY, no netrc entry, WANDB_MODE not offline), is a one-line error at
parse time.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import netrc
import os
import re
import time
from collections import OrderedDict
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from ddpo import evaluate, generate, step
from ddpo.checkpoint import SAMPLES_DIR
from ddpo.config import given
from ddpo.data import DataError, load_pairs, tokenize_pairs
from ddpo.files import append, atomic_write
from ddpo.distributed import gather_metrics, print0, rank_share
from ddpo.embedders import check_embedder, load_embedder
from ddpo.sources import PAIR_FIELDS, field_map
from ddpo.losses import LOSSES
from ddpo.models import autocast_context, check_model_path, use_segment_attention
from ddpo.quality import load_scorer, scorer_spec
from ddpo.reference import Reference

REPORTERS = ("none", "tensorboard", "wandb")
PRINTED = ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_semantic_diversity",
           "eval_style_diversity", "eval_quality", "eval_length", "eval_runtime")  # of an evaluation row, when there
SAMPLING_FLAGS = ("eval_samples", "eval_max_new_tokens", "eval_quality")  # mean nothing without --eval-prompts


def report_targets(text):
    """argparse type of --report-to: none, tensorboard, wandb, or a comma-separated list of them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or (bad := [name for name in names if name not in REPORTERS]):
        raise argparse.ArgumentTypeError(f"unknown {bad[0] if names else text!r}: use none, tensorboard, wandb, or "
                                         "tensorboard,wandb")
    return ",".join(names)


def reporters(cfg):
    return [name for name in cfg.report_to.split(",") if name != "none"]


def installed(package):
    return importlib.util.find_spec(package) is not None


def wandb_problem():
    """Why --report-to wandb cannot log here, or None: not installed, or not logged in (no WANDB_API_KEY, no netrc
    entry for its host, WANDB_MODE not offline or disabled)."""
    if not installed("wandb"):
        return "wandb is not installed: pip install wandb"
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    return "wandb is not logged in: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline"


def check_flags(parser, cfg, argv):
    """Parse-time checks of the evaluation and reporting flags (argparse errors: one line, exit status 2)."""
    if cfg.eval_every and not (cfg.eval_data or cfg.eval_prompts):
        parser.error("argument --eval-every: nothing to evaluate: give --eval-data or --eval-prompts")
    if not cfg.eval_prompts and (flags := [f"--{f.replace('_', '-')}" for f in SAMPLING_FLAGS if given(argv, f)]):
        parser.error(f"argument {flags[0]}: sets the sampled evaluation, which needs --eval-prompts")
    if cfg.eval_prompts and cfg.fsdp:
        parser.error("argument --eval-prompts: sampling needs the whole policy on every rank, not with --fsdp")
    try:
        scorer_spec(cfg.eval_quality)
    except ValueError as e:
        parser.error(f"argument --eval-quality: {e}")
    if "tensorboard" in reporters(cfg) and not installed("tensorboard"):
        parser.error("argument --report-to: tensorboard is not installed: pip install tensorboard")
    if "wandb" in reporters(cfg) and (problem := wandb_problem()):
        parser.error(f"argument --report-to: {problem}")


def flagged(flag, read, *args, **kwargs):
    """read(*args, **kwargs), with a DataError as one line naming the flag (and file:line, as the readers do)."""
    try:
        return read(*args, **kwargs)
    except DataError as e:
        raise DataError(f"{flag}: " + str(e).replace("bad preference data:\n  ", "")) from None


@dataclasses.dataclass
class HeldOut:
    """What the evaluations read: held-out pairs (--eval-data) and prompts (--eval-prompts), None where not given."""
    pairs: list | None = None
    prompts: list | None = None


def read_held_out(cfg, digest=None):
    """--eval-data and --eval-prompts read and checked, and the models sampling will load, before any model loads.
    `digest` (a hashlib sha256) receives the content of both (read_records')."""
    held_out = HeldOut()
    if cfg.eval_data:
        held_out.pairs = flagged("--eval-data", load_pairs, cfg.eval_data, max_errors=1, weight_field=cfg.weight_field,
                                 fields=field_map(cfg, PAIR_FIELDS), digest=digest)
    if cfg.eval_prompts:
        held_out.prompts = flagged("--eval-prompts", generate.read_prompts, cfg.eval_prompts, cfg.prompt_field,
                                   digest)
        check_embedder(cfg.semantic_embedder, "--semantic-embedder")
        check_embedder(cfg.style_embedder, "--style-embedder")
        if cfg.eval_quality != "proxy":
            check_model_path(cfg.eval_quality.split(":", 1)[1], "--eval-quality")
    return held_out


@contextlib.contextmanager
def sampling_mode(model):
    """Eval mode (gradient checkpointing off: the KV cache is used) and the attention ddpo.generate samples with
    (segment attention where it fits, which training without --no-packing already runs) for the duration; then the
    training state again."""
    training, attention = model.training, model.config._attn_implementation
    model.eval()
    use_segment_attention(model)
    try:
        yield
    finally:
        model.set_attn_implementation(attention)
        model.train(training)


class Monitor:
    """The evaluations of a run (module docstring). `after_step` runs one when it is due."""

    def __init__(self, cfg, held_out, rank, world, device, tokenizer, policy, policy_logps, ref, autocast_dtype):
        """Built before --precompute-ref frees the reference copy, whose held-out log-probs it caches too."""
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.tokenizer, self.policy, self.policy_logps = tokenizer, policy, policy_logps
        self.autocast, self.dtype = autocast_context(device, autocast_dtype), autocast_dtype
        self.pairs, self.prompts = held_out.pairs, held_out.prompts
        if self.pairs:
            stats = tokenize_pairs(self.pairs, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                   LOSSES[cfg.loss].orpo_rule)
            print0(f"eval data: {stats['pairs']} pairs from {cfg.eval_data}; truncated {stats['prompts_truncated']} "
                   f"prompts and {stats['completions_truncated']} completions", flush=True)
            self.weights = step.chosen_weights(cfg, self.pairs)  # the held-out pools' own
            self.ref = Reference(ref.logps, ref.lora) if ref else None  # its own cache: indices are held-out pairs
            if self.ref and cfg.precompute_ref:
                with self.autocast():
                    self.ref.precompute(cfg, self.pairs, tokenizer.pad_token_id, device, autocast_dtype, rank == 0)
        if self.prompts:
            generate.prompt_limit([policy], cfg.eval_max_new_tokens, "--eval-max-new-tokens")  # fail now, not at step N
            self.sampling = generate.Sampling(n=cfg.eval_samples, max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed)
            if rank == 0:  # the scorers of ddpo.evaluate
                load = lambda name: load_embedder(name, trust_remote_code=cfg.trust_remote_code)  # noqa: E731
                self.semantic, self.style = load(cfg.semantic_embedder), load(cfg.style_embedder)
                self.quality = load_scorer(cfg.eval_quality)

    def due(self, step, total_steps):
        return bool(self.pairs or self.prompts) and (
            (self.cfg.eval_every and step % self.cfg.eval_every == 0) or step == total_steps)

    def after_step(self, step, total_steps, epoch, last_checkpoint, reporter):
        """The evaluation of `step` when due: logged by rank 0's reporter; a non-finite value stops every rank."""
        if not self.due(step, total_steps):
            return None
        t0 = time.perf_counter()
        row = {"step": step, "epoch": round(epoch, 4)}
        if self.pairs:
            row.update(self.pair_metrics())
        if self.prompts:
            row.update(self.sampled_metrics(step))
        row["eval_runtime"] = time.perf_counter() - t0
        if self.world > 1 and self.prompts:  # rank 0 scored the samples: every rank takes its row
            rows = [row]
            dist.broadcast_object_list(rows, src=0)
            row = rows[0]
        if (bad := {k: v for k, v in row.items() if not math.isfinite(v)}):
            raise SystemExit(f"error: step {step}: evaluation: non-finite "
                             f"{', '.join(f'{k} {v}' for k, v in bad.items())}"
                             f"; stopped before the step's checkpoint (last checkpoint: {last_checkpoint or 'none'}). "
                             "Likely causes: a huge 'weight' in --eval-data, or a model whose logits overflow")
        if reporter:
            reporter.log(row, f"eval step {step}/{total_steps} | "
                         + " | ".join(f"{key} {row[key]:.4g}" for key in PRINTED if key in row))
        return row

    @torch.no_grad()
    def pair_metrics(self):
        """The eval_ metrics of the held-out pairs: sums over this rank's micro-batches, gathered, per pair."""
        size, n = self.cfg.batch_size, len(self.pairs)
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        weights_mean = self.weights.mean().item()  # DORPO (released): over the whole held-out "step"
        sums, used = {}, []
        for batch in rank_share(batches, self.rank, self.world):  # None: a pass to discard, as many passes per rank
            with self.autocast():
                out, metrics, _ = step.micro_batch(self.cfg, self.policy_logps, self.ref, self.pairs,
                                                   batch or batches[0], self.weights, self.tokenizer.pad_token_id,
                                                   self.device, weights_mean=weights_mean)
            if batch is not None:
                used.append(out.chosen_weights.float().cpu())
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.item()
        sums, used = gather_metrics(sums, used, self.world)
        used = torch.cat(used)
        return {**{f"eval_{key}": value / n for key, value in sums.items() if key != "tokens"},
                "eval_weights/mean": used.mean().item(), "eval_weights/min": used.min().item(),
                "eval_weights/max": used.max().item()}

    def sampled_metrics(self, step):
        """ddpo.evaluate's metrics of --eval-samples responses per prompt (rank 0; {} on the others)."""
        n_batches = math.ceil(len(self.prompts) / generate.BATCH_PROMPTS)
        with sampling_mode(self.policy):
            mine = dict(generate.sample(self.policy, self.tokenizer, self.prompts, self.sampling,
                                        generate.BATCH_PROMPTS, range(self.rank, n_batches, self.world),
                                        dtype=self.dtype))
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
            mine = {index: texts for part in gathered for index, texts in part.items()}
        if self.rank != 0:
            return {}
        responses = [texts for index in range(n_batches) for texts in mine[index]]  # per prompt, in order
        runs = {"step": OrderedDict((p["id"], {"prompt": p["prompt"], "responses": texts})
                                    for p, texts in zip(self.prompts, responses))}
        self.write_samples(step, runs["step"])
        result = evaluate.evaluate(runs, self.semantic, self.style, self.quality)["step"]
        # a metric of no value on these samples (homogenization of texts without words) is left out of the row
        return {f"eval_{metric}": result[metric]["mean"] for metric in evaluate.METRICS
                if result[metric]["mean"] is not None}

    def write_samples(self, step, prompts):
        settings = {**dataclasses.asdict(self.sampling), "dtype": generate.dtype_name(self.dtype)}
        lines = [json.dumps({"prompt_id": key, "prompt": v["prompt"], "response": text, "sample": j, "step": step,
                             **settings}, ensure_ascii=False) + "\n"
                 for key, v in prompts.items() for j, text in enumerate(v["responses"])]
        atomic_write(os.path.join(self.cfg.output_dir, SAMPLES_DIR, f"step-{step}.jsonl"), "".join(lines))


def tag(key):
    """transformers' TensorBoardCallback names: eval_loss -> eval/loss, loss -> train/loss."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


class Reporter:
    """Rank 0's outputs of the metrics rows: metrics.jsonl, the printed line, and --report-to's loggers. On resume
    (start_step > 0) the sampled texts and tensorboard events of steps after the checkpoint are dropped, as
    checkpoint.trim_metrics drops their rows."""

    def __init__(self, cfg, start_step, write=print):
        self.path, self.write = os.path.join(cfg.output_dir, "metrics.jsonl"), write
        self.tensorboard = self.wandb = None
        samples = os.path.join(cfg.output_dir, SAMPLES_DIR)
        for name in os.listdir(samples) if os.path.isdir(samples) else []:
            if (m := re.fullmatch(r"step-(\d+)\.jsonl", name)) and int(m.group(1)) > start_step:
                os.remove(os.path.join(samples, name))
        if "tensorboard" in reporters(cfg):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(cfg.output_dir, purge_step=start_step + 1)  # and a killed run's later ones
        if "wandb" in reporters(cfg):
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ddpo"), dir=cfg.output_dir,
                                    name=os.path.basename(os.path.abspath(cfg.output_dir)),
                                    config=dataclasses.asdict(cfg))

    def log(self, row, line):
        append(self.path, json.dumps(row, allow_nan=False) + "\n")
        scalars = {tag(key): value for key, value in row.items() if key != "step"}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])
        self.write(line)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
