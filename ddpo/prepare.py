"""Scored response pools -> weighted preference pairs for ddpo.train (docs/method.md, sections 2 and 4).

    python -m ddpo.prepare --input responses.jsonl --output pairs.jsonl --deviation both
    python -m ddpo.prepare --input responses.jsonl --output pairs.jsonl --pairing divpo --rho 0.25
    python -m ddpo.prepare --input responses.jsonl --output pairs.jsonl --pairing diverse-ns --budget 3000
    python -m ddpo.prepare --input pairs_in.jsonl --output pairs.jsonl --deviation semantic --min-weight 0.2
    python -m ddpo.prepare --from writingprompts --input euclaise/WritingPrompts_preferences --output pairs.jsonl

Input, from any source of ddpo/sources.py (JSONL, parquet, save_to_disk, Hub; other column names with
--prompt-field, --response-field, --score-field, --chosen-field, --rejected-field), one of:
  pools  {"prompt": str | [messages], "response": str, "score": number}   (score optional with --score)
  pairs  {"prompt": ..., "chosen": str, "rejected": str, "chosen_score": n, "rejected_score": n}  (scores optional)
or, with --from writingprompts, the posts of euclaise/WritingPrompts_preferences, made pools as the released scripts
made them (ddpo/writingprompts.py). Output: pairs JSONL with "weight" and "meta" (group size, each metric's raw
deviation of chosen and rejected, the pairing method; --output-format trl: TRL's conversational format with weight and
score columns), and <output>.meta.json (the input's digest, a Hub dataset's revision, the flags), each written to a
temporary file and renamed (what a killed run left, .tmp-<output name>-*, is removed at the next start); a summary of
what was kept and dropped is printed. Flags, the output's directory and model paths are
checked before any scorer or embedder loads.

Pairing of pools:
  gap         (released) per prompt, repeatedly pick a seeded random pair of unused responses whose scores differ by
              at least --gap, else any pair with unequal scores; chosen = higher score; each response used once.
  divpo       (released) the pool is the responses the gap pairing used (--pool all: every response);
              k = int(min(max(M, N rho), N / 2)), M = --pairs-per-prompt; chosen = the min(M, k) most deviating of the
              top-k by score, rejected = the least deviating of the bottom-k, deviation computed within each set
              (both metrics unless --deviation names one); shuffled (seeded) and zipped; equal scores are kept.
  diverse-ns  every pair (i, j) of one prompt with dev_i > dev_j, score_i >= score_j - --quality-eps and
              |len_i - len_j| / len_j <= --length-tolerance (words); greedily by diversity gain, each response once,
              up to --budget pairs overall.
DivPO and Diverse-NS pairs are trained with plain DPO: their weight is 1. Gap pairs and input pairs get the
deviation weight of their chosen response, clamped from below by --min-weight, computed in the released order: pair
every prompt, cut it to --max-per-prompt (--sort-by-score: the highest chosen scores first, else the first drawn),
then compute deviation over the texts of the pairs kept (--pool all: over every response of the prompt).
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
from collections import OrderedDict

import torch

from ddpo.data import DataError, check_size, check_text, finite_number, pool_order, read_records
from ddpo.files import atomic_write, check_not_input, check_writable, one_line_errors, remove_temporaries
from ddpo.config import in_range
from ddpo.deviation import METRICS, chosen_weights, deviation_weights
from ddpo.embedders import DEFAULT_EMBEDDERS, check_embedder, load_embedder
from ddpo.malloc import keep_freed_memory
from ddpo.models import DEFAULT_MODEL, check_model_path, load_tokenizer
from ddpo.quality import load_scorer, scorer_spec
from ddpo.sources import PAIR_FIELDS, POOL_FIELDS, describe, field_map
from ddpo.writingprompts import conversation_tokens, read_writingprompts


def read_input(path, scored_later, fields=None, digest=None):
    """Returns (kind, groups): groups maps a prompt key to {"prompt", "responses": [text], "scores": [float|None],
    "pairs": [(i_chosen, i_rejected)]}; plus drop counts. Errors name file:line (or file:row N). `fields`: our
    field names -> the input's columns; `digest`: as read_records'."""
    groups, kind, dropped = OrderedDict(), None, {"empty": 0, "duplicate": 0}
    for source, rec in read_records(path, fields, digest):
        this = "pairs" if "chosen" in rec or "rejected" in rec else "pool"
        if kind not in (None, this):
            raise DataError(f"{source}: a {this} record in a file of {kind} records")
        kind = this
        required = ("prompt", "chosen", "rejected") if kind == "pairs" else ("prompt", "response")
        for key in required:
            if key not in rec:
                raise DataError(f"{source}: missing field {key!r}")
        if (problem := check_text(rec["prompt"], "prompt")):
            raise DataError(f"{source}: {problem}")
        g = groups.setdefault(json.dumps(rec["prompt"]),
                              {"prompt": rec["prompt"], "responses": [], "scores": [], "pairs": []})
        score_keys = ("chosen_score", "rejected_score") if kind == "pairs" else ("score",)
        scores = [rec.get(k) for k in score_keys]
        for k, s in zip(score_keys, scores):
            if s is not None and not finite_number(s):
                raise DataError(f"{source}: {k} must be a finite number, got "
                                f"{s!r:.40}{'...' if len(repr(s)) > 40 else ''}")
            if s is None and kind == "pool" and not scored_later:
                raise DataError(f"{source}: missing {k!r} (or pass --score proxy / reward-model:PATH)")
        texts = [rec["chosen"], rec["rejected"]] if kind == "pairs" else [rec["response"]]
        for t in texts:
            if not isinstance(t, str):
                raise DataError(f"{source}: responses must be strings, got {type(t).__name__}")
            if (problem := check_size(t, "response")):  # empty ones are dropped below, long ones refused
                raise DataError(f"{source}: {problem}")
        if any(not t.strip() for t in texts):
            dropped["empty"] += 1
            continue
        index = []
        for t, s in zip(texts, scores):
            if t in g["responses"]:  # the same text twice in one pool: one response, not two
                index.append(g["responses"].index(t))
                if kind == "pool":
                    dropped["duplicate"] += 1
            else:
                g["responses"].append(t)
                g["scores"].append(None if s is None else float(s))
                index.append(len(g["responses"]) - 1)
        if kind == "pairs":
            if index[0] == index[1]:
                dropped["duplicate"] += 1
                continue
            g["pairs"].append(tuple(index))
    if kind is None:
        raise DataError(f"{path}: no records (the file is empty)")
    return kind, groups, dropped


PAIRINGS = ["gap", "best-worst", "divpo", "diverse-ns"]


def pair_gap(scores, rng, gap):
    """The released gap rule: while two unused responses differ in score, draw a pair uniformly from the unused pairs
    (i < j, in index order) whose scores differ by >= gap, or, when none does, from those that differ at all; the
    higher score is chosen. The same draws as rng.choice over those lists, without rebuilding them each round
    (O(n^2) in all, not O(n^3): 3,000 responses took over 5 minutes): each list is the upper triangle of a boolean
    matrix whose row counts are kept as responses are used."""
    s = torch.tensor(scores, dtype=torch.float64)
    upper = torch.ones(len(s), len(s), dtype=torch.bool).triu(1)
    differ = upper & (s[:, None] != s[None, :])
    lists = [differ & ((s[:, None] - s[None, :]).abs() >= gap), differ]  # wide, then all that differ
    counts = [m.sum(1) for m in lists]
    pairs = []
    while counts[1].sum() > 0:
        pool, rows = next((m, c) for m, c in zip(lists, counts) if c.sum() > 0)
        k = rng.randrange(int(rows.sum()))  # what rng.choice(list) draws
        i = int(torch.searchsorted(rows.cumsum(0), k, right=True))
        j = int(pool[i].nonzero()[k - int(rows[:i].sum())])
        for m, c in zip(lists, counts):  # i and j are used: their rows and columns leave every list
            c -= m[:, i].long() + m[:, j].long()
            m[:, [i, j]] = False
            m[[i, j]] = False
            c[[i, j]] = 0
        pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return pairs


def pair_best_worst(scores):
    """One pair per prompt: the highest score chosen, the lowest rejected (the first of each among ties); none when
    every score is equal. The usual rule of online DPO (best-of-n against worst-of-n)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return [(best, worst)] if scores[best] > scores[worst] else []


