"""Diversity and quality of sampled responses, per run, with bootstrap confidence intervals over prompts.

    python -m ddpo.evaluate runs/dpo/samples.jsonl runs/ddpo/samples.jsonl --names dpo ddpo --baseline dpo \
        --output-dir runs/eval

Input: samples JSONL files from ddpo.generate (one file = one run; needs "prompt" and "response", "prompt_id" if
present). Every metric is computed per prompt over its N samples, then averaged over prompts; the 95% interval is a
percentile bootstrap over prompts (1,000 resamples, seeded). A prompt with fewer than two samples has no diversity:
it is reported in "skipped_prompts" and left out of every average.

  semantic_diversity  mean pairwise cosine distance of semantic embeddings (default packaged all-MiniLM-L6-v2)
  style_diversity     the same with the style embedder (default: the stylometric profile, standardised over the
                      samples of all runs together so runs are comparable)
  compression_ratio   raw bytes / gzip bytes of the samples joined by spaces, gzipped twice as in the `diversity`
                      package of Shaib et al. (lower is more diverse)
  ngram_diversity     sum over n = 1..4 of unique / total n-grams of whitespace tokens, as `diversity` computes it
  homogenization      mean pairwise ROUGE-L F1 (lower is more diverse) of Unicode words (any script; each character
                      of Chinese, Japanese, Thai, Lao, Myanmar or Khmer a token), on the first MAX_ROUGE_TOKENS
                      (20,000) tokens of each response, so pathological outputs cannot stall it (the LCS is exact and
                      bit-parallel: about 45 ms for two 20,000-token responses); undefined for a prompt whose
                      responses hold no word (listed in "undefined_prompts", "n/a" in the report)
  distinct_1, _2      unique / total word n-grams
  length              mean words per sample
  vendi_score         Vendi score of the semantic embeddings (exp entropy of the eigenvalues of K/n; 1 to N)
  effective_rank      exp entropy of their normalised singular values (Roy & Vetterli 2007; 1 to N)
  distinct_classes    NoveltyBench-style classes: greedy partition by cosine similarity >= --class-threshold (1 to N)
  slop_score          EQ-Bench-style over-used words and phrases (ddpo/data/slop.txt) per 1,000 words (lower is better)
  (the last four: ddpo/diversity.py, with their papers)
  quality             ddpo.quality: the offline proxy, or a reward model (--quality reward-model:PATH)
With --baseline NAME, runs are paired by prompt key: for every metric, each other run's mean per-prompt difference
to the baseline over the prompts both have (2+ samples in each), with a paired percentile bootstrap 95% interval
(prompts resampled jointly, 1,000 resamples, seeded) and a two-sided sign-flip permutation p-value (exact over all
2^P sign vectors for P <= 16 prompts, else 10,000 seeded random ones: (count + 1) / 10,001). Quality also gets the
relative difference, diff / |baseline mean| in percent, with its bootstrap interval.
Output in --output-dir: <name>.metrics.json per run ("vs_baseline": per metric diff, ci95, p_value, prompts),
report.md (a table of all runs, then the differences to the baseline and one reading line per run) and plot.png
(quality against semantic diversity, one point per run, with 95% intervals; with a baseline, a second panel of the
paired differences).
"""

import argparse
import functools
import gzip
import io
import json
import os
import re
import sys
import unicodedata
from collections import OrderedDict

import torch

from ddpo.data import DataError
from ddpo.files import atomic_write, check_output_dir, one_line_errors, written
from ddpo.config import in_range
from ddpo.deviation import mean_cosine_distance
from ddpo.diversity import CLASS_THRESHOLD, distinct_classes, effective_rank, slop_score, vendi_score
from ddpo.embedders import DEFAULT_EMBEDDERS, load_embedder
from ddpo.malloc import keep_freed_memory
from ddpo.quality import load_scorer
from ddpo.sources import read_jsonl

METRICS = ["semantic_diversity", "style_diversity", "compression_ratio", "ngram_diversity", "homogenization",
           "distinct_1", "distinct_2", "length", "vendi_score", "effective_rank", "distinct_classes", "slop_score",
           "quality"]
MAX_ROUGE_TOKENS = 20_000  # per response, for homogenization only


def compression_ratio(texts):
    """As `diversity.compression_ratio(texts, 'gzip')`: the joined text, gzip-compressed and written as a gzip file."""
    raw = " ".join(texts).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="compressed.gz", mode="wb", fileobj=buf) as f:
        f.write(gzip.compress(raw))
    return len(raw) / len(buf.getvalue())


