"""An int8 tier against the int16 pass it stands in front of, by how near the rows are to codes.

    python benchmarks/int8_tier.py [--isas avx512_vnni_i16 avx512_vnni_i8] [--reps 7] [--threads 2]

For each shape and noise level: codes randn, rows = a random code + noise * randn (noise "randn":
randn rows, no code near). Every build named (forced with VQK_CPU_ISA) runs `nearest_code` on the
same inputs, in an order that rotates from round to round; two clocks per call (wall, and the
process's CPU time, which busy neighbours do not inflate). Reports medians, each build's ratio to
the first, and the share of rows the int8 tier settled itself (`cpu_int8_rows`). The builds'
outputs are compared too (they must be bit-identical; a difference is reported, not timed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import vqkernels
from vqkernels import native

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_native import cpu_name  # noqa: E402

SHAPES = [(8192, 64, 64), (8192, 512, 256), (65536, 4096, 64), (32768, 512, 512), (16384, 1024, 16),
          (16384, 16384, 8)]
NOISES = ["0.3", "1.0", "randn"]


def data(N, K, D, noise):
    g = torch.Generator().manual_seed(N * 31 + K * 7 + D)
    cb = torch.randn(K, D, generator=g)
    if noise == "randn":
        return torch.randn(N, D, generator=g), cb
    return cb[torch.randint(0, K, (N,), generator=g)] + float(noise) * torch.randn(N, D, generator=g), cb


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", nargs="+", default=["avx512_vnni_i16", "avx512_vnni_i8"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=None, help="e.g. 8192x64x64,8192x512x256")
    ap.add_argument("--noises", nargs="+", default=NOISES)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x"))
                                             for s in args.shapes.split(",")]
    m = native.module()
    saved = os.environ.get("VQK_CPU_ISA")
    print(f"# nearest_code, float32, {args.threads} thread(s), {args.reps} interleaved rounds, medians; "
          f"CPU {cpu_name()}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")
    base = args.isas[0]
    head = " | ".join(f"{i} ms wall / cpu" for i in args.isas)
    ratios = " | ".join(f"{i} ÷ {base} (wall / cpu)" for i in args.isas[1:])
    print(f"| N×K×D | noise | {head} | {ratios} | rows settled in int8 |")
    print("|---|---|" + "---|" * (2 * len(args.isas) - 1) + "---:|")
    try:
        for N, K, D in shapes:
            for noise in args.noises:
                z, cb = data(N, K, D, noise)
                wall = {i: [] for i in args.isas}
                cpu = {i: [] for i in args.isas}
                int8 = {i: 0 for i in args.isas}
                outs = {}
                for rnd in range(args.reps + 1):
                    order = args.isas[rnd % len(args.isas):] + args.isas[:rnd % len(args.isas)]
                    for isa in order:
                        os.environ["VQK_CPU_ISA"] = isa
                        before = m.cpu_int8_rows()
                        t0, c0 = time.perf_counter(), time.process_time()
                        out = vqkernels.nearest_code(z, cb, backend="cpu")
                        t1, c1 = time.perf_counter(), time.process_time()
                        if rnd == 0:  # warm-up round: checks the outputs, counts int8 rows
                            outs[isa] = out
                            int8[isa] = m.cpu_int8_rows() - before
                            continue
                        wall[isa].append((t1 - t0) * 1e3)
                        cpu[isa].append((c1 - c0) * 1e3)
                same = all(torch.equal(outs[i][0], outs[base][0]) and torch.equal(outs[i][1], outs[base][1])
                           for i in args.isas)
                med = {i: (statistics.median(wall[i]), statistics.median(cpu[i])) for i in args.isas}
                cells = " | ".join(f"{med[i][0]:.1f} / {med[i][1]:.1f}" for i in args.isas)
                rat = " | ".join(f"{med[i][0] / med[base][0]:.2f} / {med[i][1] / med[base][1]:.2f}"
                                 for i in args.isas[1:])
                share = max(int8.values()) / N
                flag = "" if same else " **outputs differ**"
                print(f"| {N}×{K}×{D} | {noise} | {cells} | {rat} | {share:.1%}{flag} |", flush=True)
    finally:
        if saved is None:
            os.environ.pop("VQK_CPU_ISA", None)
        else:
            os.environ["VQK_CPU_ISA"] = saved


if __name__ == "__main__":
    main()