def metric_roles(pairing, deviation):
    """(the metrics whose deviation weights pairs, the metrics DivPO and Diverse-NS rank responses by). DivPO and
    Diverse-NS pairs are trained with plain DPO (weight 1), ranked by --deviation's metrics or the released ones."""
    if pairing in ("gap", "best-worst"):
        return METRICS[deviation], []
    return [], METRICS[deviation] or (["semantic", "style"] if pairing == "divpo" else ["semantic"])


def pair_divpo(scores, deviation_within, rng, rho, m_pairs):
    """DivPO (released): k = int(min(max(M, N rho), N / 2)); chosen = the min(M, k) most deviating of the top-k by
    score, rejected = the least deviating of the bottom-k, deviation computed *within* each of the two sets
    (deviation_within(indices) -> one combined deviation per index); shuffled and zipped. Equal scores are kept."""
    n = len(scores)
    k = int(min(max(m_pairs, n * rho), n / 2))
    if k < 1:
        return []
    by_score = sorted(range(n), key=lambda i: -scores[i])
    high, low = by_score[:k], by_score[-k:]
    m = min(m_pairs, k)
    dev_high, dev_low = deviation_within(high), deviation_within(low)
    chosen = [high[i] for i in sorted(range(k), key=lambda i: -dev_high[i])[:m]]
    rejected = [low[i] for i in sorted(range(k), key=lambda i: dev_low[i])[:m]]
    rng.shuffle(chosen)
    rng.shuffle(rejected)
    return list(zip(chosen, rejected))


