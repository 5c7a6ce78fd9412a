"""Fused residual VQ in Triton (issue 17): one program per block of rows runs every stage, and
writes only the S indices, the S errors and the summed z_q. The same kernel runs grouped VQ with
each group's own codebook in one launch: a second grid axis over the G groups, each program one
stage (its group's codebook) on its group's columns.

Where the residual lives. The block's residual and z_q sit in memory the program owns (its rows
of an N x D fp32 scratch and of z_q: BLOCK_N x D x 4 bytes each, 32 KiB at D = 256, which stay
in L1/L2 between stages; the extra memory is N x D, independent of K), and every pass reads them
BLOCK_D (16-32) columns at a time. A register tile spanning D, as in the first version, compiled
to 23-32 KB of spills per thread at D = 256 on sm_80 (tf32x3 splits both dot operands into
hi/lo copies) and capped D at 256; chunks keep registers independent of D (about 170-210, no
spills, 2 CTAs/SM on sm_80 and sm_90: `python -m vqkernels.triton.aot`), so any D runs.
The chunk loop over D is the hot loop: it runs on the tensor cores (wgmma on sm_90) and its
loads are software-pipelined, none of them waited for (the report's "dependent loads").

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
fp32 rows and codes (16-bit input arrives widened to fp32, exactly; float64 runs the stage loop),
int32 offsets inside a block (`fits`). Not yet run on a GPU: tested under the interpreter and
AOT-compiled for sm_80/sm_90 only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import bound_units

_NO_CODE = tl.constexpr(2147483647)
# Software pipelining depth of the D loop's loads. 3 (Triton's default) spilled at 168 registers
# on sm_80 (python -m vqkernels.triton.aot); 2 compiles to ~170-230 registers without spills.
NUM_STAGES = 2
# A register ceiling for ptxas: left to itself on sm_90 at D = 8 it chose 128 registers (4 CTAs
# per SM) and spilled 12-20 bytes; with this ceiling it takes ~175 and spills nothing.
MAXNREG = 232


def block_d(D: int) -> int:
    """Columns per chunk: the residual is read BLOCK_D columns at a time (any D)."""
    return min(32, max(16, triton.next_power_of_2(D)))


def blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) the launcher uses for rows of width D. From the AOT report
    (no GPU timing yet): 64 rows per block compile to wgmma (64x32x8 TF32) on sm_90, where 32 rows
    fall back to mma.sync, and halve the codebook reads per row, at the same 2 CTAs/SM and no
    spills on sm_80/sm_90 (~185-230 registers); 64 x 64 with 8 warps spilled 220 bytes on sm_80."""
    return 64, 32, 4


