"""Peak extra memory of one CPU `nearest_code` call against K (issue 16: it must not grow like N x K).

    python benchmarks/peak_memory.py K ISA [--n 65536] [--d 64]

One case per process (run it once per K and ISA). The resident high-water mark is reset through
/proc/self/clear_refs just before the call (Linux), then VmHWM minus the resident size before it is
printed. RSS counts only pages the call newly touches, so memory glibc reuses from earlier frees is
not seen: read the figure as "nothing of size N x K", not as an exact byte count.
"""
from __future__ import annotations

import argparse
import os
import re


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("K", type=int)
    ap.add_argument("isa", help="a VQK_CPU_ISA value, e.g. avx2_i8 or auto")
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    a = ap.parse_args(argv)
    os.environ["VQK_CPU_ISA"] = a.isa
    import torch

    import vqkernels
    torch.set_num_threads(2)
    N, D, K = a.n, a.d, a.K
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(K, D, generator=g)
    z = cb[torch.randint(0, K, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g)
    vqkernels.nearest_code(z[:64], cb, backend="cpu")  # loads everything a first call loads

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    base = rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM)
    vqkernels.nearest_code(z, cb, backend="cpu")
    with open("/proc/self/status") as f:
        hwm = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    print(f"{a.isa} N={N} K={K} D={D}: peak extra {max(0.0, hwm - base):.1f} MiB (codebook "
          f"{K * D * 4 / 2**20:.1f} MiB; an N x K fp32 matrix would be {N * K * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