def pair_diverse_ns(texts, scores, dev, eps, tolerance):
    lengths = [max(1, len(t.split())) for t in texts]
    candidates = [(dev[i] - dev[j], i, j) for i in range(len(texts)) for j in range(len(texts))
                  if dev[i] > dev[j] and scores[i] >= scores[j] - eps
                  and abs(lengths[i] - lengths[j]) / lengths[j] <= tolerance]
    used, pairs = set(), []
    for gain, i, j in sorted(candidates, key=lambda c: -c[0]):
        if i not in used and j not in used:
            used |= {i, j}
            pairs.append((i, j, gain))
    return pairs


def score_flag(text):
    """--score: none, or a scorer quality.load_scorer knows."""
    try:
        return text if text == "none" else scorer_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="pools or pairs: JSONL or parquet (file or directory), a "
                   "save_to_disk directory, or a Hub dataset ORG/NAME[:split] or ORG/NAME:config:split")
    p.add_argument("--from", dest="schema", default="ddpo", choices=["ddpo", "writingprompts"],
                   help="the input's schema: ddpo's pools or pairs (module docstring), or writingprompts: "
                        "euclaise/WritingPrompts_preferences, one post a record, turned into pools as released "
                        "(ddpo/writingprompts.py)")
    p.add_argument("--max-response-tokens", type=in_range(int, 0), default=2048,
                   help="--from writingprompts: drop a comment whose conversation with its prompt, in --model's chat "
                        "template, has more tokens (released: 2048; 0 = keep all)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="--from writingprompts: the policy whose tokenizer counts "
                   "--max-response-tokens (released: meta-llama/Llama-3.1-8B-Instruct)")
    for name, what in [("prompt", "prompt"), ("response", "response of a pool"), ("score", "score of a response"),
                       ("chosen", "chosen response of a pair"), ("rejected", "rejected response of a pair")]:
        p.add_argument(f"--{name}-field", default=name, help=f"the input's column holding the {what}")
    p.add_argument("--output", required=True, help="pairs JSONL to write; beside it <output>.meta.json records the "
                   "input (its sha256, or its datasets fingerprint and revision) and the flags")
    p.add_argument("--output-format", default="ddpo", choices=["ddpo", "trl"],
                   help="ddpo: pairs with weight, scores and meta; trl: TRL's conversational preference format "
                        "(prompt, chosen, rejected as message lists) with weight, chosen_score and rejected_score")
    p.add_argument("--deviation", default="both", choices=list(METRICS), help="metrics whose deviation weights pairs")
    p.add_argument("--semantic-embedder", default=DEFAULT_EMBEDDERS["semantic"],
                   help="hub name, path or packaged:<name> (paper: jinaai/jina-embeddings-v3)")
    p.add_argument("--style-embedder", default=DEFAULT_EMBEDDERS["style"],
                   help="hub name, path, or 'stylometric' (paper: AnnaWegmann/Style-Embedding)")
    p.add_argument("--pairing", default="gap", choices=PAIRINGS, help="how pools become pairs (best-worst: the "
                   "highest score against the lowest, one pair per prompt)")
    p.add_argument("--pool", default="pairs", choices=["pairs", "all"],
                   help="the responses of a prompt that deviation is computed over. pairs (released): weights over the "
                        "texts of the pairs kept (after --max-per-prompt), DivPO over the responses the gap pairing "
                        "used; all: every response of the prompt (the paper's prose)")
    p.add_argument("--gap", type=in_range(float, 0), default=5.0,
                   help="gap pairing: minimum score gap before falling back")
    p.add_argument("--rho", type=in_range(float, 0, 1, above=True), default=0.25,
                   help="divpo: share of the pool taken as high and low")
    p.add_argument("--pairs-per-prompt", type=in_range(int, 1), default=2, help="divpo: M, pairs per prompt")
    p.add_argument("--quality-eps", type=in_range(float, 0), default=0.0,
                   help="diverse-ns: chosen score >= rejected score - eps")
    p.add_argument("--length-tolerance", type=in_range(float, 0), default=0.1,
                   help="diverse-ns: |len_c - len_r| / len_r at most this")
    p.add_argument("--budget", type=in_range(int, 0), default=0,
                   help="diverse-ns: keep at most this many pairs overall (0 = all)")
    p.add_argument("--max-per-prompt", type=in_range(int, 0), default=0,
                   help="keep at most this many pairs per prompt (0 = all)")
    p.add_argument("--sort-by-score", action="store_true", help="under --max-per-prompt keep the highest chosen scores")
    p.add_argument("--min-weight", type=in_range(float, 0), default=0.0,
                   help="clamp chosen weights from below (paper ablation: 0.2)")
    p.add_argument("--score", type=score_flag, default="none",
                   help="score responses: none (use the input's), proxy, or reward-model:PATH")
    p.add_argument("--trust-remote-code", action="store_true", help="run the embedders' own code from their "
                   "directory or hub repo (jinaai/jina-embeddings-v3 needs it); only for models you trust")
    p.add_argument("--seed", type=int, default=0, help="seed of gap pairing and DivPO shuffles")
    return p.parse_args(argv)


