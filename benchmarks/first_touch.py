"""What a fresh output buffer costs on this machine, and what advising it onto transparent huge
pages saves (vqkernels.native.fresh_output, VQK_HUGEPAGES).

    python benchmarks/first_touch.py [--rounds 9] [--shape 32768x512x512]

Interleaved in one process, medians of `rounds`: (1) torch.empty(64 MiB).fill_(0) with 4 KiB pages
and with the buffer advised first (MADV_HUGEPAGE), (2) vq_quantize at N x K x D (z_q is the fresh
N x D output) with VQK_HUGEPAGES=0 and =1, and nearest_code (no z_q) beside them. Reports wall
and process CPU milliseconds and the minor page faults per call (getrusage). Prints the THP mode.
"""
from __future__ import annotations

import argparse
import os
import resource
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--shape", default="32768x512x512")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    import vqkernels
    from vqkernels import native
    torch.set_num_threads(a.threads)
    N, K, D = (int(v) for v in a.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(K, D, generator=g)
    z = cb[torch.randint(0, K, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g)
    mib64 = 64 << 20

    def fill(advise):
        t = torch.empty(mib64, dtype=torch.uint8)
        if advise:
            native.module().advise_hugepages(t.data_ptr(), t.nbytes)
        t.fill_(0)

    def vq(hp):
        os.environ["VQK_HUGEPAGES"] = hp
        vqkernels.vq_quantize(z, cb, backend="cpu")

    calls = {"fill 64 MiB, 4 KiB pages": lambda: fill(False),
             "fill 64 MiB, advised": lambda: fill(True),
             f"vq_quantize {a.shape}, VQK_HUGEPAGES=0": lambda: vq("0"),
             f"vq_quantize {a.shape}, VQK_HUGEPAGES=1": lambda: vq("1"),
             f"nearest_code {a.shape} (no z_q)": lambda: vqkernels.nearest_code(z, cb, backend="cpu")}
    for f in calls.values():
        f()
    res = {k: ([], [], []) for k in calls}
    for r in range(a.rounds):
        names = list(calls)
        names = names[r % len(names):] + names[:r % len(names)]
        for k in names:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            calls[k]()
            w, c = time.perf_counter() - t0, time.process_time() - c0
            res[k][0].append(w)
            res[k][1].append(c)
            res[k][2].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    os.environ.pop("VQK_HUGEPAGES", None)
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = "unknown"
    print(f"# first touch: {a.rounds} interleaved rounds, medians, {a.threads} threads, "
          f"THP enabled: {thp}, load {os.getloadavg()[0]:.1f}")
    print("| call | wall ms | CPU ms | minor faults |")
    print("|---|---:|---:|---:|")
    for k, (w, c, fl) in res.items():
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        print(f"| {k} | {med(w) * 1e3:.1f} | {med(c) * 1e3:.1f} | {med(fl)} |")


if __name__ == "__main__":
    main()
