"""The native CPU kernels on their own thread pool against torch's OpenMP threads (VQK_CPU_POOL:
own, auto = OpenMP with a fall-back to the own pool after a late team, openmp = OpenMP always),
right after a torch op and on an idle machine, calls interleaved.

    python benchmarks/bench_after_torch_op.py [--rounds 9] [--calls 20] [--busy]
        [--pools own auto openmp] [--ops NAME ...] [--out PAGE.md]

After each parallel torch op, torch's OpenMP workers keep spinning for milliseconds (libgomp's
default wait policy, OMP_WAIT_POLICY unset). A kernel on the module's own pool that starts then
finds the other cores taken by those spinning threads; on torch's threads it runs on them at once.
Cases, each timed as the median wall time of `--calls` calls of the op under test:
  after op   a parallel torch op (an elementwise product of two 2048 x 1024 fp32 tensors, or a
             3x3 conv of a 32 x 64 x 32 x 32 batch) immediately before each call: what a
             quantizer sees in a training step;
  idle       the same torch op, then 20 ms of sleep (torch's workers have gone to sleep) before
             each call.
Ops: vq_quantize forward (N x K x D = 8192 x 1024 x 64, no grad), vq_quantize forward+backward,
grouped_vq forward (8192 rows, 4 groups of 64 channels, K = 1024 each), residual_vq forward (8192
rows, 4 stages, K = 1024, D = 64). In each round, the pools take turns case by case, in an
order that alternates from round to round. --busy adds a process spinning on one core for the
whole run (a loaded machine: there the own pool's revocation, which lets the caller finish without
a worker that has not started, may matter more). Reports medians over rounds, and own / openmp.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import vqkernels
from vqkernels import native

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_native import cpu_name  # noqa: E402


def _spin(stop):
    while not stop.is_set():
        pass


def make_ops():
    g = torch.Generator().manual_seed(0)
    N, K, D = 8192, 1024, 64
    z = torch.randn(N, D, generator=g)
    cb = torch.randn(K, D, generator=g)
    zg = torch.randn(N, 4 * D, generator=g)
    books = [torch.randn(K, D, generator=g) for _ in range(4)]
    stages = [torch.randn(K, D, generator=g) * 0.5 ** s for s in range(4)]
    zr = z.clone().requires_grad_(True)
    cbr = cb.clone().requires_grad_(True)
    gz = torch.randn(N, D, generator=g)

    def fwd():
        with torch.no_grad():
            vqkernels.vq_quantize(z, cb, backend="cpu")

    def fwd_bwd():
        out = vqkernels.vq_quantize(zr, cbr, backend="cpu")
        torch.autograd.backward([out.z_q, out.loss], [gz, None])

    def grouped():
        with torch.no_grad():
            vqkernels.grouped_vq(zg, books, backend="cpu")

    def residual():
        with torch.no_grad():
            vqkernels.residual_vq(z, stages, backend="cpu")

    return {"vq_quantize fwd": fwd, "vq_quantize fwd+bwd": fwd_bwd, "grouped_vq fwd": grouped,
            "residual_vq fwd": residual}


def make_torch_ops():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2048, 1024, generator=g), torch.randn(2048, 1024, generator=g)
    x = torch.randn(32, 64, 32, 32, generator=g)
    w = torch.randn(64, 64, 3, 3, generator=g) * 0.05
    return {"mul": lambda: a * b, "conv": lambda: F.conv2d(x, w, padding=1)}


def time_case(op, before, gap_s, calls):
    ts = []
    for _ in range(calls):
        before()
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        op()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--busy", action="store_true", help="a process spinning on one core meanwhile")
    ap.add_argument("--pools", nargs="+", default=["own", "auto", "openmp"],
                    choices=native.POOLS, help="VQK_CPU_POOL choices to compare (first: the base)")
    ap.add_argument("--ops", nargs="*", default=None, help="subset of the ops (names as printed)")
    ap.add_argument("--out", default=None, help="write a markdown page here")
    args = ap.parse_args(argv)
    pools = args.pools
    if native.set_cpu_pool("auto") == "own":
        sys.exit("torch's OpenMP runtime cannot be used here: nothing to compare")
    ops = make_ops()
    if args.ops:
        ops = {k: v for k, v in ops.items() if k in args.ops}
    tops = make_torch_ops()
    cases = [(o, t, gap) for o in ops for t in tops for gap in (0.0, 0.02)]
    stop = mp.Event()
    busy = mp.Process(target=_spin, args=(stop,), daemon=True) if args.busy else None
    if busy:
        busy.start()
    res = {(c, p): [] for c in cases for p in pools}
    for op in ops.values():  # warm up every pool and every op
        for p in pools:
            native.set_cpu_pool(p)
            op()
    try:
        for r in range(args.rounds):
            for c in cases:
                order = pools if (r + cases.index(c)) % 2 == 0 else pools[::-1]
                for p in order:
                    native.set_cpu_pool(p)
                    res[(c, p)].append(time_case(ops[c[0]], tops[c[1]], c[2], args.calls))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        if busy:
            stop.set()
            busy.join()
        native.set_cpu_pool("auto")
    lines = [
        "# Native CPU kernels: own thread pool vs torch's OpenMP threads (VQK_CPU_POOL)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_name()}; "
        f"{os.cpu_count()} logical CPUs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); Python {platform.python_version()}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"{'a process spinning on one core throughout' if args.busy else 'no load added'}.",
        f"`python benchmarks/bench_after_torch_op.py --rounds {args.rounds} --calls {args.calls}"
        f"{' --busy' if args.busy else ''} --pools {' '.join(pools)}`: per round the median of "
        f"{args.calls} calls; below "
        f"the median over {args.rounds} rounds (min-max of the round medians), ms.",
        "",
        "| op | before each call | " + " | ".join(pools) + " | " +
        " | ".join(f"{pools[0]} / {p}" for p in pools[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(pools) - 1),
    ]
    for c in cases:
        o, t, gap = c
        m = {p: statistics.median(res[(c, p)]) for p in pools}
        cells = [f"{m[p]:.2f} ({min(res[(c, p)]):.2f}-{max(res[(c, p)]):.2f})" for p in pools]
        cells += [f"{m[pools[0]] / m[p]:.2f}x" for p in pools[1:]]
        when = f"{t}, then {'20 ms idle' if gap else 'at once'}"
        lines.append(f"| {o} | {when} | " + " | ".join(cells) + " |")
    page = "\n".join(lines) + "\n"
    print(page)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(page)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