def ngram_diversity(texts, max_n=4):
    words = " ".join(texts).split(" ")
    score = 0.0
    for n in range(1, max_n + 1):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        score += len(set(grams)) / len(grams) if grams else 0.0
    return score


def distinct_n(texts, n):
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# scripts written without spaces between words, whose every character is a token: Thai, Lao, Myanmar, Khmer, kana,
# CJK ideographs (a word of them would be a whole sentence)
UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff" \
           "\uff66-\uff9f\U00020000-\U0003134f"


@functools.cache
def word_pattern():
    """A token of ROUGE-L: one character of an unspaced script, or a word of any other script (a run of letters,
    combining marks and digits: Unicode categories L, M and N). Built once: about 0.4 s over every code point."""
    unspaced = re.compile(f"[{UNSPACED}]")
    word, start = [], None
    for code in range(sys.maxunicode + 2):
        char = chr(min(code, sys.maxunicode))
        inside = code <= sys.maxunicode and unicodedata.category(char)[0] in "LMN" and not unspaced.match(char)
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            word.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    return re.compile(f"[{UNSPACED}]|[{''.join(word)}]+")


def rouge_tokens(text):
    """Lower-cased words of any script, each character of an unspaced one a token (ASCII text: runs of a-z0-9)."""
    return word_pattern().findall(text.lower())


def lcs_length(a, b):
    """Longest common subsequence of two token lists, bit-parallel (Allison-Dix / Hyyro): bit i of the Python int v
    is row i of the DP's column differences, so each token of b costs a few len(a)-bit integer operations."""
    masks = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | 1 << i  # bit i set where a[i] == x
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()  # one zero bit per matched token


def rouge_l(a, b):
    """ROUGE-L F1 of two token lists."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def homogenization(texts):
    """Mean ROUGE-L F1 over pairs of responses (F1 is symmetric, so each unordered pair once). Two responses without
    a word (punctuation, emoji) have nothing to compare: such a pair is left out, and a prompt of no other pair has
    no value (None), never a score."""
    toks = [rouge_tokens(t)[:MAX_ROUGE_TOKENS] for t in texts]
    scores = [rouge_l(toks[i], toks[j]) for i in range(len(toks)) for j in range(i + 1, len(toks))
              if toks[i] or toks[j]]
    return sum(scores) / len(scores) if scores else None


def read_samples(path):
    prompts = OrderedDict()
    for source, rec in read_jsonl(path):
        for key in ("prompt", "response"):
            if key not in rec:
                raise DataError(f"{source}: missing field {key!r}")
        if not isinstance(rec["response"], str):
            raise DataError(f"{source}: 'response' must be a string")
        key = str(rec.get("prompt_id", json.dumps(rec["prompt"])))
        if key in prompts and prompts[key]["prompt"] != rec["prompt"]:  # 1 and "1" are one key: never two prompts
            raise DataError(f"{source}: prompt_id {rec['prompt_id']!r} names another prompt than on an earlier line")
        prompts.setdefault(key, {"prompt": rec["prompt"], "responses": []})["responses"].append(rec["response"])
    if not prompts:
        raise DataError(f"{path}: no samples (the file is empty)")
    return prompts


def resample_means(values, n=1000, seed=0):
    """values (P,) or (P, K) per prompt -> (n,) or (n, K) means of n bootstrap resamples of the prompts; the K
    columns of a resample share its prompts, so paired columns stay paired."""
    v = torch.as_tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return v[torch.randint(0, len(v), (n, len(v)), generator=g)].mean(1)


def interval(samples):
    return [samples.quantile(0.025).item(), samples.quantile(0.975).item()]


def bootstrap(values, n=1000, seed=0):
    return interval(resample_means(values, n, seed))


def sign_flip_p(diff, exact_up_to=16, n_perm=10_000, seed=0):
    """Two-sided paired permutation p-value of mean(diff) = 0, flipping the sign of each prompt's difference:
    exact over all 2^P sign vectors for P <= exact_up_to prompts, else (count + 1) / (n_perm + 1) over seeded
    random ones."""
    diff = torch.as_tensor(diff, dtype=torch.float64)  # (P,)
    P = len(diff)
    if P <= exact_up_to:
        signs = 1 - 2 * ((torch.arange(2 ** P)[:, None] >> torch.arange(P)) & 1)  # (2^P, P): every sign vector
    else:
        signs = 1 - 2 * torch.randint(0, 2, (n_perm, P), generator=torch.Generator().manual_seed(seed))  # (n_perm, P)
    stats = (signs.to(diff.dtype) @ diff).abs()  # (S,) |sum| of each flipped set; the mean up to the factor P
    extreme = (stats >= diff.sum().abs() - 1e-9 * diff.abs().sum()).sum().item()  # float-rounding ties count
    return extreme / len(signs) if P <= exact_up_to else (extreme + 1) / (n_perm + 1)


def with_two_samples(runs):
    """Each run's prompts with 2+ samples (a single sample has no diversity); DataError for a run left empty."""
    kept = {name: {k: v for k, v in prompts.items() if len(v["responses"]) >= 2} for name, prompts in runs.items()}
    for name, prompts in kept.items():
        if not prompts:
            raise DataError(f"{name}: no prompt has two or more samples: diversity is undefined")
    return kept


