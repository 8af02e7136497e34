"""Scored response pools -> weighted preference pairs for ddpo.train (DESIGN.md 2 and 3).

    python -m ddpo.prepare --input responses.jsonl --output pairs.jsonl --deviation both
    python -m ddpo.prepare --input responses.jsonl --output pairs.jsonl --pairing divpo --rho 0.25
    python -m ddpo.prepare --input responses.jsonl --output pairs.jsonl --pairing diverse-ns --budget 3000
    python -m ddpo.prepare --input pairs_in.jsonl --output pairs.jsonl --deviation semantic --min-weight 0.2

Input, JSONL (file or directory), one of:
  pools  {"prompt": str | [messages], "response": str, "score": number}   (score optional with --score)
  pairs  {"prompt": ..., "chosen": str, "rejected": str, "chosen_score": n, "rejected_score": n}  (scores optional)
Output: pairs JSONL with "weight" and "meta" (group size, each metric's raw deviation of chosen and rejected, the
pairing method), written to a temporary file and renamed; a summary of what was kept and dropped is printed.

Pairing of pools:
  gap         (released) per prompt, repeatedly pick a seeded random pair of unused responses whose scores differ by
              at least --gap, else any pair with unequal scores; chosen = higher score; each response used once.
  divpo       k = int(min(max(M, N rho), N / 2)), M = --pairs-per-prompt; chosen = the min(M, k) most deviating of the
              top-k by score, rejected = the least deviating of the bottom-k; shuffled (seeded) and zipped.
  diverse-ns  every pair (i, j) of one prompt with dev_i > dev_j, score_i >= score_j - --quality-eps and
              |len_i - len_j| / len_j <= --length-tolerance (words); greedily by diversity gain, each response once,
              up to --budget pairs overall.
DivPO and Diverse-NS pairs are trained with plain DPO: their weight is 1. Gap pairs and input pairs get the
deviation weight of their chosen response within the prompt's pool (all responses; for pairs input, all distinct
chosen and rejected texts of the prompt), clamped from below by --min-weight. --sort-by-score keeps, when
--max-per-prompt caps a prompt, the pairs with the highest chosen scores rather than the first ones drawn.
"""

import argparse
import json
import math
import random
import sys
from collections import OrderedDict

import torch

from ddpo.data import DataError, atomic_write, check_text, read_jsonl
from ddpo.deviation import DEFAULT_EMBEDDERS, METRICS, deviation_weights, load_embedder
from ddpo.quality import load_scorer


def read_input(path, scored_later):
    """Returns (kind, groups): groups maps a prompt key to {"prompt", "responses": [text], "scores": [float|None],
    "pairs": [(i_chosen, i_rejected)]}; plus drop counts. Errors name file:line."""
    groups, kind, dropped = OrderedDict(), None, {"empty": 0, "duplicate": 0}
    for source, rec in read_jsonl(path):
        this = "pairs" if "chosen" in rec or "rejected" in rec else "pool"
        if kind not in (None, this):
            raise DataError(f"{source}: a {this} record in a file of {kind} records")
        kind = this
        fields = ("prompt", "chosen", "rejected") if kind == "pairs" else ("prompt", "response")
        for key in fields:
            if key not in rec:
                raise DataError(f"{source}: missing field {key!r}")
        if (problem := check_text(rec["prompt"], "prompt")):
            raise DataError(f"{source}: {problem}")
        g = groups.setdefault(json.dumps(rec["prompt"]), {"prompt": rec["prompt"], "responses": [], "scores": [], "pairs": []})
        score_keys = ("chosen_score", "rejected_score") if kind == "pairs" else ("score",)
        scores = [rec.get(k) for k in score_keys]
        for k, s in zip(score_keys, scores):
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
                raise DataError(f"{source}: {k} must be a finite number, got {s!r}")
            if s is None and kind == "pool" and not scored_later:
                raise DataError(f"{source}: missing {k!r} (or pass --score proxy / reward-model:PATH)")
        texts = [rec["chosen"], rec["rejected"]] if kind == "pairs" else [rec["response"]]
        for t in texts:
            if not isinstance(t, str):
                raise DataError(f"{source}: responses must be strings, got {type(t).__name__}")
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


def pair_gap(scores, rng, gap):
    unused, pairs = set(range(len(scores))), []
    while True:
        candidates = [(i, j) for i in sorted(unused) for j in sorted(unused) if i < j and scores[i] != scores[j]]
        wide = [(i, j) for i, j in candidates if abs(scores[i] - scores[j]) >= gap]
        if not candidates:
            return pairs
        i, j = rng.choice(wide or candidates)
        unused -= {i, j}
        pairs.append((i, j) if scores[i] > scores[j] else (j, i))