class Deviation:
    """Deviation of any subset of a prompt's responses taken as one pool (docs/method.md, section 2), from embeddings
    made once."""

    def __init__(self, embeddings):
        self.embeddings = embeddings  # {metric: (M, D) over every response of the input}

    def __call__(self, pools, metrics):
        """pools: lists of global response indices -> per pool (weights, {metric: raw deviations}), one batched call."""
        if not metrics:
            return [([1.0] * len(rows), {}) for rows in pools]
        rows = torch.tensor([i for pool in pools for i in pool], dtype=torch.long)
        group = torch.tensor([g for g, pool in enumerate(pools) for _ in pool])
        weights, devs = deviation_weights([self.embeddings[m][rows] for m in metrics], group)
        out, start = [], 0
        for pool in pools:
            end = start + len(pool)
            out.append((weights[start:end].tolist(), {m: d[start:end].tolist() for m, d in zip(metrics, devs)}))
            start = end
        return out


def pair_prompt(args, kind, g, start, deviation, rng, ranking):
    """The pairs of one prompt as (chosen, rejected, meta) with indices local to its responses, before any cutoff."""
    s, n = g["scores"], len(g["responses"])
    if kind == "pairs":
        return [(c, r, {}) for c, r in g["pairs"]]
    if args.pairing == "gap":
        return [(c, r, {}) for c, r in pair_gap(s, rng, args.gap)]
    if args.pairing == "best-worst":
        return [(c, r, {}) for c, r in pair_best_worst(s)]
    if args.pairing == "divpo":
        pool = (sorted({i for pair in pair_gap(s, rng, args.gap) for i in pair}) if args.pool == "pairs"
                else list(range(n)))
        within = lambda local: deviation([[start + pool[i] for i in local]], ranking)[0][0]  # noqa: E731
        return [(pool[c], pool[r], {"group_size": len(pool)})  # the pool DivPO ranked by deviation
                for c, r in pair_divpo([s[i] for i in pool], within, rng, args.rho, args.pairs_per_prompt)]
    weights, devs = deviation([list(range(start, start + n))], ranking)[0]
    return [(c, r, {"group_size": n, "diversity_gain": gain, "deviation": {m: [d[c], d[r]] for m, d in devs.items()}})
            for c, r, gain in pair_diverse_ns(g["responses"], s, weights, args.quality_eps, args.length_tolerance)]


