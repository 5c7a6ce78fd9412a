"""Triton kernels for vector quantization: the fused search, its epilogue, and the backward.

Rows are read through (S, sb, ss, sd) element strides: row n sits at (n // S) * sb + (n % S) * ss,
its element d at + d * sd (see vqkernels._layout). Row numbers and row offsets are int64 so
N may exceed 2^31 rows; offsets inside a tile stay int32.

The search works on half distances h(x, e) = |e|^2 / 2 - x.e: |x|^2 is the same for every code of
a row, and halving saves the multiply by 2 in the hot loop. It is only used to rank codes; every
reported error is recomputed exactly as sum (x - e)^2 from the chosen code.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Index sentinel: larger than any code index (K < 2^31 is checked by the launcher).
_NO_CODE = tl.constexpr(2147483647)


@triton.jit
def _row_offsets(rows, S, sb, ss, MODE: tl.constexpr):
    """Element offsets (int64) of the rows `rows` (int64) of a (B, S, D) strided view.

    MODE 0: B == 1, no division. 1: N < 2^31, so the split of a row number into (b, s) uses
    32-bit division (64-bit division is a long software sequence on GPUs). 2: 64-bit throughout.
    """
    if MODE == 0:
        off = rows * ss
    elif MODE == 1:
        r = rows.to(tl.int32)
        b = r // S
        off = b.to(tl.int64) * sb + (r - b * S).to(tl.int64) * ss
    else:
        b = rows // S
        off = b * sb + (rows - b * S) * ss
    return off


@triton.jit
def half_sqnorm_kernel(
    cb_ptr, out_ptr, K, D,           # codebook (K, D) row-major; out (K,) = |e_k|^2 / 2, acc dtype
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    acc = tl.zeros((BLOCK_K, BLOCK_D), ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(cb_ptr + ks[:, None] * D + dd[None, :],
                    mask=kmask[:, None] & (dd < D)[None, :], other=0).to(ACC)
        acc += e * e
    tl.store(out_ptr + ks, 0.5 * tl.sum(acc, 1), mask=kmask)


@triton.jit
def _finish_rows(
    rows, rmask, i1, i2,              # rows (int64), valid-row mask, the two candidates (int32)
    x_ptr, x_S, D, x_sb, x_ss, x_sd,
    cb_ptr, K,
    zq_ptr, zq_S, zq_sb, zq_ss, zq_sd,
    idx_ptr, err_ptr, cnt_ptr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_ZQ: tl.constexpr,
    X_MODE: tl.constexpr, ZQ_MODE: tl.constexpr,
):
    """Epilogue shared by the fused search and the split-K merge.

    The expansion |e|^2/2 - x.e cancels badly when |x|^2 is large next to the distances, so the two
    best candidates it found are re-ranked by their exact errors sum (x - e)^2 (fp32, fp64 for fp64
    input; ties to the lower index). The winner's exact error is what the losses use. Then z_q and
    the code counts are written in the same pass.
    """
    has2 = i2 < K
    i2 = tl.where(has2, i2, 0)
    xoff = _row_offsets(rows, x_S, x_sb, x_ss, X_MODE)
    e1_off = i1.to(tl.int64) * D
    e2_off = i2.to(tl.int64) * D
    s1 = tl.zeros((BLOCK_N,), ACC)
    s2 = tl.zeros((BLOCK_N,), ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (dd < D)[None, :]
        x = tl.load(x_ptr + xoff[:, None] + dd[None, :].to(tl.int64) * x_sd, mask=m,
                    other=0).to(ACC)
        e1 = tl.load(cb_ptr + e1_off[:, None] + dd[None, :], mask=m, other=0).to(ACC)
        e2 = tl.load(cb_ptr + e2_off[:, None] + dd[None, :], mask=m & has2[:, None],
                     other=0).to(ACC)
        t1 = x - e1
        t2 = x - e2
        s1 += tl.sum(t1 * t1, 1)
        s2 += tl.sum(t2 * t2, 1)
    take2 = has2 & ((s2 < s1) | ((s2 == s1) & (i2 < i1)))
    best = tl.where(take2, i2, i1).to(tl.int64)
    err = tl.where(take2, s2, s1)
    tl.store(idx_ptr + rows, best, mask=rmask)
    tl.store(err_ptr + rows, err, mask=rmask)
    if WRITE_ZQ:
        # err >= 0 always, so `err < inf` is false exactly for NaN and +inf: those rows get NaN.
        finite = err < float("inf")
        zoff = _row_offsets(rows, zq_S, zq_sb, zq_ss, ZQ_MODE)
        b_off = best * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (dd < D)[None, :]
            e = tl.load(cb_ptr + b_off[:, None] + dd[None, :], mask=m, other=0)
            e = tl.where(finite[:, None], e, float("nan")).to(zq_ptr.dtype.element_ty)
            tl.store(zq_ptr + zoff[:, None] + dd[None, :].to(tl.int64) * zq_sd, e, mask=m)
    tl.atomic_add(cnt_ptr + best, tl.full((BLOCK_N,), 1, tl.int64), mask=rmask, sem="relaxed")


# TUNE_N only keys the autotuner: no recompiles for its value.
@triton.jit(do_not_specialize=["TUNE_N"])
def vq_search_kernel(
    x_ptr, N, x_S, D, x_sb, x_ss, x_sd,   # z's rows (see module docstring)
    cb_ptr, K,                            # codebook (K, D), row-major, contiguous
    cbp_ptr, cbp_stride,                  # the same codes, rows padded with zeros to a multiple of
                                          # BLOCK_D (cbp_stride elements apart; often cb itself)
    hn_ptr,                               # |e_k|^2 / 2, (K,), acc dtype
    zq_ptr, zq_S, zq_sb, zq_ss, zq_sd,    # z_q's rows (its own (B, S) split of the same N)
    idx_ptr, err_ptr, cnt_ptr,            # (N,) int64, (N,) acc dtype, (K,) int64 zeroed
    pv1_ptr, pi1_ptr, pv2_ptr, pi2_ptr,   # split-K partials, (splits, N): used when not FUSED
    TUNE_N,                               # bucket of N: autotune key only
    ACC: tl.constexpr,                    # tl.float32, or tl.float64 for float64 input
    PRECISION: tl.constexpr,              # tl.dot input precision: "tf32x3" for fp32, "ieee" else
    UPCAST: tl.constexpr,                 # feed tl.dot fp32 (interpreter: it can't multiply bf16)
    FUSED: tl.constexpr,                  # one program covers all of K: run the epilogue here
    WRITE_ZQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,               # cdiv(D, BLOCK_D); 1 keeps the row tile resident
    EVEN_D: tl.constexpr,                 # D % BLOCK_D == 0: no mask along D in the hot loop
    EPI_D: tl.constexpr,                  # D chunk of the epilogue (it holds three fp32 tiles)
    X_MODE: tl.constexpr, ZQ_MODE: tl.constexpr,  # see _row_offsets
):
    """Nearest code of BLOCK_N rows, streaming codebook tiles (BLOCK_K codes) through tl.dot.

    Each of the BLOCK_K columns keeps its own running best (value and code) across tiles: an
    elementwise compare-and-select, no cross-thread reduction in the hot loop. After the loop the
    columns are reduced once to the row's two best candidates, which the epilogue re-ranks exactly.
    The N x K distances only ever exist one (BLOCK_N, BLOCK_K) tile at a time, in registers.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    # Rows past N read row N-1 (never stored): the hot loop needs no row mask.
    xoff = _row_offsets(rows, x_S, x_sb, x_ss, X_MODE)

    # This program's share of the codebook, in whole tiles.
    n_tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(n_tiles, n_split)
    k_lo = pid_s * per * BLOCK_K
    k_hi = tl.minimum(K, k_lo + per * BLOCK_K)

    kk = tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    # Codebook tile, transposed (BLOCK_D, BLOCK_K), from the zero-padded copy: rows start on
    # 16-byte boundaries and need no mask along D, so the loads stay vectorized (an odd D would
    # otherwise force one element per load). Loop-invariant; only the base pointer moves.
    e_offs = kk[None, :] * cbp_stride + dd[:, None]
    if D_CHUNKS == 1:
        x_ptrs = x_ptr + xoff[:, None] + dd[None, :].to(tl.int64) * x_sd
        if EVEN_D:
            x = tl.load(x_ptrs, mask=rmask[:, None], other=0)
        else:
            x = tl.load(x_ptrs, mask=rmask[:, None] & (dd < D)[None, :], other=0)
        if UPCAST:
            x = x.to(tl.float32)

    best_v = tl.full((BLOCK_N, BLOCK_K), float("inf"), ACC)
    best_k = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
    # Walk the codebook by pointer increments: k0 * D could overflow int32 for K * D >= 2^31.
    e_tile = cbp_ptr + k_lo.to(tl.int64) * cbp_stride
    x_step = tl.cast(x_sd, tl.int64) * BLOCK_D  # x_sd is a plain constant when the JIT sees 1
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + kk
        kmask = ks < k_hi
        if D_CHUNKS == 1:
            e = tl.load(e_tile + e_offs, mask=kmask[None, :], other=0)
            if UPCAST:
                e = e.to(tl.float32)
            acc = tl.dot(x, e, input_precision=PRECISION, out_dtype=ACC)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), ACC)
            xc_ptrs = x_ptr + xoff[:, None] + dd[None, :].to(tl.int64) * x_sd
            ec_ptrs = e_tile + e_offs
            for c in range(D_CHUNKS):
                if EVEN_D:
                    xc = tl.load(xc_ptrs, mask=rmask[:, None], other=0)
                else:
                    xc = tl.load(xc_ptrs, mask=rmask[:, None] & (dd < D - c * BLOCK_D)[None, :],
                                 other=0)
                e = tl.load(ec_ptrs, mask=kmask[None, :], other=0)
                if UPCAST:
                    xc = xc.to(tl.float32)
                    e = e.to(tl.float32)
                acc = tl.dot(xc, e, acc, input_precision=PRECISION, out_dtype=ACC)
                xc_ptrs += x_step
                ec_ptrs += BLOCK_D
        e_tile += BLOCK_K * cbp_stride
        # Codes past the end get +inf, which never beats the running best (strict <).
        hn = tl.load(hn_ptr + ks, mask=kmask, other=float("inf"))
        dist = hn[None, :] - acc
        # Strict <: on equal distances the earlier tile (the lower index) stays. NaN never wins.
        better = dist < best_v
        best_v = tl.where(better, dist, best_v)
        best_k = tl.where(better, ks[None, :], best_k)

    # Across the columns: the best (lowest index among equal values) and the runner-up.
    v1 = tl.min(best_v, 1)
    i1 = tl.min(tl.where(best_v == v1[:, None], best_k, _NO_CODE), 1)
    i1 = tl.where(i1 == _NO_CODE, 0, i1)  # every distance NaN (or none finite): code 0
    not1 = best_k != i1[:, None]
    v2 = tl.min(tl.where(not1, best_v, float("inf")), 1)
    i2 = tl.min(tl.where(not1 & (best_v == v2[:, None]), best_k, _NO_CODE), 1)

    if FUSED:
        _finish_rows(rows, rmask, i1, i2, x_ptr, x_S, D, x_sb, x_ss, x_sd, cb_ptr, K,
                     zq_ptr, zq_S, zq_sb, zq_ss, zq_sd, idx_ptr, err_ptr, cnt_ptr,
                     ACC, BLOCK_N, EPI_D, WRITE_ZQ, X_MODE, ZQ_MODE)
    else:
        p = pid_s.to(tl.int64) * N + rows
        tl.store(pv1_ptr + p, v1, mask=rmask)
        tl.store(pi1_ptr + p, i1, mask=rmask)
        tl.store(pv2_ptr + p, v2, mask=rmask)
        tl.store(pi2_ptr + p, i2, mask=rmask)


