"""Fused residual VQ in Triton (issue 17): one program per block of rows runs every stage with the
residual held in registers, and writes only the S indices, the S errors and the summed z_q.

The residual is defined as in vqkernels.residual (fp32 for fp32 input): r_{s+1} = fl32(r_s - e_s).
Exactness per stage (issue 13's contract), by the same argument as vqkernels.triton.kernels:
the fast pass ranks codes by the half distance h_k = |e_k|^2/2 - r.e_k through tl.dot (3xTF32 on
a GPU), keeps per row the best value v1, its code i1 (lowest on ties) and the second value v2
over every other code, and bounds the error of every h_k by
    B = (D + 8) UNIT (E^2/2 + |r| E) 1.01 + (4D + 8) TINY (1 + E + |r|)
(kernels.bound_units, whose derivation covers any fp32 rows fed to tl.dot: the residual is one).
A row with v1 finite, |r|^2 finite, |r| E < LIMIT and v2 - v1 > 2B has i1 as its exact answer.
When any row of the block is not proven, the block measures float64 distances by direct
differences to every code of the stage (strict compares in increasing k: the lowest index wins
ties, NaN never wins) and takes those for its unproven rows. That costs K D per row of the block,
and only in blocks that need it (rare on real data; the debug counter shows how often).

Restrictions (the launcher checks them; vqkernels.residual falls back to the stage loop):
fp32 rows and codes, D <= 256 (one register tile per row block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import bound_units

_NO_CODE = tl.constexpr(2147483647)
MAX_D = 256


@triton.jit
def rvq_kernel(
    x_ptr, N, D,                      # rows (N, D) fp32, row-major contiguous
    cb_ptr, koff_ptr,                 # all stages' codes stacked (sum K_s, D) fp32; koff (S + 1,) int64
    hn_ptr,                           # |e|^2 / 2 per stacked code, fp32 (NaN for a non-finite code)
    e2_ptr,                           # (S,) fp32: E_s^2, max |e|^2 over stage s's finite codes
    act_ptr,                          # (N,) int64 active stages per row (read when HAS_ACT)
    zq_ptr, idx_ptr, err_ptr,         # (N, D) fp32; (S, N) int64; (S, N) fp32
    nflag_ptr,                        # (1,) int32: rows the fast pass could not prove (all stages)
    S,                                # number of stages
    HAS_ACT: tl.constexpr, PRECISION: tl.constexpr,
    UNIT: tl.constexpr, TINY: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    m2 = rmask[:, None] & dmask[None, :]
    r = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=m2, other=0.0)
    q = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if HAS_ACT:
        act = tl.load(act_ptr + rows, mask=rmask, other=0)
    n = tl.cast(D, tl.float32)
    for s in range(S):
        k0 = tl.load(koff_ptr + s)
        K = tl.load(koff_ptr + s + 1) - k0
        v1 = tl.full((BLOCK_N,), float("inf"), tl.float32)
        v2 = tl.full((BLOCK_N,), float("inf"), tl.float32)
        i1 = tl.full((BLOCK_N,), _NO_CODE, tl.int32)
        for kb in range(0, K, BLOCK_K):
            ks = kb + tl.arange(0, BLOCK_K)
            kmask = ks < K
            e = tl.load(cb_ptr + (k0 + ks)[None, :] * D + dd[:, None],
                        mask=kmask[None, :] & dmask[:, None], other=0.0)  # (BLOCK_D, BLOCK_K)
            dot = tl.dot(r, e, input_precision=PRECISION, out_dtype=tl.float32)
            hn = tl.load(hn_ptr + k0 + ks, mask=kmask, other=float("inf"))
            h = hn[None, :] - dot
            h = tl.where(h == h, h, float("inf"))  # NaN (a non-finite code or row) never ranks
            m1 = tl.min(h, 1)
            j1 = tl.min(tl.where(h == m1[:, None], ks[None, :], _NO_CODE), 1)
            mb2 = tl.min(tl.where(ks[None, :] == j1[:, None], float("inf"), h), 1)
            better = m1 < v1  # strict: an equal value later keeps the lower index
            v2 = tl.where(better, tl.minimum(v1, mb2), tl.minimum(v2, m1))
            v1 = tl.where(better, m1, v1)
            i1 = tl.where(better, j1, i1)
        i1 = tl.where(i1 < K, i1, 0)
        xn2 = tl.sum(r * r, 1)
        e2 = tl.load(e2_ptr + s)
        big_e = tl.sqrt(e2)
        xn = tl.sqrt(xn2)
        bound = (n + 8) * UNIT * (0.5 * e2 + xn * big_e) * 1.01 + \
            (4 * n + 8) * TINY * (1 + big_e + xn)
        fin1 = v1 < float("inf")
        gap = v2 - tl.where(fin1, v1, 0.0)
        sure = fin1 & (xn2 < float("inf")) & (xn * big_e < LIMIT) & (gap > 2 * bound)
        if HAS_ACT:
            on = rmask & (s < act)
        else:
            on = rmask
        flag = on & (sure == 0)
        n_flag = tl.sum(flag.to(tl.int32), 0)
        exact_err = tl.zeros((BLOCK_N,), tl.float64)
        if n_flag > 0:
            tl.atomic_add(nflag_ptr, n_flag, sem="relaxed")
            r64 = r.to(tl.float64)
            best = tl.full((BLOCK_N,), float("inf"), tl.float64)
            bk = tl.zeros((BLOCK_N,), tl.int32)
            for k in range(0, K):
                ek = tl.load(cb_ptr + (k0 + k) * D + dd, mask=dmask, other=0.0).to(tl.float64)
                t = tl.where(dmask[None, :], r64 - ek[None, :], 0.0)
                dk = tl.sum(t * t, 1)
                take = dk < best
                best = tl.where(take, dk, best)
                bk = tl.where(take, k, bk)
            i1 = tl.where(flag, bk, i1)
            # No finite distance at all (a non-finite row): index 0 and its (NaN/inf) distance.
            e0 = tl.load(cb_ptr + (k0 + i1)[:, None].to(tl.int64) * D + dd[None, :], mask=m2,
                         other=0.0).to(tl.float64)
            t0 = tl.where(m2, r64 - e0, 0.0)
            exact_err = tl.where(best < float("inf"), best, tl.sum(t0 * t0, 1))
        ech = tl.load(cb_ptr + (k0 + i1)[:, None].to(tl.int64) * D + dd[None, :], mask=m2,
                      other=0.0)
        t = tl.where(m2, r - ech, 0.0)
        err32 = tl.sum(t * t, 1)
        err = tl.where(flag, exact_err.to(tl.float32), err32)
        # The single-stage rule: the code is NaN where the exact error is not finite (a proven
        # row's fp32 error is finite: |r| E < 2^60 keeps it far from overflow).
        finite = tl.where(flag, exact_err < float("inf"), True)
        ech = tl.where(finite[:, None], ech, float("nan"))
        tl.store(idx_ptr + s * N + rows, tl.where(on, i1.to(tl.int64), -1), mask=rmask)
        tl.store(err_ptr + s * N + rows, tl.where(on, err, 0.0), mask=rmask)
        r = tl.where(on[:, None], r - ech, r)
        q = tl.where(on[:, None], q + ech, q)
    tl.store(zq_ptr + rows[:, None] * D + dd[None, :], q, mask=m2)


def supported(rows: torch.Tensor, codebooks) -> bool:
    return (rows.dtype == torch.float32 and rows.shape[1] <= MAX_D
            and all(cb.dtype == torch.float32 for cb in codebooks))


def residual_forward(rows: torch.Tensor, codebooks, active=None, *, block_n: int = 32,
                     block_k: int = 32, stats: dict | None = None):
    """(z_q (N, D), indices (S, N), sqerr (S, N)) of fp32 `rows` through the stages, as
    vqkernels.residual.residual_forward defines them. `stats`, when a dict, receives "flagged":
    the number of (row, stage) pairs the fast pass could not prove."""
    N, D = rows.shape
    S = len(codebooks)
    dev = rows.device
    x = rows.contiguous()
    cb = torch.cat([c.contiguous() for c in codebooks]).contiguous()
    koff = torch.zeros(S + 1, dtype=torch.long, device=dev)
    koff[1:] = torch.tensor([c.shape[0] for c in codebooks], device=dev).cumsum(0)
    sq = (cb * cb).sum(1)
    finite = torch.isfinite(cb).all(1)
    hn = torch.where(finite, 0.5 * sq, torch.nan)
    fin_sq = torch.where(finite, sq, 0.0)
    e2 = torch.stack([fin_sq[int(koff[s]):int(koff[s + 1])].max() for s in range(S)])
    z_q = torch.empty(N, D, dtype=torch.float32, device=dev)
    indices = torch.empty(S, N, dtype=torch.long, device=dev)
    sqerr = torch.empty(S, N, dtype=torch.float32, device=dev)
    nflag = torch.zeros(1, dtype=torch.int32, device=dev)
    if N > 0:
        act = active.contiguous() if active is not None else indices  # unused when not HAS_ACT
        unit, tiny, limit = bound_units("float32")
        block_d = max(16, triton.next_power_of_2(D))
        grid = (triton.cdiv(N, block_n),)
        rvq_kernel[grid](x, N, D, cb, koff, hn, e2, act, z_q, indices, sqerr, nflag, S,
                         HAS_ACT=active is not None, PRECISION="tf32x3", UNIT=unit, TINY=tiny,
                         LIMIT=limit, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    if stats is not None:
        stats["flagged"] = nflag
    return z_q, indices, sqerr
