"""Kernel benchmarks: fused log-prob head and fused deviation loss against eager PyTorch, torch.compile and Liger.

    python -m bench.kernels                                   # on a GPU: 8 pairs x 1024 tokens, V = 49152 and 128256
    python -m bench.kernels --tokens 600 --vocab 49152 --hidden 576 --dtype float32 --sequence-tokens 150  # CPU
    python -m bench.kernels --vocab 49152 128256 --hidden 576 4096 --deviation-pairs   # the head only, H per V
Forward+backward time (median, p20, p80; triton.testing.do_bench on CUDA, wall-clock repeats on CPU), TFLOP/s
and peak memory above the inputs (CUDA). TFLOP/s counts the naive head's three (N, H, V) matmuls, 2 N H V FLOPs
each, for every implementation (the head alone does a fourth, the recompute; with the loss in its forward it does
not), so the column compares like with like. Rows go to bench/results.jsonl; the closing table is
printed in Markdown for bench/RESULTS.md. Liger-Kernel is used when installed, else skipped with a message.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import append_rows
from ddpo.deviation import chosen_weights, deviation_weights
from ddpo_kernels.deviation_loss import deviation_loss
from ddpo.losses import dpo_loss
from ddpo.models import pair_groups
from ddpo_kernels.logprobs import default_chunk_size, fused_logprobs, fused_logprobs_loss


def bench(fn, device, rep_ms=100, repeats=10):
    """(median, p20, p80) milliseconds and peak MiB of fn() (forward + backward): about rep_ms of timed calls on
    CUDA, `repeats` calls on CPU."""
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=rep_ms)
        return med, p20, p80, peak
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7], None


def logprob_rows(N, H, V, dtype, device, rep_ms=100, sequence_tokens=1024):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    grad = torch.randn(N, device=device, generator=g)

    def naive(h, w, lab):  # what a plain training loop does: logits, fp32 log_softmax, gather
        logits = h @ w.t()  # (N, V)
        return torch.log_softmax(logits.float(), -1).gather(-1, lab[:, None])[:, 0]

    impls = {"eager (logits+log_softmax+gather)": naive, "fused (ours)": fused_logprobs,
             "torch.compile (naive)": torch.compile(naive),
             "3 bare matmuls: logits, dX, dW (floor)": lambda h, w, lab: (h @ w.t()).sum(-1).float()}
    if device == "cpu":
        impls.pop("torch.compile (naive)")
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        impls["liger fused linear CE"] = lambda h, w, lab: -LigerFusedLinearCrossEntropyFunction.apply(
            h, w, lab, None, None, -100, 0.0, 0.0, "none")[0]
    except ImportError:
        print("liger-kernel not installed: skipping its row")
    steps = {}
    for name, fn in impls.items():
        def step(fn=fn):
            hidden.grad = weight.grad = None
            (fn(hidden, weight, labels) * grad).sum().backward()
        steps[name] = step
    steps.update(dpo_steps(hidden, weight, labels, sequence_tokens))
    rows = []
    flops = 3 * 2 * N * H * V
    for name, step in steps.items():
        med, p20, p80, peak = bench(step, device, rep_ms)
        rows.append({"bench": "logprobs", "impl": name, "N": N, "H": H, "V": V, "dtype": str(dtype).split(".")[-1],
                     "ms_median": med, "ms_p20": p20, "ms_p80": p80, "tflops": flops / med / 1e9, "peak_mib": peak})
    return rows


def dpo_steps(hidden, weight, labels, sequence_tokens):
    """The head with a DPO loss of pairs of sequence_tokens-token sequences: the fused head, then the loss (train's
    --no-fused-loss), and the loss in the head's forward (--fused-loss), grouped as ddpo.train groups pairs."""
    N, H, V = *hidden.shape, weight.shape[0]
    pairs = max(1, N // (2 * sequence_tokens))
    sequences = (torch.arange(N, device=hidden.device) // sequence_tokens).clamp(max=2 * pairs - 1)  # [chosen; rej.]
    ref_logps = torch.randn(2 * pairs, device=hidden.device) - 2.0 * sequence_tokens

    def dpo(group, logps):  # summed over the group's pairs, as train's micro-batch loss
        k = len(group) // 2
        return dpo_loss(logps[:k], logps[k:], ref_logps[group[:k]], ref_logps[group[k:]], 0.1)[0].sum()

    everything = torch.arange(2 * pairs, device=hidden.device)
    counts = torch.bincount(sequences, minlength=2 * pairs)
    groups = pair_groups(counts, pairs, default_chunk_size(N, V, H))

    def then_loss():
        hidden.grad = weight.grad = None
        logps = torch.zeros(2 * pairs, device=hidden.device).index_add(0, sequences,
                                                                       fused_logprobs(hidden, weight, labels))
        dpo(everything, logps).backward()

    def in_forward():
        hidden.grad = weight.grad = None
        fused_logprobs_loss(hidden, weight, labels, sequences, groups, dpo)[0].backward()

    return {f"fused, then DPO of {pairs} pairs (ours, --no-fused-loss)": then_loss,
            f"DPO of {pairs} pairs in the fused forward (ours, --fused-loss)": in_forward}


def eager_deviation_loss(logits, embs, group, chosen):
    """The unfused path: ddpo.deviation's vectorised weights, then the DDPO loss of each pair (losses (B,),)."""
    weights, _ = deviation_weights(embs, group)
    return (-chosen_weights(weights, chosen).to(logits.dtype) * F.logsigmoid(logits),)


def deviation_rows(pairs, group_size, dim, device, rep_ms=100):
    g = torch.Generator(device=device).manual_seed(0)
    n_groups = max(1, pairs * 2 // group_size)
    group = torch.arange(n_groups, device=device).repeat_interleave(group_size)
    embs = [torch.randn(len(group), dim, device=device, generator=g) for _ in range(2)]
    chosen = torch.arange(0, len(group), 2, device=device)[:pairs]
    logits = torch.randn(len(chosen), device=device, generator=g).requires_grad_()
    impls = {"eager (ddpo.deviation + loss)": lambda: eager_deviation_loss(logits, embs, group, chosen),
             "fused (ours)": lambda: deviation_loss(logits, embs, group, chosen, use_triton=device == "cuda")}
    rows = []
    for name, fn in impls.items():
        def step():
            logits.grad = None
            fn()[0].sum().backward()
        med, p20, p80, peak = bench(step, device, rep_ms)
        rows.append({"bench": "deviation_loss", "impl": name, "pairs": len(chosen), "group_size": group_size,
                     "dim": dim, "ms_median": med, "ms_p20": p20, "ms_p80": p80, "peak_mib": peak})
    return rows


def shape(r):
    """The shape column of a logprobs or deviation_loss row."""
    if r["bench"] == "logprobs":
        return f"N={r['N']} H={r['H']} V={r['V']} {r['dtype']}"
    return f"{r['pairs']} pairs, groups of {r['group_size']}, D={r['dim']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16 * 1024, help="N: 8 pairs x 1024 tokens x (chosen, rejected)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096], help="H: one for every --vocab, or one per vocab")
    ap.add_argument("--vocab", type=int, nargs="*", default=[49152, 128256], help="V of the head rows (none: no head)")
    ap.add_argument("--deviation-pairs", type=int, nargs="*", default=[8, 4096],
                    help="pairs of the deviation-loss rows, groups of 8, D 1024 (none: no deviation rows)")
    ap.add_argument("--sequence-tokens", type=int, default=1024, help="tokens per sequence of the DPO rows' pairs")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rep-ms", type=int, default=100, help="CUDA: milliseconds of timed calls a row (do_bench's rep)")
    ap.add_argument("--out", default="bench/results.jsonl")
    args = ap.parse_args()
    hidden = args.hidden * len(args.vocab) if len(args.hidden) == 1 else args.hidden
    if len(hidden) != len(args.vocab):
        ap.error("--hidden: one value, or one per --vocab")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    rows = [r for V, H in zip(args.vocab, hidden)
            for r in logprob_rows(args.tokens, H, V, dtype, device, args.rep_ms, args.sequence_tokens)]
    rows += [r for pairs in args.deviation_pairs for r in deviation_rows(pairs, 8, 1024, device, args.rep_ms)]
    append_rows(args.out, rows)
    print("| bench | impl | shape | median ms (p20-p80) | TFLOP/s | peak MiB |\n|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        tflops = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        print(f"| {r['bench']} | {r['impl']} | {shape(r)} | {r['ms_median']:.2f} ({r['ms_p20']:.2f}-{r['ms_p80']:.2f}) "
              f"| {tflops} | {peak} |")


if __name__ == "__main__":
    main()
