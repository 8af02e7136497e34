"""GPU readiness without a GPU: every Triton kernel compiled ahead of time for sm_80 and sm_90.

The CPU tests run the kernels under TRITON_INTERPRET=1, which never sees the GPU compiler (layouts, ptxas). Here a
subprocess without TRITON_INTERPRET (under it @triton.jit yields interpreter functions that cannot be compiled)
drives the real launchers on CPU tensors with each kernel swapped for a recorder, so the configurations are the ones
the launchers choose: pointer dtypes (fp32 / bf16 / fp16 logits, also under autocast; int64 labels; int32
offsets), constexprs (BLOCK_V from _block_v, K, WEIGHT_INSIDE, BLOCK_N, BLOCK_D) and Triton's own specialisation
of the arguments (16-divisible ints and pointers), bound as the JIT launcher binds them. Each distinct configuration
is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) through TTIR, TTGIR, LLVM IR,
PTX and the cubin from the ptxas in Triton's wheel. Registers and spills come from that ptxas run's log (the
compiled kernel's n_regs / n_spills need the CUDA driver).

Fails on any compile error; spills are reported (a warning), not failures. `pytest -s` prints the full table
(kernel, configuration, registers, spill bytes, stack, shared memory, compile seconds); without -s one summary line
per kernel and arch is printed.
Standalone: `python tests/test_kernels_compile.py OUT.json` (TRITON_INTERPRET unset) writes the results as JSON.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest

pytestmark = pytest.mark.slow  # ahead-of-time compilation: python -m pytest -m 'not slow' skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)  # A100, H100
# vocabulary sizes of the tiny test model, small / Llama-2 / SmolLM2 / GPT-2 / Llama-3
VOCABS = (259, 1000, 2000, 32000, 49152, 50257, 128256)
LOGIT_DTYPES = ("float32", "bfloat16", "float16")
# deviation loss: (embedding dims, one per metric; responses per prompt) -> K, BLOCK_D (padded D), BLOCK_N
DEVIATION_SHAPES = [
    ((8,), 4), ((8,), 50), ((8,), 200),  # BLOCK_D 16 x BLOCK_N 16, 64, 256
    ((384,), 4), ((384,), 50), ((384,), 200),  # all-MiniLM-L6-v2: BLOCK_N 16, 64, 256 (BLOCK_D 128, 64, 16)
    ((95,), 4), ((95,), 50), ((95,), 200),  # the stylometric profile: D not a multiple of 16
    ((95,), 300), ((95,), 600), ((17,), 3000),  # over 256 responses: 512 x 8, 1024 x 4, 4096 x 1 at 16 warps
    ((384, 95), 4), ((384, 95), 50),  # both metrics: K=2, BLOCK_D 128, 64
    ((16, 8), 4), ((16, 8), 200),  # K=2, BLOCK_D 16
]


# ---------------------------------------------------------------- subprocess side (no TRITON_INTERPRET)

def _capture_launches():
    """Run the launchers on CPU tensors with each kernel replaced by a recorder: [(JITFunction, args, kwargs)]."""
    import torch

    import ddpo_kernels.deviation_loss as dl
    import ddpo_kernels.logprobs as lp

    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    patched = [(lp, "_logprobs_fwd_kernel"), (lp, "_logprobs_bwd_kernel"), (dl, "_deviation_loss_kernel")]
    originals = [getattr(mod, name) for mod, name in patched]
    for mod, name in patched:
        setattr(mod, name, Recorder(getattr(mod, name)))
    try:
        g = torch.Generator().manual_seed(0)
        for V in VOCABS:
            for dtype_name in LOGIT_DTYPES:
                dtype = getattr(torch, dtype_name)
                runs = [(dtype, contextlib.nullcontext())]
                if dtype != torch.float32:  # fp32 weights under autocast, as in mixed-precision training
                    runs.append((torch.float32, torch.autocast("cpu", dtype=dtype)))
                # chunk_size=1: row slices of labels / lse off 16-byte alignment (one vocabulary is enough)
                for chunk_size in (None, 1) if V == VOCABS[0] else (None,):
                    for param_dtype, ctx in runs:
                        N, H = 3, 16
                        hidden = torch.randn(N, H, generator=g).to(param_dtype).requires_grad_()
                        weight = torch.randn(V, H, generator=g).to(param_dtype).requires_grad_()
                        labels = torch.randint(0, V, (N,), generator=g)
                        with ctx:
                            out = lp.fused_logprobs(hidden, weight, labels, chunk_size=chunk_size, use_triton=True)
                        out.float().sum().backward()
        for dims, n in DEVIATION_SHAPES:
            for inside in (False, True):
                group = torch.arange(2).repeat_interleave(n)  # two prompts of n responses
                embeddings = [torch.randn(2 * n, d, generator=g) for d in dims]
                chosen = torch.tensor([0, n])
                logits = torch.randn(2, generator=g, requires_grad=True)
                dl.deviation_loss(logits, embeddings, group, chosen, 0.2, inside, use_triton=True)
    finally:
        for (mod, name), fn in zip(patched, originals):
            setattr(mod, name, fn)
    return calls


def _ptxas_usage(log, name):
    """(registers, spill store bytes, spill load bytes, stack bytes) of entry `name` in a `ptxas -v` log, or None."""
    entry = log.find(f"entry function '{name}'")
    if entry < 0:
        return None
    regs = re.search(r"Used (\d+) registers", log[entry:])
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log[entry:])
    if regs is None or frame is None:
        return None
    return int(regs.group(1)), int(frame.group(2)), int(frame.group(3)), int(frame.group(1))


def _rerun_ptxas(kernel, arch):
    """Fallback when Triton's own ptxas log is not available: `ptxas -v` on the kernel's PTX, with Triton's flags."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o", ptx + ".o"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _label(fn, signature, constexprs, attrs):
    """'logits=bf16 BLOCK_V=4096 not16:V': the input's dtype, the constexprs, the arguments not 16-divisible."""
    names = fn.arg_names
    consts = " ".join(f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items()) if names[k[0]] != "IGNORE")
    first = next(n for n, t in signature.items() if t.startswith("*"))
    divisible = {names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v}
    not16 = [n for n, t in signature.items() if t != "constexpr" and not t.startswith("fp") and n not in divisible]
    return (f"{first.removesuffix('_ptr')}={signature[first][1:]} {consts}"
            + (f" not16:{','.join(not16)}" if not16 else ""))