@triton.jit
def vq_merge_kernel(
    x_ptr, N, x_S, D, x_sb, x_ss, x_sd,
    cb_ptr, K,
    zq_ptr, zq_S, zq_sb, zq_ss, zq_sd,
    idx_ptr, err_ptr, cnt_ptr,
    pv1_ptr, pi1_ptr, pv2_ptr, pi2_ptr, n_split,
    ACC: tl.constexpr, WRITE_ZQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    X_MODE: tl.constexpr, ZQ_MODE: tl.constexpr,
):
    """Split-K: merge each row's per-split top two into the overall top two, then the epilogue."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    b1 = tl.load(pv1_ptr + rows, mask=rmask, other=float("inf"))
    j1 = tl.load(pi1_ptr + rows, mask=rmask, other=0)
    b2 = tl.load(pv2_ptr + rows, mask=rmask, other=float("inf"))
    j2 = tl.load(pi2_ptr + rows, mask=rmask, other=_NO_CODE)
    for s in range(1, n_split):
        # Split s's partials start s * N elements in: step the base pointers, never form s * N.
        pv1_ptr += N
        pi1_ptr += N
        pv2_ptr += N
        pi2_ptr += N
        a1 = tl.load(pv1_ptr + rows, mask=rmask, other=float("inf"))
        k1 = tl.load(pi1_ptr + rows, mask=rmask, other=0)
        a2 = tl.load(pv2_ptr + rows, mask=rmask, other=float("inf"))
        k2 = tl.load(pi2_ptr + rows, mask=rmask, other=_NO_CODE)
        # Later splits hold higher indices, so on equal values the running pair (lower) wins.
        a_first = a1 < b1
        # Runner-up: the loser of the two bests against the winner's own runner-up.
        c_v = tl.where(a_first, b1, a1)
        c_k = tl.where(a_first, j1, k1)
        r_v = tl.where(a_first, a2, b2)
        r_k = tl.where(a_first, k2, j2)
        c_wins = (c_v < r_v) | ((c_v == r_v) & (c_k < r_k))
        b1 = tl.where(a_first, a1, b1)
        j1 = tl.where(a_first, k1, j1)
        b2 = tl.where(c_wins, c_v, r_v)
        j2 = tl.where(c_wins, c_k, r_k)
    _finish_rows(rows, rmask, j1, j2, x_ptr, x_S, D, x_sb, x_ss, x_sd, cb_ptr, K,
                 zq_ptr, zq_S, zq_sb, zq_ss, zq_sd, idx_ptr, err_ptr, cnt_ptr,
                 ACC, BLOCK_N, BLOCK_D, WRITE_ZQ, X_MODE, ZQ_MODE)


@triton.jit
def vq_backward_rows_kernel(
    x_ptr, N, x_S, D, x_sb, x_ss, x_sd,
    cb_ptr,
    idx_ptr, idx_stride,                  # chosen codes, int64, one per row
    gzq_ptr, gzq_S, gzq_sb, gzq_ss, gzq_sd,  # grad of z_q (rows); unused unless HAS_GZQ
    gcm_ptr, gcm_stride,                  # per-row commitment weights; unused unless HAS_GCM
    gcb_ptr, gcb_stride,                  # per-row codebook weights; unused unless ATOMIC_CB
    gz_ptr, gz_S, gz_sb, gz_ss, gz_sd,    # grad of z (rows); unused unless WRITE_GZ
    gcbout_ptr,                           # (K, D) acc dtype, zeroed: atomics land here
    ACC: tl.constexpr, HAS_GZQ: tl.constexpr, HAS_GCM: tl.constexpr, WRITE_GZ: tl.constexpr,
    ATOMIC_CB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    X_MODE: tl.constexpr, GZQ_MODE: tl.constexpr, GZ_MODE: tl.constexpr,
):
    """One pass over the rows: grad_z = grad_zq + 2 g_commit (z - e), and (unless deterministic)
    grad_codebook[idx] += 2 g_codebook (e - z) by atomics, sharing the loads of z and e."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    idx = tl.load(idx_ptr + rows * idx_stride, mask=rmask, other=0)
    e_off = idx * D
    xoff = _row_offsets(rows, x_S, x_sb, x_ss, X_MODE)
    if HAS_GCM:
        w_cm = 2 * tl.load(gcm_ptr + rows * gcm_stride, mask=rmask, other=0).to(ACC)
    if ATOMIC_CB:
        w_cb = -2 * tl.load(gcb_ptr + rows * gcb_stride, mask=rmask, other=0).to(ACC)
    if WRITE_GZ:
        gz_off = _row_offsets(rows, gz_S, gz_sb, gz_ss, GZ_MODE)
        if HAS_GZQ:
            gzq_off = _row_offsets(rows, gzq_S, gzq_sb, gzq_ss, GZQ_MODE)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (dd < D)[None, :]
        dd64 = dd[None, :].to(tl.int64)
        x = tl.load(x_ptr + xoff[:, None] + dd64 * x_sd, mask=m, other=0).to(ACC)
        e = tl.load(cb_ptr + e_off[:, None] + dd[None, :], mask=m, other=0).to(ACC)
        diff = x - e
        if WRITE_GZ:
            g = tl.zeros((BLOCK_N, BLOCK_D), ACC)
            if HAS_GZQ:
                g += tl.load(gzq_ptr + gzq_off[:, None] + dd64 * gzq_sd, mask=m, other=0).to(ACC)
            if HAS_GCM:
                g += w_cm[:, None] * diff
            tl.store(gz_ptr + gz_off[:, None] + dd64 * gz_sd, g.to(gz_ptr.dtype.element_ty), mask=m)
        if ATOMIC_CB:
            tl.atomic_add(gcbout_ptr + e_off[:, None] + dd[None, :], w_cb[:, None] * diff, mask=m,
                          sem="relaxed")