def shared_prompts(kept, baseline):
    """{run: the prompt keys it shares with the baseline, in the baseline's order} for every other run."""
    if baseline not in kept:
        raise DataError(f"--baseline {baseline!r} is not a run name (runs: {', '.join(kept)})")
    shared = {name: [k for k in kept[baseline] if k in prompts] for name, prompts in kept.items() if name != baseline}
    for name, keys in shared.items():
        if len(keys) < 2:
            raise DataError(f"{name} and the baseline {baseline} share {len(keys)} prompt(s) with 2+ samples in "
                            "both; paired statistics need 2")
    return shared


def per_prompt(kept, semantic, style, quality, class_threshold=CLASS_THRESHOLD):
    """kept: {name: {prompt key: {"prompt", "responses"}}} -> {name: {metric: {prompt key: value}}}."""
    pools = [(name, key, v) for name, prompts in kept.items() for key, v in prompts.items()]
    texts = [r for _, _, v in pools for r in v["responses"]]
    group = torch.tensor([i for i, (_, _, v) in enumerate(pools) for _ in v["responses"]])
    meaning = semantic(texts)  # (M, D)
    per_text = {"semantic_diversity": mean_cosine_distance(meaning, group),
                "style_diversity": mean_cosine_distance(style(texts), group)}  # style standardised over all runs
    prompt_texts = [v["prompt"] for _, _, v in pools for _ in v["responses"]]
    per_text["quality"] = torch.tensor(quality(prompt_texts, texts), dtype=torch.float64)
    values, offset = {name: {m: {} for m in METRICS} for name in kept}, 0
    for name, key, v in pools:
        rs, n, row = v["responses"], len(v["responses"]), values[name]
        for m in ("semantic_diversity", "style_diversity", "quality"):
            row[m][key] = per_text[m][offset:offset + n].mean().item()
        row["compression_ratio"][key] = compression_ratio(rs)
        row["ngram_diversity"][key] = ngram_diversity(rs)
        row["homogenization"][key] = homogenization(rs)
        row["distinct_1"][key] = distinct_n(rs, 1)
        row["distinct_2"][key] = distinct_n(rs, 2)
        row["length"][key] = sum(len(r.split()) for r in rs) / n
        row["vendi_score"][key] = vendi_score(meaning[offset:offset + n])
        row["effective_rank"][key] = effective_rank(meaning[offset:offset + n])
        row["distinct_classes"][key] = distinct_classes(meaning[offset:offset + n], class_threshold)
        row["slop_score"][key] = slop_score(rs)
        offset += n
    return values


def paired(rows, base, keys):
    """rows, base: {metric: {prompt key: value}} of a run and the baseline -> per metric the mean of the per-prompt
    differences over keys, its paired bootstrap interval, sign-flip p and the SD of the per-prompt differences (for
    power analyses); quality also relative, in percent."""
    out = {}
    for m in METRICS:
        defined = [k for k in keys if rows[m][k] is not None and base[m][k] is not None]
        if not defined:  # a metric no shared prompt has (homogenization of texts without words)
            out[m] = {"diff": None, "ci95": None, "p_value": None, "prompts": 0, "per_prompt_sd": None}
            continue
        x = torch.tensor([[rows[m][k] - base[m][k], base[m][k]] for k in defined], dtype=torch.float64)  # (P, 2)
        diff, means = x[:, 0], resample_means(x)  # (P,), (n, 2): each resample's mean difference and baseline
        out[m] = {"diff": diff.mean().item(), "ci95": interval(means[:, 0]), "p_value": sign_flip_p(diff),
                  "prompts": len(defined), "per_prompt_sd": diff.std().item() if len(defined) > 1 else 0.0}
        if m == "quality":
            scale = x[:, 1].mean().abs().item()
            ratio = 100 * means[:, 0] / means[:, 1].abs()  # (n,) percent of each resample's |baseline mean|
            out[m].update(relative_pct=100 * out[m]["diff"] / scale if scale else None,
                          relative_ci95=interval(ratio) if ratio.isfinite().all() else None)
    return out