def compile_all(archs=ARCHS):
    """Compile every distinct launch configuration for every arch; one result dict per (arch, configuration)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    import ddpo_kernels.logprobs as lp

    assert os.path.dirname(os.path.dirname(os.path.abspath(lp.__file__))) == ROOT, lp.__file__
    calls = _capture_launches()
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints its `ptxas -v` log; captured below
    results, seen = [], set()
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binders = {}
        for fn, args, kwargs in calls:
            # bind and specialise exactly as JITFunction.run does on a GPU (create_binder minus the driver)
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, opts = binders[fn](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
            key = (arch, fn.__name__, json.dumps(signature), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(options))
            if key in seen:
                continue
            seen.add(key)
            row = {"arch": arch, "kernel": fn.__name__, "config": _label(fn, signature, constexprs, attrs),
                   "constexprs": {fn.arg_names[k[0]]: v for k, v in constexprs.items()}, "signature": signature}
            log = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):
                    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                            options=options.__dict__)
            except Exception as e:  # every configuration is tried; the test lists all failures
                row["error"] = f"{type(e).__name__}: {e}"[-3000:]
                results.append(row)
                continue
            row["seconds"] = round(time.perf_counter() - start, 2)
            usage, row["usage_from"] = _ptxas_usage(log.getvalue(), kernel.name), "triton's ptxas log"
            if usage is None:
                usage, row["usage_from"] = _ptxas_usage(_rerun_ptxas(kernel, arch), kernel.name), "ptxas -v rerun"
            if usage is not None:
                row["n_regs"], row["spill_stores"], row["spill_loads"], row["stack"] = usage
                row["n_spills"] = row["spill_stores"] + row["spill_loads"]
            row["shared"], row["num_warps"] = kernel.metadata.shared, kernel.metadata.num_warps
            row["cubin_bytes"] = len(kernel.asm["cubin"])
            results.append(row)
    return results


# ---------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a fresh cache: ptxas runs (and logs) for every configuration
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp / "results.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"AOT compilation subprocess failed ({proc.returncode}):\n"
                    f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    with open(tmp / "results.json") as f:
        results = json.load(f)
    print(f"\nAOT compile subprocess: {len(results)} kernel builds in {time.perf_counter() - start:.1f} s")
    return results


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm{a}" for a in ARCHS])
def test_kernels_compile(compiled, arch, capsys):
    rows = sorted((r for r in compiled if r["arch"] == arch), key=lambda r: r["kernel"])  # stable: launch order within
    w = max(len(r["config"]) for r in rows) + 2
    sources = sorted({r["usage_from"] for r in rows if "usage_from" in r})
    print(f"\nsm_{arch} (registers and spills from {', '.join(sources)})\n"
          f"{'kernel':<24}{'config':<{w}}{'regs':>5}{'spill st/ld B':>15}{'stack':>6}{'shared':>7}{'s':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<24}{r['config']:<{w}}  COMPILE ERROR")
        else:
            print(f"{r['kernel']:<24}{r['config']:<{w}}{r.get('n_regs', '?'):>5}"
                  f"{str(r.get('spill_stores', '?')) + '/' + str(r.get('spill_loads', '?')):>15}"
                  f"{r.get('stack', '?'):>6}{r['shared']:>7}{r['seconds']:>6}")
    summary = []
    for name in sorted({r["kernel"] for r in rows}):
        ok = [r for r in rows if r["kernel"] == name and "error" not in r and "n_regs" in r]
        n = sum(r["kernel"] == name for r in rows)
        line = f"sm_{arch} {name}: {len(ok)}/{n} configs compiled"
        if ok:
            line += (f", registers {min(r['n_regs'] for r in ok)}-{max(r['n_regs'] for r in ok)}, "
                     f"spills in {sum(r['n_spills'] > 0 for r in ok)}")
        summary.append(line)
    spilling = [f"{r['kernel']} [{r['config']}]: {r['spill_stores']} B stored / {r['spill_loads']} B loaded "
                f"({r['n_regs']} registers)" for r in rows if r.get("n_spills")]
    for line in spilling:
        print(f"WARNING: sm_{arch} spills: {line}")
    if spilling:
        warnings.warn(f"sm_{arch}: {len(spilling)} kernel configurations spill registers:\n" + "\n".join(spilling))
    with capsys.disabled():  # the short summary, also without -s
        print("\n" + "\n".join(summary))

    errors = [r for r in rows if "error" in r]
    if errors:
        pytest.fail(f"sm_{arch}: {len(errors)} configurations do not compile:\n"
                    + "\n".join(f"  {r['kernel']} [{r['config']}]" for r in errors)
                    + f"\nfirst error ({errors[0]['kernel']} [{errors[0]['config']}]):\n{errors[0]['error']}",
                    pytrace=False)
    unreported = [f"{r['kernel']} [{r['config']}]" for r in rows if "n_regs" not in r]
    assert not unreported, f"no registers / spills from ptxas for: {unreported}"
    for r in rows:
        assert isinstance(r["n_spills"], int) and r["n_spills"] >= 0  # reported (0 = no spills); not required to be 0
    assert {r["kernel"] for r in rows} == {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_deviation_loss_kernel"}


def test_configurations_cover_the_launchers(compiled):
    """The recorded launches reach every constexpr value the launchers pick for the representative shapes."""
    from ddpo_kernels.logprobs import _block_v

    for arch in ARCHS:
        rows = [r for r in compiled if r["arch"] == arch]
        for name in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
            lp = [r for r in rows if r["kernel"] == name]
            assert {r["constexprs"]["BLOCK_V"] for r in lp} == {_block_v(V) for V in VOCABS}
            assert {r["signature"]["logits_ptr"] for r in lp} == {"*fp32", "*bf16", "*fp16"}
            assert {r["signature"]["labels_ptr"] for r in lp} == {"*i64"}
        dev = [r for r in rows if r["kernel"] == "_deviation_loss_kernel"]
        assert {r["constexprs"]["K"] for r in dev} == {1, 2}
        assert {r["constexprs"]["WEIGHT_INSIDE"] for r in dev} == {False, True}
        assert {r["constexprs"]["BLOCK_N"] for r in dev} == {16, 64, 256, 512, 1024, 4096}
        assert {r["constexprs"]["BLOCK_D"] for r in dev} == {1, 4, 8, 16, 64, 128}
        assert {r["num_warps"] for r in dev} == {4, 8, 16}
        assert {r["signature"]["offsets_ptr"] for r in dev} == {"*i32"}


if __name__ == "__main__":  # python tests/test_kernels_compile.py OUT.json (TRITON_INTERPRET unset)
    sys.path.insert(0, ROOT)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1: @triton.jit kernels would be interpreter functions; unset it")
    with open(sys.argv[1], "w") as f:
        json.dump(compile_all(), f)
    sys.exit(0)
