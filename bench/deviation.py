"""Deviation throughput (responses per second): ddpo.deviation's vectorised weights against a per-prompt loop.

    python -m bench.deviation --prompts 2000 --responses 8 --dim 384 --metrics 2
The loop is the paper's reference arithmetic: for every prompt, every pair of responses, in Python/NumPy.
Rows are appended to bench/results.jsonl; copy the table into bench/RESULTS.md.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from bench.common import append_rows
from ddpo.deviation import deviation_weights


def loop_weights(embs_per_metric, sizes):
    out, start = [], 0
    for n in sizes:
        p = np.ones(n)
        for embs in embs_per_metric:
            e = embs[start:start + n]
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            dev = np.array([np.mean([1 - e[i] @ e[j] for j in range(n) if j != i]) for i in range(n)])
            d = np.zeros(n) if np.ptp(dev) <= 1e-6 else 2 * (dev - dev.min()) / np.ptp(dev) - 1
            p *= ((d + 1) / 2) ** (1 / len(embs_per_metric))
        out.append(p / p.mean() if p.mean() > 0 else np.ones(n))
        start += n
    return np.concatenate(out)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--responses", type=int, default=8, help="mean responses per prompt (sizes drawn 2..2*mean-2)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--metrics", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 2 * args.responses - 1, (args.prompts,), generator=g).tolist()
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    embs = [torch.randn(len(group), args.dim, generator=g) for _ in range(args.metrics)]
    t_vec, (w, _) = timed(lambda: deviation_weights(embs, group), args.repeats)
    t_loop, w_loop = timed(lambda: loop_weights([e.double().numpy() for e in embs], sizes), 1)
    assert np.allclose(w.numpy(), w_loop, atol=1e-8), "vectorised and loop weights differ"
    rows = [{"bench": "deviation", "impl": impl, "responses": len(group), "prompts": args.prompts, "dim": args.dim,
             "metrics": args.metrics, "seconds": t, "responses_per_s": len(group) / t}
            for impl, t in (("vectorised", t_vec), ("per-prompt loop", t_loop))]
    append_rows(args.out, rows)
    for r in rows:
        print(f"{r['impl']:>16}: {r['responses']} responses in {r['seconds']:.4f} s = "
              f"{r['responses_per_s']:,.0f} responses/s")
    print(f"speed-up {t_loop / t_vec:.1f}x")


if __name__ == "__main__":
    main()