def summary(values):
    """{prompt key: value} -> the mean and bootstrap interval over the prompts where the metric has a value; the
    others are listed in "undefined_prompts", and with none the mean is None: what cannot be computed is no score."""
    defined, undefined = [v for v in values.values() if v is not None], [k for k, v in values.items() if v is None]
    out = {"mean": sum(defined) / len(defined), "ci95": bootstrap(defined)} if defined else {"mean": None, "ci95": None}
    return {**out, "undefined_prompts": undefined} if undefined else out


def evaluate(runs, semantic, style, quality, baseline=None, class_threshold=CLASS_THRESHOLD):
    """runs: {name: {prompt key: {"prompt", "responses"}}} -> {name: metrics dict}; with a baseline, every other
    run's metrics also hold "vs_baseline", its paired differences to the baseline run."""
    kept = with_two_samples(runs)
    shared = shared_prompts(kept, baseline) if baseline else {}
    values = per_prompt(kept, semantic, style, quality, class_threshold)
    results = {}
    for name, rows in values.items():
        results[name] = {"prompts": len(kept[name]), "samples": sum(len(v["responses"]) for v in kept[name].values()),
                         "skipped_prompts": sorted(set(runs[name]) - set(kept[name])),
                         **{m: summary(r) for m, r in rows.items()},
                         "per_prompt": rows}  # {metric: {prompt key: value}}: for pooled and power analyses
        if name in shared:
            results[name].update(baseline=baseline, vs_baseline=paired(rows, values[baseline], shared[name]))
    return results


def span(value, ci, fmt="+.3f", unit=""):
    return f"{value:{fmt}}{unit} [{ci[0]:{fmt}}{unit}, {ci[1]:{fmt}}{unit}]"


def relative(q):
    return span(q["relative_pct"], q["relative_ci95"], "+.1f", "%") if q["relative_ci95"] else "n/a"


def markdown_table(results):
    head = "| run | prompts | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    body = ""
    for name, r in results.items():
        cells = [f"{r[m]['mean']:.3f} [{r[m]['ci95'][0]:.3f}, {r[m]['ci95'][1]:.3f}]" if r[m]["mean"] is not None
                 else "n/a" for m in METRICS]
        body += f"| {name} | {r['prompts']} | " + " | ".join(cells) + " |\n"
    return head + body


def difference_table(results, baseline):
    head = (f"difference to {baseline} (mean of per-prompt differences [paired 95% bootstrap interval], "
            "sign-flip p; prompts: shared with the baseline)\n\n| run | prompts | " + " | ".join(METRICS)
            + " | quality % |\n|---|---|" + "---|" * (len(METRICS) + 1) + "\n")
    body = ""
    for name, r in results.items():
        if "vs_baseline" in r:
            v = r["vs_baseline"]
            cells = [f"{span(v[m]['diff'], v[m]['ci95'])} p={v[m]['p_value']:.2g}" if v[m]["diff"] is not None
                     else "n/a" for m in METRICS]
            body += f"| {name} | {v['quality']['prompts']} | " + " | ".join(cells + [relative(v["quality"])]) + " |\n"
    return head + body


def reading(results):
    """One line per run with a baseline: its paired differences in semantic and style diversity and in quality."""
    lines = []
    for name, r in results.items():
        if "vs_baseline" in r:
            v, q = r["vs_baseline"], r["vs_baseline"]["quality"]
            parts = [f"{m.replace('_', ' ')} {span(v[m]['diff'], v[m]['ci95'])} (p={v[m]['p_value']:.2g})"
                     for m in ("semantic_diversity", "style_diversity")]
            parts.append(f"quality {relative(q) if q['relative_ci95'] else span(q['diff'], q['ci95'])} "
                         f"(p={q['p_value']:.2g})")
            lines.append(f"{name} - {r['baseline']}: " + ", ".join(parts))
    return lines


def errorbar(ax, name, color, x, x_ci, y, y_ci):
    ax.errorbar(x, y, xerr=[[x - x_ci[0]], [x_ci[1] - x]], yerr=[[y - y_ci[0]], [y_ci[1] - y]], fmt="o", capsize=3,
                color=color)
    ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))


