"""Where a multi-codebook forward's time goes on the CPU (issue 17): the fused op, the Python loop of
vq_quantize calls, and the nearest-code searches alone that both of them run.

    python benchmarks/residual_breakdown.py [--shapes dac,encodec,grouped] [--reps 21] [--warmup 3]
        [--out benchmarks/results/residual-breakdown]

For each shape of benchmarks/bench_residual.py (same data, same generator), one process times, calls
interleaved (each rep runs every variant once, in turn, so a burst of load hits all alike):

  fused     vqkernels.residual_vq / grouped_vq (backend="cpu"), forward, no autograd;
  loop      the Python loop of single-stage vq_quantize calls of bench_residual.py, forward;
  searches  nearest_code on exactly the inputs each stage (or group) of the loop searches,
            captured once beforehand: the searches alone, with no residual update, gather, loss or
            autograd bookkeeping. Both peers run these same searches (the same kernels, chosen per
            stage by K and D).

and reports medians and three ratios: loop / fused (the benchmark's figure), fused / searches (what
fusing costs beyond its searches) and loop / searches: the most any op that still runs these
searches can gain over the loop. Where that is below a target, no amount of fusing reaches it; only
a faster search kernel can (and vq_quantize, hence the loop, takes the same kernel).
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vqkernels  # noqa: E402
from bench_residual import SHAPES, cpu_description, make_data  # noqa: E402


def _cpu_line() -> str:
    cpu, path = cpu_description()
    return f"{cpu}; auto: {path}"


def variants(shape: str):
    """The shape's data exactly as bench_residual.py makes it, and its three timed variants."""
    N, S, K, D, kind = SHAPES[shape]
    cosine = kind == "rvq-cosine"
    books, z = make_data(N, S, K, D, kind)

    if kind == "gvq":
        def fused():
            return vqkernels.grouped_vq(z, books, backend="cpu").z_q

        def loop():
            outs = [vqkernels.vq_quantize(p, b, backend="cpu") for p, b in zip(z.chunk(S, dim=1), books)]
            return torch.cat([o.z_q for o in outs], 1), sum(o.loss for o in outs)

        inputs = list(z.chunk(S, dim=1))  # the strided views the loop passes
    else:
        def fused():
            return vqkernels.residual_vq(z, books, backend="cpu", cosine=cosine).z_q

        def loop(capture=None):
            r, total, loss = z, 0, 0
            for b in books:
                x = F.normalize(r, dim=1) if cosine else r
                if capture is not None:
                    capture.append(x)
                out = vqkernels.vq_quantize(x, b, backend="cpu")
                loss = loss + out.loss
                total = total + out.z_q.detach()
                r = r - out.z_q.detach()
            return z + (total - z).detach(), loss

        inputs = []
        loop(inputs)

    def searches():
        return [vqkernels.nearest_code(x, b, backend="cpu") for x, b in zip(inputs, books)]

    return {"fused": fused, "loop": loop, "searches": searches}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls of each variant first")
    ap.add_argument("--out", default="benchmarks/results/residual-breakdown")
    a = ap.parse_args(argv)
    rows = []
    for shape in a.shapes.split(","):
        fns = variants(shape)
        with torch.no_grad():
            for _ in range(a.warmup):
                for f in fns.values():
                    f()
            times = {name: [] for name in fns}
            for _ in range(a.reps):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        rows.append({"shape": shape, "dims": SHAPES[shape][:4], "median_s": med, "times_s": times})
        print(shape, {k: round(v * 1e3, 2) for k, v in med.items()}, file=sys.stderr)

    head = (f"# Multi-codebook forward: fused, loop and the searches alone, CPU "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
            f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_line()}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); one process, {a.reps} interleaved reps after "
            f"{a.warmup} warm-up calls of each variant, medians (wall). Command: `python "
            f"benchmarks/residual_breakdown.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    lines = [head, "| shape (N, S or G, K, D) | fused ms | loop ms | searches alone ms | loop / fused "
             "| fused / searches | loop / searches (the ceiling) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["median_s"]
        lines.append(f"| {r['shape']} {tuple(r['dims'])} | {m['fused'] * 1e3:.1f} | {m['loop'] * 1e3:.1f} | "
                     f"{m['searches'] * 1e3:.1f} | {m['loop'] / m['fused']:.2f}x | "
                     f"{m['fused'] / m['searches']:.2f}x | {m['loop'] / m['searches']:.2f}x |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(a.out + ".json", "w") as f:
        json.dump({"rows": rows, "cpu": _cpu_line(), "torch": torch.__version__,
                   "threads": torch.get_num_threads()}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