@triton.jit
def vq_backward_codebook_kernel(
    x_ptr, x_S, D, x_sb, x_ss, x_sd,
    cb_ptr,
    order_ptr,                            # row numbers sorted by code (stable), int64
    start_ptr,                            # (K + 1,) int64: code k owns order[start[k]:start[k+1]]
    gcb_ptr, gcb_stride,                  # per-row codebook weights
    out_ptr,                              # (K, D) acc dtype
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, X_MODE: tl.constexpr,
):
    """Deterministic grad_codebook: code k sums 2 g (e_k - x) over its own rows in a fixed order
    (sorted rows, fixed blocks, fixed reduction tree), so the result is bitwise repeatable."""
    k = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    lo = tl.load(start_ptr + k)
    hi = tl.load(start_ptr + k + 1)
    e = tl.load(cb_ptr + k * D + dd, mask=dmask, other=0).to(ACC)
    acc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    for r0 in range(lo, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < hi
        n = tl.load(order_ptr + r, mask=rm, other=0)
        xoff = _row_offsets(n, x_S, x_sb, x_ss, X_MODE)
        m = rm[:, None] & dmask[None, :]
        x = tl.load(x_ptr + xoff[:, None] + dd[None, :].to(tl.int64) * x_sd, mask=m,
                    other=0).to(ACC)
        g = tl.load(gcb_ptr + n * gcb_stride, mask=rm, other=0).to(ACC)
        acc += tl.where(m, g[:, None] * (e[None, :] - x), 0)
    tl.store(out_ptr + k * D + dd, 2 * tl.sum(acc, 0), mask=dmask)