def plot(results, path, x="semantic_diversity", y="quality"):
    """Quality against semantic diversity per run; with a baseline, a second panel of the paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: f"C{i % 10}" for i, name in enumerate(results)}  # a run keeps its colour in both panels
    paired_runs = {name: r for name, r in results.items() if "vs_baseline" in r}
    fig, axes = plt.subplots(1, 2 if paired_runs else 1, figsize=(12 if paired_runs else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    for name, r in results.items():
        errorbar(ax, name, colors[name], r[x]["mean"], r[x]["ci95"], r[y]["mean"], r[y]["ci95"])
    ax.set_xlabel(x.replace("_", " ") + " (higher = more diverse)")
    ax.set_ylabel(y)
    ax.set_title("Quality against diversity (95% bootstrap CI over prompts)")
    ax.grid(alpha=0.3)
    if paired_runs:
        ax, baseline = axes[0, 1], next(iter(paired_runs.values()))["baseline"]
        for name, r in paired_runs.items():
            v = r["vs_baseline"]
            errorbar(ax, name, colors[name], v[x]["diff"], v[x]["ci95"], v[y]["diff"], v[y]["ci95"])
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"{x.replace('_', ' ')} - {baseline}")
        ax.set_ylabel(f"{y} - {baseline}")
        ax.set_title(f"Paired differences to {baseline} (95% bootstrap CI)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with written(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", nargs="+", help="samples JSONL files, one per run")
    p.add_argument("--names", nargs="*", help="run names, file-name-safe (default: file names)")
    p.add_argument("--baseline", help="a run name: report every other run's paired differences to it")
    p.add_argument("--output-dir", default="runs/eval", help="where metrics, report.md and plot.png go")
    p.add_argument("--semantic-embedder", default=DEFAULT_EMBEDDERS["semantic"],
                   help="semantic diversity's embedder: hub name, path or packaged:<name> (paper: "
                   "jinaai/jina-embeddings-v3)")
    p.add_argument("--style-embedder", default=DEFAULT_EMBEDDERS["style"],
                   help="style diversity's embedder: stylometric, or an encoder (paper: AnnaWegmann/Style-Embedding)")
    p.add_argument("--quality", default="proxy", help="proxy or reward-model:PATH")
    p.add_argument("--class-threshold", type=in_range(float, -1, 1), default=CLASS_THRESHOLD,
                   help="distinct_classes: two samples are one class at this cosine similarity of their semantic "
                        "embeddings or above")
    p.add_argument("--trust-remote-code", action="store_true", help="run the embedders' own code from their "
                   "directory or hub repo (jinaai/jina-embeddings-v3 needs it); only for models you trust")
    return p.parse_args(argv)


def check_names(names, samples):
    files = [(os.stat(s).st_dev, os.stat(s).st_ino) if os.path.exists(s) else s for s in samples]
    for s, f in zip(samples, files):
        if files.count(f) > 1:  # by any path, link or hard link
            raise DataError(f"{s}: the same samples file is given twice")
    if len(names) != len(samples):
        raise DataError(f"--names: {len(names)} names for {len(samples)} samples files")
    for name in names:
        if not name or name.startswith(".") or "/" in name or "\\" in name or ".." in name:
            raise DataError(f"--names: {name!r} is not a safe file name (empty, leading '.', '/', '\\' or '..')")
    if len(set(names)) != len(names):
        raise DataError(f"--names: run names must be distinct (default: the file names), got {' '.join(names)}")


def run(args):
    names = args.names if args.names is not None else [os.path.splitext(os.path.basename(s))[0] for s in args.samples]
    check_names(names, args.samples)
    check_output_dir(args.output_dir)
    runs = {name: read_samples(path) for name, path in zip(names, args.samples)}
    kept = with_two_samples(runs)
    if args.baseline:
        shared_prompts(kept, args.baseline)  # pairing errors before any model loads
    try:
        quality = load_scorer(args.quality)
    except ValueError as e:
        raise DataError(f"--quality: {e}") from None
    results = evaluate(runs, load_embedder(args.semantic_embedder, trust_remote_code=args.trust_remote_code),
                       load_embedder(args.style_embedder, trust_remote_code=args.trust_remote_code), quality,
                       args.baseline, args.class_threshold)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, r in results.items():
        atomic_write(os.path.join(args.output_dir, f"{name}.metrics.json"), json.dumps(r, indent=2))
        for key in r["skipped_prompts"]:
            print(f"warning: {name}: prompt {key} has fewer than 2 samples; left out", flush=True)
    report = markdown_table(results)
    if args.baseline:
        report += "\n" + difference_table(results, args.baseline) + "\n" + "\n".join(reading(results)) + "\n"
    atomic_write(os.path.join(args.output_dir, "report.md"), report)
    plot_path = os.path.join(args.output_dir, "plot.png")
    plot(results, plot_path)
    print(report + f"\nplot: {plot_path}", flush=True)
    return results


def main(argv=None):
    keep_freed_memory()
    one_line_errors(run, parse_args(argv))


if __name__ == "__main__":
    main()