@triton.jit
def rvq_kernel(
    x_ptr, N, D, x_stride,            # rows (N, D) fp32 at x_ptr + row * x_stride (+ g * D)
    res_ptr,                          # (N, D) fp32 scratch: the residual between stages
    cb_ptr, koff_ptr,                 # all stages' codes stacked (sum K_s, D) fp32; koff (S + 1,) int64
    hn_ptr,                           # |e|^2 / 2 per stacked code, fp32 (NaN for a non-finite code)
    e2_ptr,                           # (S,) fp32: E_s^2, max |e|^2 over stage s's finite codes
    act_ptr,                          # (N,) int64 active stages per row (read when HAS_ACT)
    zq_ptr, idx_ptr, err_ptr,         # like x (N, D); (S, N) int64; (S, N) fp32
    nflag_ptr,                        # (1,) int32: rows the fast pass could not prove (all stages)
    S,                                # number of stages
    HAS_ACT: tl.constexpr, GROUPED: tl.constexpr, PRECISION: tl.constexpr,
    UNIT: tl.constexpr, TINY: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The residual and z_q live in memory the program owns (its rows of `res` and `zq`, a few KiB
    # that stay in L1/L2), read and written BLOCK_D columns at a time: no register tile spans D,
    # so registers do not grow with D (a (BLOCK_N, D) register tile spilled at D = 256 on sm_80
    # and sm_90). Every access of a chunk uses the same (rows, columns) block, so each element is
    # read and written by the thread that owns it; the barrier after the update orders those
    # writes before the next stage's tl.dot loads, which lay the block out differently.
    # Offsets inside the block are int32 from per-program base pointers (64-bit pointer tiles
    # cost two registers an element): BLOCK_N rows x the row width and K_s x D stay < 2^31.
    lr = tl.arange(0, BLOCK_N)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows = row0 + lr
    rmask = rows < N
    dc = tl.arange(0, BLOCK_D)
    if GROUPED:
        # Group g: its D columns of every row, its own codebook (stage g of the stack). One
        # stage, so the residual is x itself (never written) and z_q starts at 0 in place.
        s_lo = tl.program_id(1)
        s_hi = s_lo + 1
        col = s_lo.to(tl.int64) * D
        r_base = x_ptr + row0 * x_stride + col
        r_off = lr * x_stride
    else:
        s_lo = 0
        s_hi = S
        col = 0
        r_base = res_ptr + row0 * D
        r_off = lr * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dc
            m2 = rmask[:, None] & (dd < D)[None, :]
            xv = tl.load(x_ptr + row0 * x_stride + (lr * x_stride)[:, None] + dd[None, :],
                         mask=m2, other=0.0)
            tl.store(r_base + r_off[:, None] + dd[None, :], xv, mask=m2)
    q_base = zq_ptr + row0 * x_stride + col
    q_off = lr * x_stride
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dc
        tl.store(q_base + q_off[:, None] + dd[None, :], tl.zeros((BLOCK_N, BLOCK_D), tl.float32),
                 mask=rmask[:, None] & (dd < D)[None, :])
    tl.debug_barrier()
    if HAS_ACT:
        act = tl.load(act_ptr + rows, mask=rmask, other=0)
    n = tl.cast(D, tl.float32)
    for s in range(s_lo, s_hi):
        k0 = tl.load(koff_ptr + s)
        K = (tl.load(koff_ptr + s + 1) - k0).to(tl.int32)  # codes of this stage (< 2^31)
        c_base = cb_ptr + k0 * D
        h_base = hn_ptr + k0
        e2 = tl.load(e2_ptr + s)
        v1 = tl.full((BLOCK_N,), float("inf"), tl.float32)
        v2 = tl.full((BLOCK_N,), float("inf"), tl.float32)
        i1 = tl.full((BLOCK_N,), _NO_CODE, tl.int32)
        for kb in range(0, K, BLOCK_K):
            ks = kb + tl.arange(0, BLOCK_K)
            kmask = ks < K
            # Loaded before the D loop: its latency hides behind the MMAs.
            hn = tl.load(h_base + ks, mask=kmask, other=float("inf"))
            dot = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + dc
                dmask = dd < D
                rc = tl.load(r_base + r_off[:, None] + dd[None, :],
                             mask=rmask[:, None] & dmask[None, :], other=0.0)
                e = tl.load(c_base + ks[None, :] * D + dd[:, None],
                            mask=kmask[None, :] & dmask[:, None], other=0.0)  # (BLOCK_D, BLOCK_K)
                dot = tl.dot(rc, e, dot, input_precision=PRECISION, out_dtype=tl.float32)
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
        xn2 = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dc
            rc = tl.load(r_base + r_off[:, None] + dd[None, :],
                         mask=rmask[:, None] & (dd < D)[None, :], other=0.0)
            xn2 += tl.sum(rc * rc, 1)
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
            # Float64 distances by direct differences to every code of the stage (rare: only
            # blocks with an unproven row), lowest index on ties, NaN never wins.
            tl.atomic_add(nflag_ptr, n_flag, sem="relaxed")
            best = tl.full((BLOCK_N,), float("inf"), tl.float64)
            bk = tl.zeros((BLOCK_N,), tl.int32)
            for k in range(0, K):
                dk = tl.zeros((BLOCK_N,), tl.float64)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + dc
                    dmask = dd < D
                    rc = tl.load(r_base + r_off[:, None] + dd[None, :],
                                 mask=rmask[:, None] & dmask[None, :], other=0.0)
                    ek = tl.load(c_base + k * D + dd, mask=dmask, other=0.0)
                    t = tl.where(dmask[None, :], rc.to(tl.float64) - ek.to(tl.float64)[None, :],
                                 0.0)
                    dk += tl.sum(t * t, 1)
                take = dk < best
                best = tl.where(take, dk, best)
                bk = tl.where(take, k, bk)
            i1 = tl.where(flag, bk, i1)
            # No finite distance at all (a non-finite row): index 0 and its (NaN/inf) distance.
            d0k = tl.zeros((BLOCK_N,), tl.float64)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + dc
                m2 = rmask[:, None] & (dd < D)[None, :]
                rc = tl.load(r_base + r_off[:, None] + dd[None, :], mask=m2, other=0.0)
                e0 = tl.load(c_base + i1[:, None] * D + dd[None, :], mask=m2,
                             other=0.0)
                t0 = tl.where(m2, rc.to(tl.float64) - e0.to(tl.float64), 0.0)
                d0k += tl.sum(t0 * t0, 1)
            exact_err = tl.where(best < float("inf"), best, d0k)
        # The single-stage rule: the code is NaN where the exact error is not finite (a proven
        # row's fp32 error is finite: |r| E < 2^60 keeps it far from overflow).
        finite = tl.where(flag, exact_err < float("inf"), True)
        keep = on & finite
        err32 = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dc
            m2 = rmask[:, None] & (dd < D)[None, :]
            rc = tl.load(r_base + r_off[:, None] + dd[None, :], mask=m2, other=0.0)
            ech = tl.load(c_base + i1[:, None] * D + dd[None, :], mask=m2,
                          other=0.0)
            t = tl.where(m2, rc - ech, 0.0)
            err32 += tl.sum(t * t, 1)
            ech = tl.where(keep[:, None], ech, float("nan"))
            qc = tl.load(q_base + q_off[:, None] + dd[None, :], mask=m2, other=0.0)
            tl.store(q_base + q_off[:, None] + dd[None, :], qc + ech, mask=m2 & on[:, None])
            if not GROUPED:
                tl.store(r_base + r_off[:, None] + dd[None, :], rc - ech, mask=m2 & on[:, None])
        err = tl.where(flag, exact_err.to(tl.float32), err32)
        tl.store(idx_ptr + s * N + rows, tl.where(on, i1.to(tl.int64), -1), mask=rmask)
        tl.store(err_ptr + s * N + rows, tl.where(on, err, 0.0), mask=rmask)
        tl.debug_barrier()


def fits(n_rows: int, width: int, D: int, sizes) -> bool:
    """Whether the int32 offsets inside a block hold: fewer than 2^31 rows, rows of `width` < 2^20
    elements (D of them searched), K_s D < 2^31 for every stage's codebook."""
    return n_rows < 2**31 and width < 2**20 and all(k * D < 2**31 for k in sizes)


def supported(rows: torch.Tensor, codebooks) -> bool:
    """fp32 rows and codes (16-bit input reaches here widened to fp32 by vqkernels.residual) of
    the sizes `fits` allows. Any D: the kernel reads D in chunks of BLOCK_D columns."""
    return (rows.dtype == torch.float32 and all(cb.dtype == torch.float32 for cb in codebooks)
            and fits(rows.shape[0], rows.shape[1], rows.shape[1],
                     [cb.shape[0] for cb in codebooks]))


def _stack(codebooks, dev):
    """The stages' codes stacked, their offsets, |e|^2/2 (NaN for a non-finite code) and each
    stage's E^2 (max |e|^2 over its finite codes)."""
    sizes = [c.shape[0] for c in codebooks]
    cb = torch.cat([c.contiguous() for c in codebooks]).contiguous()
    koff = torch.zeros(len(sizes) + 1, dtype=torch.long)
    koff[1:] = torch.tensor(sizes).cumsum(0)
    sq = (cb * cb).sum(1)
    finite = torch.isfinite(cb).all(1)
    hn = torch.where(finite, 0.5 * sq, torch.nan)
    fin_sq = torch.where(finite, sq, 0.0)
    e2 = torch.stack([part.max() for part in fin_sq.split(sizes)])
    return cb, koff.to(dev), hn, e2


def _launch(x, x_stride, D, codebooks, active, grouped, block_n, block_k, block_dc, stats):
    N = x.shape[0]
    S = len(codebooks)
    dev = x.device
    cb, koff, hn, e2 = _stack(codebooks, dev)
    z_q = torch.empty(N, x_stride, dtype=torch.float32, device=dev)
    indices = torch.empty(S, N, dtype=torch.long, device=dev)
    sqerr = torch.empty(S, N, dtype=torch.float32, device=dev)
    nflag = torch.zeros(1, dtype=torch.int32, device=dev)
    if N > 0:
        # The residual's scratch rows (N x D fp32, independent of K); the grouped launch reads
        # each group straight from x.
        res = x if grouped else torch.empty(N, D, dtype=torch.float32, device=dev)
        act = active.contiguous() if active is not None else indices  # unused when not HAS_ACT
        unit, tiny, limit = bound_units("float32")
        dn, dk, nw = blocks(D)
        grid = (triton.cdiv(N, block_n or dn), S if grouped else 1)
        rvq_kernel[grid](x, N, D, x_stride, res, cb, koff, hn, e2, act, z_q, indices, sqerr,
                         nflag, S, HAS_ACT=active is not None, GROUPED=grouped,
                         PRECISION="tf32x3", UNIT=unit, TINY=tiny, LIMIT=limit,
                         BLOCK_N=block_n or dn, BLOCK_K=block_k or dk,
                         BLOCK_D=block_dc or block_d(D), num_warps=nw, num_stages=NUM_STAGES,
                         maxnreg=MAXNREG)
    if stats is not None:
        stats["flagged"] = nflag
    return z_q, indices, sqerr


def residual_forward(rows: torch.Tensor, codebooks, active=None, *, block_n: int = 0,
                     block_k: int = 0, block_d: int = 0, stats: dict | None = None):
    """(z_q (N, D), indices (S, N), sqerr (S, N)) of fp32 `rows` through the stages, as
    vqkernels.residual.residual_forward defines them. Blocks 0: the launcher's (`blocks`).
    `stats`, when a dict, receives "flagged": the number of (row, stage) pairs the fast pass
    could not prove."""
    N, D = rows.shape
    return _launch(rows.contiguous(), D, D, codebooks, active, False, block_n, block_k, block_d,
                   stats)


def grouped_forward(rows: torch.Tensor, codebooks, *, block_n: int = 0, block_k: int = 0,
                    block_d: int = 0, stats: dict | None = None):
    """Grouped VQ with each group's own codebook in one launch (a grid axis over the G groups):
    `rows` (N, G d) fp32, `codebooks` G fp32 tensors (K_g, d). Returns (z_q (N, G d),
    indices (G, N), sqerr (G, N)); group g's answer is the single-stage one for rows[:, g d:(g+1) d]
    against codebooks[g] (exact by issue 13's contract)."""
    N, W = rows.shape
    G = len(codebooks)
    if G > 65535:
        raise ValueError(f"{G} groups: the launch grid's group axis holds at most 65535")
    d = codebooks[0].shape[1]
    if W != G * d or any(c.shape[1] != d for c in codebooks):
        raise ValueError(f"rows have {W} columns, not {G} groups of the codebooks' {d}")
    return _launch(rows.contiguous(), W, d, codebooks, None, True, block_n, block_k, block_d,
                   stats)
