"""Training curves of several runs in one PNG, from their metrics.jsonl (offline: matplotlib's Agg backend).

    python -m ddpo.curves runs/dpo runs/ddpo --output curves.png
    python -m ddpo.curves runs/pipeline/dpo runs/pipeline/ddpo/metrics.jsonl --names dpo ddpo --output curves.png

Each run is a ddpo.train output directory or its metrics.jsonl; one colour per run in every panel:
  loss                    loss of each logged step (solid) and eval_loss on --eval-data (dashed, markers)
  reward margin           rewards/margins and eval_rewards/margins, the same way
  chosen weights          weights/mean of each logged step, with its min-max band
  sampled diversity       eval_semantic_diversity (solid) and eval_style_diversity (dashed) of the --eval-prompts
                          samples
  sampled quality         eval_quality of the same samples
  quality vs diversity    the trajectory (eval_semantic_diversity, eval_quality), step by step, its first and last
                          step labelled
A panel with nothing to draw says so (a run without evaluations has no eval_ curves). A line that is not a metrics
row (no integer "step") is an error with file:line, before anything is drawn.
"""

import argparse
import os

from ddpo.data import DataError
from ddpo.files import check_writable, one_line_errors, written
from ddpo.sources import read_jsonl

LINES = [  # panel title, y label, [(metrics key, line style)]; evaluation rows (eval_ keys) get markers
    ("loss", "loss", [("loss", "-"), ("eval_loss", "--")]),
    ("reward margin", "rewards/margins", [("rewards/margins", "-"), ("eval_rewards/margins", "--")]),
    ("chosen weights (mean, min-max band)", "weight", [("weights/mean", "-")]),
    ("sampled diversity (solid: semantic, dashed: style)", "mean pairwise cosine distance",
     [("eval_semantic_diversity", "-"), ("eval_style_diversity", "--")]),
    ("sampled quality", "quality", [("eval_quality", "-")]),
]


def metrics_file(run):
    return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run


def read_run(run):
    """The metrics rows of a run directory or metrics.jsonl; DataError naming the file (and line) otherwise."""
    path = metrics_file(run)
    if not os.path.isfile(path):
        raise DataError(f"{run}: no metrics.jsonl (not a ddpo.train output directory)")
    rows = []
    for source, row in read_jsonl(path):
        if type(row.get("step")) is not int:
            raise DataError(f"{source}: not a metrics line of ddpo.train (no integer 'step')")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no metrics rows")
    return rows


def series(rows, *keys):
    """(steps, [values of each key]) of the rows that hold every key, by step."""
    points = sorted((r["step"], [r[k] for k in keys]) for r in rows
                    if all(isinstance(r.get(k), (int, float)) for k in keys))
    return [s for s, _ in points], [[v[i] for _, v in points] for i in range(len(keys))]


def plot_curves(runs, path):
    """runs: {name: metrics rows} -> a 2 x 3 PNG at path (written to a temporary file and renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = list(axes.flat)
    for ax, (title, ylabel, keys) in zip(panels, LINES):
        drawn = False
        for i, (name, rows) in enumerate(runs.items()):
            for key, style in keys:
                steps, (values,) = series(rows, key)
                if steps:
                    ax.plot(steps, values, color=f"C{i % 10}", ls=style,
                            marker="o" if key.startswith("eval_") else None, ms=3, label=f"{name} {key}")
                    drawn = True
            if title.startswith("chosen weights"):
                steps, (low, high) = series(rows, "weights/min", "weights/max")
                if steps:
                    ax.fill_between(steps, low, high, color=f"C{i % 10}", alpha=0.15)
        finish(ax, title, ylabel, drawn)
    ax, drawn = panels[5], False
    for i, (name, rows) in enumerate(runs.items()):
        steps, (diversity, quality) = series(rows, "eval_semantic_diversity", "eval_quality")
        if steps:
            ax.plot(diversity, quality, color=f"C{i % 10}", marker="o", ms=3, label=name)
            ends = {(diversity[j], quality[j]): [] for j in (0, -1)}  # one label where first and last coincide
            for j in dict.fromkeys((0, len(steps) - 1)):
                ends[diversity[j], quality[j]].append(str(steps[j]))
            for (x, y), labels in ends.items():
                ax.annotate(f"{name} step{'s' if len(labels) > 1 else ''} {', '.join(labels)}", (x, y),
                            textcoords="offset points", xytext=(5, 5), fontsize=8)
            drawn = True
    ax.set_xlabel("eval_semantic_diversity (higher = more diverse)")
    finish(ax, "quality against diversity, step by step", "eval_quality", drawn)
    fig.tight_layout()
    with written(path) as tmp:
        fig.savefig(tmp, dpi=110, format=image_format(path))  # the format its name says (c.pdf is a PDF)
    plt.close(fig)


def image_format(path):
    """The image format of an output name: its extension if matplotlib writes it, PNG without one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if ext not in FigureCanvasAgg.get_supported_filetypes():
        raise DataError(f"--output {path}: cannot write .{ext} images; name it .png, .pdf or .svg")
    return ext


def finish(ax, title, ylabel, drawn):
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if not drawn:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    if not ax.get_xlabel():
        ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="ddpo.train output directories (or their metrics.jsonl)")
    p.add_argument("--names", nargs="*", help="run names (default: the directory names)")
    p.add_argument("--output", default="curves.png", help="the image to write, in the format its name says (.png, "
                   ".pdf, .svg)")
    return p.parse_args(argv)


def run(args):
    names = args.names if args.names is not None else [
        os.path.basename(os.path.dirname(os.path.abspath(metrics_file(r)))) for r in args.runs]
    if len(names) != len(args.runs):
        raise DataError(f"--names: {len(names)} names for {len(args.runs)} runs")
    if len(set(names)) != len(names):
        raise DataError(f"--names: run names must be distinct (default: the directory names), got {' '.join(names)}")
    check_writable(args.output)
    image_format(args.output)
    runs = {name: read_run(r) for name, r in zip(names, args.runs)}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    plot_curves(runs, args.output)
    print(f"curves: {args.output}", flush=True)
    return args.output


def main(argv=None):
    one_line_errors(run, parse_args(argv))


if __name__ == "__main__":
    main()