def pair_divpo(scores, dev, rng, rho, m_pairs):
    n = len(scores)
    k = int(min(max(m_pairs, n * rho), n / 2))
    if k < 1:
        return []
    by_score = sorted(range(n), key=lambda i: -scores[i])
    high, low = by_score[:k], by_score[-k:]
    m = min(m_pairs, k)
    chosen = sorted(high, key=lambda i: -dev[i])[:m]
    rejected = sorted(low, key=lambda i: dev[i])[:m]
    rng.shuffle(chosen)
    rng.shuffle(rejected)
    return [(c, r) for c, r in zip(chosen, rejected) if c != r and scores[c] > scores[r]]


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="pools or pairs JSONL (file or directory)")
    p.add_argument("--output", required=True, help="pairs JSONL to write")
    p.add_argument("--deviation", default="both", choices=list(METRICS), help="metrics whose deviation weights pairs")
    p.add_argument("--semantic-embedder", default=DEFAULT_EMBEDDERS["semantic"], help="hub name, path or packaged:<name> (paper: jinaai/jina-embeddings-v3)")
    p.add_argument("--style-embedder", default=DEFAULT_EMBEDDERS["style"], help="hub name, path, or 'stylometric' (paper: AnnaWegmann/Style-Embedding)")
    p.add_argument("--pairing", default="gap", choices=["gap", "divpo", "diverse-ns"], help="how pools become pairs")
    p.add_argument("--gap", type=float, default=5.0, help="gap pairing: minimum score gap before falling back")
    p.add_argument("--rho", type=float, default=0.25, help="divpo: share of the pool taken as high and low")
    p.add_argument("--pairs-per-prompt", type=int, default=2, help="divpo: M, pairs per prompt")
    p.add_argument("--quality-eps", type=float, default=0.0, help="diverse-ns: chosen score >= rejected score - eps")
    p.add_argument("--length-tolerance", type=float, default=0.1, help="diverse-ns: |len_c - len_r| / len_r at most this")
    p.add_argument("--budget", type=int, default=0, help="diverse-ns: keep at most this many pairs overall (0 = all)")
    p.add_argument("--max-per-prompt", type=int, default=0, help="keep at most this many pairs per prompt (0 = all)")
    p.add_argument("--sort-by-score", action="store_true", help="under --max-per-prompt keep the highest chosen scores")
    p.add_argument("--min-weight", type=float, default=0.0, help="clamp chosen weights from below (paper ablation: 0.2)")
    p.add_argument("--score", default="none", help="score responses: none (use the input's), proxy, or reward-model:PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of gap pairing and DivPO shuffles")
    return p.parse_args(argv)


def prepare(args):
    kind, groups, dropped = read_input(args.input, scored_later=args.score != "none")
    texts = [t for g in groups.values() for t in g["responses"]]
    if args.score != "none":
        prompts = [g["prompt"] for g in groups.values() for _ in g["responses"]]
        scores = load_scorer(args.score)(prompts, texts)
        it = iter(scores)
        for g in groups.values():
            g["scores"] = [next(it) for _ in g["responses"]]
    group = torch.tensor([gi for gi, g in enumerate(groups.values()) for _ in g["responses"]])
    metrics = METRICS[args.deviation] or (["semantic"] if args.pairing in ("divpo", "diverse-ns") else [])
    embedders = {"semantic": args.semantic_embedder, "style": args.style_embedder}
    if metrics:
        weights, devs = deviation_weights([load_embedder(embedders[m])(texts) for m in metrics], group)
    else:
        weights, devs = torch.ones(len(texts)), []
    rank = weights.tolist()  # DivPO and Diverse-NS rank by deviation: w = p / mean(p) keeps p's order in a group
    if not METRICS[args.deviation]:
        weights = torch.ones(len(texts))

    rng = random.Random(args.seed)
    plain = args.pairing in ("divpo", "diverse-ns") and kind == "pool"  # trained with plain DPO: weight 1
    rows, offset = [], 0
    counts = {"prompts": len(groups), "responses": len(texts), "single_response_prompts": 0, "no_pair_prompts": 0}
    for g in groups.values():
        n = len(g["responses"])
        start, offset = offset, offset + n  # this prompt's rows in texts, weights and devs
        if n < 2:
            counts["single_response_prompts"] += 1
            continue
        s, dev = g["scores"], rank[start:offset]
        if kind == "pairs":
            pairs = [(c, r, None) for c, r in g["pairs"]]
        elif args.pairing == "gap":
            pairs = [(c, r, None) for c, r in pair_gap(s, rng, args.gap)]
        elif args.pairing == "divpo":
            pairs = [(c, r, None) for c, r in pair_divpo(s, dev, rng, args.rho, args.pairs_per_prompt)]
        else:
            pairs = pair_diverse_ns(g["responses"], s, dev, args.quality_eps, args.length_tolerance)
        if args.max_per_prompt and len(pairs) > args.max_per_prompt:
            if args.sort_by_score:
                pairs = sorted(pairs, key=lambda x: -(s[x[0]] if s[x[0]] is not None else -math.inf))
            pairs = pairs[:args.max_per_prompt]
        if not pairs:
            counts["no_pair_prompts"] += 1
        for c, r, gain in pairs:
            w = 1.0 if plain else max(weights[start + c].item(), args.min_weight)
            meta = {"group_size": n, "pairing": "input" if kind == "pairs" else args.pairing,
                    "deviation": {m: [devs[k][start + c].item(), devs[k][start + r].item()]
                                  for k, m in enumerate(metrics)}}
            if gain is not None:
                meta["diversity_gain"] = gain
            rows.append({"prompt": g["prompt"], "chosen": g["responses"][c], "rejected": g["responses"][r], "weight": w,
                         "chosen_score": s[c], "rejected_score": s[r], "meta": meta})
    if args.pairing == "diverse-ns" and args.budget and len(rows) > args.budget:
        rows = sorted(rows, key=lambda row: -row["meta"]["diversity_gain"])[:args.budget]
    if not rows:
        raise DataError(f"{args.input}: no pair could be formed ({counts})")
    atomic_write(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    w = torch.tensor([row["weight"] for row in rows])
    summary = {**counts, "pairs": len(rows), "dropped_empty": dropped["empty"], "dropped_duplicate": dropped["duplicate"],
               "weight_mean": w.mean().item(), "weight_min": w.min().item(), "weight_max": w.max().item(),
               "weight_zero_share": (w == 0).float().mean().item()}
    print(f"wrote {len(rows)} pairs to {args.output}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                                   for k, v in summary.items()), flush=True)
    return summary


def main(argv=None):
    try:
        prepare(parse_args(argv))
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
