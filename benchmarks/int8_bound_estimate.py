"""Which fraction of rows an int8 first pass would set aside for the exact search (issue 16).

Replays search_avx2_i16.cpp's proof in float64 with other quantizer ranges: power-of-two
scales per row (tau: max |x_d| <= Qx tau) and per code (sigma_k: max |e_kd| <= Qc sigma_k), as
pow2_scale forms them, integer dot products (exact here: float64 sums of integers below 2^53), the
approximate values a_k' = n_k - 2 sigma_k tau (p.q_k), and the acceptance test
v2 - v1 > (4 dd + 6 B)(1 + 2^-10) with dd = (S/2) L1(x) + (tau/2)(L + D S/2) and B the fp32
search's bound. The rows are isa_vs_faiss.py's (rows near codes: noise 0.3 around a code); the
first --rows of each shape. --noise s redraws the rows as cb[idx] + s randn (same codebook) to see
where each quantizer starts to set rows aside.

    python benchmarks/int8_bound_estimate.py [--rows 8192] [--noise 1.0] [--shapes 8192x64x64,...]

Quantizers: int16 = the current path (Q = quant_max(D) for both sides); int8 (a): code bytes
unsigned with an offset (|q| <= 127), rows signed |p| <= 64, or the other way round; int8 (b):
|q| <= 63 (unsigned 0..127 with offset), |p| <= 64, so two vpmaddubsw sums fit in int16.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isa_vs_faiss import SHAPES, data  # noqa: E402


def quant_max(D):
    pairs = 2 * max((D + 1) // 2, 1)
    q = min(int(math.sqrt(2147483647.0 / pairs)), 32767)
    while q > 0 and pairs * q * q > 2147483647:
        q -= 1
    while q < 32767 and pairs * (q + 1) ** 2 <= 2147483647:
        q += 1
    return q


def pow2_scale(m, Q):
    """Smallest power of two s >= 2^-100 with m <= Q s, elementwise (m: float64 tensor)."""
    s = torch.exp2(torch.ceil(torch.log2(torch.clamp(m / Q, min=2.0 ** -100))))
    s = torch.where(m > Q * s, s * 2, s)  # guard log2 rounding either way
    s = torch.where((s > 2.0 ** -100) & (m <= Q * s / 2), s / 2, s)
    return s


def flagged(z, cb, Qx, Qc, chunk=2048):
    z = z.double()
    e = cb.double()
    N, D = z.shape
    u = 2.0 ** -24
    sig = pow2_scale(e.abs().amax(1), Qc)  # per code
    q = torch.round(e / sig[:, None])
    assert q.abs().max() <= Qc
    n = (e * e).sum(1)
    En = n.sqrt().max().item()
    S = sig.max().item()
    L = e.abs().sum(1).max().item()
    out, thr, gaps, ratio = 0, [], [], []
    for lo in range(0, N, chunk):
        x = z[lo:lo + chunk]
        tau = pow2_scale(x.abs().amax(1), Qx)
        p = torch.round(x / tau[:, None])
        assert p.abs().max() <= Qx
        a = n[None, :] - 2.0 * (tau[:, None] * sig[None, :]) * (p @ q.T)
        top = torch.topk(a, 2, dim=1, largest=False).values
        v1, v2 = top[:, 0], top[:, 1]
        xx = (x * x).sum(1)
        xn = torch.sqrt(xx) * (1 + (D + 2) * u)
        B = (2 * D + 8) * u * 1.01 * (En * En + 2 * xn * En) + (D + 2) * 2.0 ** -50 * xn * xn \
            + (4 * D + 8) * 2.0 ** -120 * (1 + En + xn)
        l1x = x.abs().sum(1) * (1 + (D + 2) * u)
        dd = 0.5 * S * l1x + 0.5 * tau * (L + 0.5 * D * S)
        ok = (v2 - v1) > (4 * dd + 6 * B) * (1 + 2.0 ** -10)
        out += int((~ok).sum())
        thr.append((4 * dd + 6 * B) * (1 + 2.0 ** -10))
        gaps.append(v2 - v1)
        ratio.append((v2 - v1) / thr[-1])
    return (out / N, torch.cat(thr).median().item(), torch.cat(gaps).median().item(),
            torch.quantile(torch.cat(ratio), 0.001).item())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--noise", type=float, default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 8192x64x64,8192x256x256")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"rows: {'isa_vs_faiss.data' if args.noise is None else f'cb[idx] + {args.noise} randn'}, first {args.rows}")
    print("| N×K×D | quantizer (rows Qx, codes Qc) | rows set aside | median threshold (4dd + 6B) "
          "| median gap v2 - v1 | 0.1% quantile of gap / threshold |")
    print("|---|---|---:|---:|---:|---:|")
    for N, K, D in shapes:
        z, cb = data(N, K, D)
        if args.noise is not None:
            g = torch.Generator().manual_seed(12345)
            z = cb[torch.randint(0, K, (args.rows,), generator=g)] + args.noise * torch.randn(args.rows, D, generator=g)
        z = z[:args.rows]
        Q16 = quant_max(D)
        for name, Qx, Qc in [("int16", Q16, Q16), ("int8 (a) 64 / 127", 64, 127),
                             ("int8 (a) 127 / 63", 127, 63), ("int8 (b) 64 / 63", 64, 63)]:
            f, thr, gap, r = flagged(z, cb, Qx, Qc)
            print(f"| {N}×{K}×{D} | {name} ({Qx}, {Qc}) | {100 * f:.1f}% | {thr:.3g} | {gap:.3g} | {r:.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