WRITTEN_BY = "ddpo.prepare"


def meta_path(output):
    return output + ".meta.json"


def check_meta(path):
    """Refuse to replace a <output>.meta.json that ddpo.prepare did not write."""
    try:
        with open(path, encoding="utf-8") as f:
            ours = json.load(f).get("written_by") == WRITTEN_BY
    except FileNotFoundError:
        return
    except OSError as e:  # e.g. a name too long: not a file we could have written
        raise DataError(f"--output {path}: {e.strerror}") from None
    except (ValueError, AttributeError, RecursionError):
        ours = False
    if not ours:
        raise DataError(f"--output: {path} exists and is not a ddpo.prepare meta file; choose another --output or "
                        "remove it")


def read_groups(args, digest):
    """(kind, groups, drop counts) of --input under --from (read_input's, or the WritingPrompts pools'), read once:
    `digest` receives its content's sha256."""
    if args.schema == "ddpo":
        return read_input(args.input, args.score != "none", field_map(args, PAIR_FIELDS + POOL_FIELDS), digest)
    count = conversation_tokens(load_tokenizer(args.model)) if args.max_response_tokens else None
    groups, counts = read_writingprompts(args.input, count, args.max_response_tokens, digest)
    print("read " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return "pool", groups, {"empty": counts["dropped_empty"], "duplicate": counts["dropped_duplicate"]}


def trl_row(row):
    """A pair in TRL's conversational preference format, its weight and scores as columns."""
    prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}], "weight": row["weight"],
            "chosen_score": row["chosen_score"], "rejected_score": row["rejected_score"]}


