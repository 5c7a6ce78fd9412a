"""A/B of two builds of the native CPU kernel in one process, calls interleaved.

    # build the baseline from an older commit into its own tree, then:
    git worktree add /tmp/base <commit> && (cd /tmp/base && VQK_CUDA=OFF python setup.py build_ext --inplace)
    python benchmarks/ab_native.py /tmp/base/vqkernels/_C*.so [--threads 2] [--reps 15]

Both builds run the same Python wrapper (vqkernels.nearest_code / vq_quantize / residual_vq with
backend="cpu"); only the compiled module is swapped between calls, so the ratio is the kernels'
alone (--op residual_vq: --stages codebooks of the shape's K x D, --cosine for DAC's). Each shape
alternates baseline and candidate call by call and reports medians, their ratio, the median of
the per-rep ratios (each rep's two calls run back to back), the ratio of the fastest calls, and the fraction
of rows the candidate searched again exactly (its `cpu_exact_rows` counter; 0 for a baseline
without one). Shapes: the CPU benchmark's (benchmarks/test_bench_cpu.py), on its data (rows near
codes) and on plain randn rows and codes.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

import torch

import vqkernels
from vqkernels import native

SHAPES = [(8192, 512, 256), (8192, 256, 256), (8192, 64, 64), (32768, 512, 512), (65536, 4096, 64)]


def load_so(path: str, name: str = "vqk_baseline"):
    spec = importlib.util.spec_from_file_location(name + "._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def data(kind, N, K, D):
    g = torch.Generator().manual_seed(N * 31 + K * 7 + D)
    cb = torch.randn(K, D, generator=g)
    if kind == "near":  # benchmarks/test_bench_cpu.py's inputs
        z = cb[torch.randint(0, K, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g)
    else:
        z = torch.randn(N, D, generator=g)
    return z, cb


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        model = next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in lines if l.startswith("flags"))
        isa = [f for f in flags if f.startswith(("avx512", "avx2", "fma", "f16c", "avx_vnni"))]
        return f"{model} ({', '.join(sorted(isa))})"
    except (OSError, StopIteration):
        return platform.processor()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline", help="path of the baseline build's _C*.so")
    ap.add_argument("--candidate", default=None,
                    help="path of the candidate build's _C*.so (default: vqkernels._C's)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--op", choices=["nearest_code", "vq_quantize", "residual_vq"],
                    default="nearest_code")
    ap.add_argument("--stages", type=int, default=12,
                    help="residual_vq: stages, each a codebook of the shape's K x D (its own draw)")
    ap.add_argument("--cosine", action="store_true", help="residual_vq: cosine search (DAC's)")
    ap.add_argument("--kinds", nargs="+", default=["near", "randn"])
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NxKxD",
                    help="shapes to run (default: the CPU benchmark's five)")
    ap.add_argument("--clock", choices=["thread", "wall"], default=None,
                    help="thread: CPU time of the calling thread (time.thread_time), which a busy "
                         "neighbour does not inflate; only meaningful with --threads 1, its default "
                         "there. wall: elapsed time (the default with more threads)")
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
            assert all(len(s) == 3 and min(s) > 0 for s in shapes)
        except (ValueError, AssertionError):
            ap.error(f"--shapes: expected positive NxKxD triples like 8192x64x64, got {args.shapes}")
    torch.set_num_threads(args.threads)
    clock = args.clock or ("thread" if args.threads == 1 else "wall")
    if clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures only the calling thread: use it with --threads 1")
    now = time.thread_time if clock == "thread" else time.perf_counter
    # Both builds loaded the same way, each its own copy (the candidate is vqkernels._C's file
    # unless --candidate names another), on the same threads (VQK_CPU_POOL's choice, as the
    # package sets up its own module): with the package's module (torch's OpenMP threads) against
    # a copy on its own pool, the controls (shapes whose code both builds share) measured the
    # candidate 0.8-0.87x the baseline on a 2-vCPU Zen 3, a bias larger than the effects measured.
    base = load_so(args.baseline)
    cand = load_so(args.candidate or native.module().__file__, "vqk_candidate")
    pool = os.environ.get("VQK_CPU_POOL", "")
    pools = {native.set_cpu_pool(pool, m) for m in (base, cand)}
    if args.op == "nearest_code":
        op = lambda z, cb: vqkernels.nearest_code(z, cb, backend="cpu")  # noqa: E731
    elif args.op == "vq_quantize":
        op = lambda z, cb: vqkernels.vq_quantize(z, cb, backend="cpu")  # noqa: E731
    else:
        def op(z, cb):  # stage s's codebook: the shape's draw, rolled by s rows and scaled
            with torch.no_grad():
                return vqkernels.residual_vq(
                    z, [cb.roll(s, 0) * 0.7 ** s for s in range(args.stages)],
                    cosine=args.cosine, backend="cpu")
        args.op = f"residual_vq ({args.stages} stages{', cosine' if args.cosine else ''})"
    print(f"# {args.op}, float32, {args.threads} thread(s), {clock} clock, {args.reps} interleaved reps, "
          f"CPU {cpu_name()}, candidate ISA {cand.cpu_isa()}, threads {'/'.join(sorted(pools))}, "
          f"torch {torch.__version__}")
    print("| data | N×K×D | baseline ms | candidate ms | candidate ÷ baseline | median of paired ratios "
          "| ratio of fastest calls | rows re-searched |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind in args.kinds:
        for N, K, D in shapes:
            z, cb = data(kind, N, K, D)
            times = {"base": [], "cand": []}
            researched = 0
            for rep in range(args.reps + 1):
                for name, mod in (("base", base), ("cand", cand)) if rep % 2 else \
                        (("cand", cand), ("base", base)):
                    native.module = lambda m=mod: m
                    before = cand.cpu_exact_rows()
                    t0 = now()
                    op(z, cb)
                    dt = now() - t0
                    if name == "cand":
                        researched = cand.cpu_exact_rows() - before
                    if rep:  # the first round warms caches and the thread pool
                        times[name].append(dt)
            native.module = lambda m=cand: m
            mb, mc = statistics.median(times["base"]), statistics.median(times["cand"])
            fastest = min(times["cand"]) / min(times["base"])
            # Each rep's two calls ran back to back: their ratio cancels slow drifts of the load.
            paired = statistics.median(c / b for c, b in zip(times["cand"], times["base"]))
            print(f"| {kind} | {N}×{K}×{D} | {mb * 1e3:.1f} | {mc * 1e3:.1f} | {mc / mb:.3f} | "
                  f"{paired:.3f} | {fastest:.3f} | {researched / N:.4%} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
