"""The CPU kernel's builds against FAISS on this machine, calls interleaved (issue 16's table).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/isa_vs_faiss.py [--threads 2] [--reps 7] [--isas avx2 avx2_i16]

For each of issue 16's shapes (rows near codes, as benchmarks/test_bench_cpu.py makes them, or with
--data random randn rows against randn codes) one round
calls FAISS `IndexFlatL2.search(z, 1)` and, for every build named (forced with VQK_CPU_ISA),
`nearest_code` (indices and errors: FAISS's output) and `vq_quantize` (the whole forward job), in an
order that rotates from round to round. Two clocks per call: wall time, and the process's CPU time
(all threads summed; time.process_time), which busy neighbours on a shared machine do not inflate --
its ratio is the fairer one there, as long as no side spins while waiting (hence
OMP_WAIT_POLICY=PASSIVE for FAISS's OpenMP threads). Reports medians and each build's GFLOP/s
(2 N K D per median wall second).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import vqkernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_native import cpu_name  # noqa: E402

SHAPES = [(8192, 64, 64), (8192, 256, 256), (8192, 512, 256), (32768, 512, 512), (65536, 4096, 64)]


def data(N, K, D, kind="near"):
    """near: rows near codes (code + 0.3 randn), as a trained codebook sees them; random: randn
    rows against randn codes, where a reduced-precision bound settles fewer rows."""
    g = torch.Generator().manual_seed(N * 31 + K * 7 + D)
    cb = torch.randn(K, D, generator=g)
    if kind == "random":
        return torch.randn(N, D, generator=g), cb
    z = cb[torch.randint(0, K, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g)
    return z, cb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--isas", nargs="+", default=["avx2", "avx2_i16"])
    ap.add_argument("--shapes", default=None, help="e.g. 8192x64x64,8192x256x256")
    ap.add_argument("--data", choices=["near", "random"], default="near",
                    help="rows near codes (default) or random rows against random codes")
    args = ap.parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"# float32 forward, {args.threads} threads, {args.reps} interleaved rounds, medians; CPU {cpu_name()}; "
          f"torch {torch.__version__}, faiss {faiss.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; "
          f"data: {args.data}")
    cols = ["faiss"] + [f"{op}:{isa}" for isa in args.isas for op in ("nearest_code", "vq_quantize")]
    print("| N×K×D | " + " | ".join(f"{c} ms wall / cpu" for c in cols) + " | "
          + " | ".join(f"{c} ÷ FAISS (wall / cpu)" for c in cols[1:]) + " | "
          + " | ".join(f"{c} GFLOP/s" for c in cols[1:]) + " |")
    print("|---" * (1 + 3 * len(cols) - 2) + "|")
    old = os.environ.get("VQK_CPU_ISA")
    for N, K, D in shapes:
        z, cb = data(N, K, D, args.data)
        index = faiss.IndexFlatL2(D)
        index.add(cb.numpy())
        zn = z.numpy()
        calls = {"faiss": lambda: index.search(zn, 1)}
        for isa in args.isas:
            calls[f"nearest_code:{isa}"] = (isa, lambda: vqkernels.nearest_code(z, cb, backend="cpu"))
            calls[f"vq_quantize:{isa}"] = (isa, lambda: vqkernels.vq_quantize(z, cb, backend="cpu"))
        wall = {c: [] for c in cols}
        cpu = {c: [] for c in cols}
        for rep in range(args.reps + 1):
            order = cols[rep % len(cols):] + cols[:rep % len(cols)]
            for c in order:
                call = calls[c]
                if isinstance(call, tuple):
                    os.environ["VQK_CPU_ISA"] = call[0]
                    call = call[1]
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                t1, c1 = time.perf_counter(), time.process_time()
                if rep:  # the first round warms caches and thread pools
                    wall[c].append(t1 - t0)
                    cpu[c].append(c1 - c0)
        med = {c: (statistics.median(wall[c]), statistics.median(cpu[c])) for c in cols}
        fw, fc = med["faiss"]
        cells = [f"{med[c][0] * 1e3:.1f} / {med[c][1] * 1e3:.1f}" for c in cols]
        cells += [f"{med[c][0] / fw:.2f} / {med[c][1] / fc:.2f}" for c in cols[1:]]
        cells += [f"{2 * N * K * D / med[c][0] / 1e9:.0f}" for c in cols[1:]]
        print(f"| {N}×{K}×{D} | " + " | ".join(cells) + " |", flush=True)
    if old is None:
        os.environ.pop("VQK_CPU_ISA", None)
    else:
        os.environ["VQK_CPU_ISA"] = old


if __name__ == "__main__":
    sys.exit(main())