def prepare(args):
    check_not_input(args.output, args.input)
    check_writable(args.output)
    check_writable(meta_path(args.output), "--output")
    check_meta(meta_path(args.output))
    if args.schema == "writingprompts" and args.max_response_tokens:
        check_model_path(args.model)
    digest = hashlib.sha256()
    kind, groups, dropped = read_groups(args, digest)
    source = describe(args.input, digest)
    texts = [t for g in groups.values() for t in g["responses"]]
    weighting, ranking = metric_roles(args.pairing if kind == "pool" else "gap", args.deviation)
    plain = not weighting and bool(ranking)  # DivPO and Diverse-NS pairs: weight 1
    names = {"semantic": args.semantic_embedder, "style": args.style_embedder}
    metrics = list(dict.fromkeys(weighting + ranking))
    for m in metrics:
        check_embedder(names[m], f"--{m}-embedder")
    if args.score.startswith("reward-model:"):
        check_model_path(args.score.split(":", 1)[1], "--score reward-model:")
    directory, name = os.path.split(os.path.abspath(args.output))
    remove_temporaries(directory, re.escape(name) + r"(\.meta\.json)?")
    if args.score != "none":
        prompts = [g["prompt"] for g in groups.values() for _ in g["responses"]]
        scores = load_scorer(args.score)(prompts, texts)
        it = iter(scores)
        for g in groups.values():
            g["scores"] = [next(it) for _ in g["responses"]]

    def embed(texts, metrics):
        return {m: load_embedder(names[m], trust_remote_code=args.trust_remote_code)(texts) for m in metrics}

    deviation = Deviation(embed(texts, ranking))  # DivPO and Diverse-NS rank by deviation over the input's responses

    # 1. pair every prompt, then cut it to --max-per-prompt (released order: deviation comes after both)
    rng = random.Random(args.seed)
    kept, offset = [], 0  # kept: (group, first response index, pairs)
    counts = {"prompts": len(groups), "responses": len(texts), "single_response_prompts": 0, "no_pair_prompts": 0}
    for g in groups.values():
        start, offset = offset, offset + len(g["responses"])
        if len(g["responses"]) < 2:
            counts["single_response_prompts"] += 1
            continue
        pairs = pair_prompt(args, kind, g, start, deviation, rng, ranking)
        if args.max_per_prompt and len(pairs) > args.max_per_prompt:
            if args.sort_by_score:
                pairs = sorted(pairs, key=lambda x: -(g["scores"][x[0]] if g["scores"][x[0]] is not None
                                                      else -math.inf))
            pairs = pairs[:args.max_per_prompt]
        if not pairs:
            counts["no_pair_prompts"] += 1
            continue
        kept.append((g, start, pairs))

    if not kept:
        raise DataError(f"{args.input}: no pair could be formed ({counts})")

    # 2. deviation weights over each prompt's pool: the texts of its kept pairs in data.pool_order, as the in-step
    # path lists the pairs file we write (data.response_pools), or all the prompt's responses (--pool all)
    pools = [pool_order(pairs) if args.pool == "pairs" else list(range(len(g["responses"]))) for g, _, pairs in kept]
    pool_texts = [g["responses"][i] for (g, _, _), pool in zip(kept, pools) for i in pool]
    offsets = [sum(len(p) for p in pools[:k]) for k in range(len(pools))]
    weighted = Deviation(embed(pool_texts, weighting))([list(range(o, o + len(p))) for o, p in zip(offsets, pools)],
                                                       weighting)
    rows = []
    for (g, _, pairs), pool, (weights, devs) in zip(kept, pools, weighted):
        at = {i: k for k, i in enumerate(pool)}
        chosen = chosen_weights(torch.tensor(weights, dtype=torch.float64), torch.tensor([at[c] for c, _, _ in pairs]),
                                args.min_weight).tolist()
        for (c, r, meta), w in zip(pairs, chosen):
            w = 1.0 if plain else w
            meta = {"group_size": len(pool), "pairing": "input" if kind == "pairs" else args.pairing,
                    "deviation": {m: [d[at[c]], d[at[r]]] for m, d in devs.items()}, **meta}
            if "transformed" in g:  # --from writingprompts: the released transformed votes, and the intended ones
                meta["transformed_score"] = {k: [g["transformed"][c][j], g["transformed"][r][j]]
                                             for j, k in enumerate(("released", "intended"))}
            rows.append({"prompt": g["prompt"], "chosen": g["responses"][c], "rejected": g["responses"][r], "weight": w,
                         "chosen_score": g["scores"][c], "rejected_score": g["scores"][r], "meta": meta})
    if args.pairing == "diverse-ns" and args.budget and len(rows) > args.budget:
        rows = sorted(rows, key=lambda row: -row["meta"]["diversity_gain"])[:args.budget]
    if not rows:
        raise DataError(f"{args.input}: no pair could be formed ({counts})")
    rows = [trl_row(row) for row in rows] if args.output_format == "trl" else rows
    atomic_write(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write(meta_path(args.output), json.dumps({"written_by": WRITTEN_BY, "source": source, "flags": vars(args)},
                                                    indent=1) + "\n")
    w = torch.tensor([row["weight"] for row in rows])
    summary = {**counts, "pairs": len(rows), "dropped_empty": dropped["empty"],
               "dropped_duplicate": dropped["duplicate"],
               "weight_mean": w.mean().item(), "weight_min": w.min().item(), "weight_max": w.max().item(),
               "weight_zero_share": (w == 0).float().mean().item()}
    print(f"wrote {len(rows)} pairs to {args.output}: "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()), flush=True)
    return summary


def main(argv=None):
    keep_freed_memory()
    one_line_errors(prepare, parse_args(argv))


if __name__ == "__main__":
    main()
