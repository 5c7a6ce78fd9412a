"""Triton kernels for vector quantization: the fused search, its epilogue, and the backward.

Rows are read through (S, sb, ss, sd) element strides: row n sits at (n // S) * sb + (n % S) * ss,
its element d at + d * sd (see vqkernels._layout). Row numbers and row offsets are int64 so
N may exceed 2^31 rows; offsets inside a tile stay int32.

The search works on half distances h(x, e) = |e|^2 / 2 - x.e: |x|^2 is the same for every code of
a row, and halving saves the multiply by 2 in the hot loop. It is only used to rank codes; every
reported error is recomputed as sum (x - e)^2 from the chosen code.

Exactness (issue 13). The answer is the lowest k minimising the float64 distance
d_k = sum_d (x_d - e_d)^2 of the input values (NaN counts as +inf). The fast pass (tensor cores)
keeps per row the best approximate half distance v1, its code i1 (lowest on ties) and the second
best value v2 over all codes; with a rigorous bound B on the error of every approximate value
(see bound_units) a row whose v2 - v1 exceeds 2B has i1 as its exact answer. Other rows
("flagged": near ties, far-from-origin data, non-finite or huge/tiny values) are listed and
searched again by vq_exact_kernel in float64 over the codes the bound cannot exclude.
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
def _widen(v, DT: tl.constexpr):
    """v converted to the wider float type DT, exactly. bf16 goes through its fp32 bit pattern
    (its top half): the same on a GPU, and right for subnormals under the interpreter, whose own
    bf16 conversion mangles them."""
    if v.dtype == tl.bfloat16:
        v = (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def half_sqnorm_kernel(
    cb_ptr, out_ptr, K, D,           # codebook (K, D) row-major; out (K,) = |e_k|^2 / 2, acc dtype
    fin_ptr,                         # (K,) acc dtype: |e_k|^2, or 0 for a code with NaN / inf
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    acc = tl.zeros((BLOCK_K, BLOCK_D), ACC)
    bad = tl.zeros((BLOCK_K, BLOCK_D), tl.int32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(cb_ptr + ks[:, None] * D + dd[None, :],
                    mask=kmask[:, None] & (dd < D)[None, :], other=0).to(ACC)
        acc += e * e
        bad = bad | ((tl.abs(e) < float("inf")) == 0).to(tl.int32)  # NaN or +-inf
    sq = tl.sum(acc, 1)
    tl.store(out_ptr + ks, 0.5 * sq, mask=kmask)
    # E^2 = max of these is the bound's code norm (see bound_units). A code with NaN or inf is
    # never chosen for a finite row (its approximate values are never finite), so it is left out;
    # a finite code whose |e|^2 overflows gives inf, which flags every row (exact search).
    tl.store(fin_ptr + ks, tl.where(tl.max(bad, 1) > 0, 0, sq), mask=kmask)


def bound_units(dtype_name: str) -> tuple[float, float, float]:
    """(UNIT, TINY, LIMIT) of the rigorous bound B on the fast pass's half distances.

    The fast pass computes h~_k = fl(hn_k - fl(x.e_k)) for h_k = |e_k|^2 / 2 - x.e_k, where
    hn_k = fl(|e_k|^2) / 2 comes from half_sqnorm_kernel (FMA/tree sum in the acc dtype). With
    E = max_k |e_k| (finite codes), |x| the row's norm and n = D:
      * hn: a sum of n rounded squares, |err| <= gamma_n E^2 / 2, gamma_n = n u / (1 - n u);
      * x.e by tl.dot, |err| <= c_dot |x| E, depending on what tl.dot runs:
        - bf16/fp16 inputs: tensor-core MMA with fp32 accumulation. The products are exact in
          fp32 (8+8 or 11+11 significand bits). The hardware adds blocks of 8-16 products plus
          the accumulator after aligning them to the largest exponent and truncating (not
          rounding) to about 24 bits (Fasi et al., "Numerical behavior of NVIDIA tensor cores",
          2021): each block step loses < (block+1) 2^-23 of the largest magnitude, so
          c_dot <= ~1.1 n 2^-23 <= n 2^-22.8. We take UNIT = 2^-20 (8x).
        - fp32 inputs: 3xTF32 (input_precision "tf32x3"): x = hi + lo with hi, lo tf32; the
          dropped lo*lo term and the tf32 rounding (even a truncation: 2^-10) of lo cost at most
          3 * 2^-20 per product (relative to |x_d e_d|), and the 3n exact tf32 products are
          accumulated as above (<= 3.3 n 2^-23): c_dot <= (3 + 0.41 n) 2^-20. We take
          UNIT = 2^-19: (n + 8) 2^-19 is at least 4.9 times that for every n.
        - fp64 inputs: DMMA / FMA in IEEE float64, c_dot <= gamma_n(2^-53); UNIT = 2^-50 (8x).
      * the final subtraction: one rounding, u (E^2/2 + |x| E) (1 + small).
    Every term is at most (n + 8) UNIT (E^2/2 + |x| E) times 1.01 (for the approximations of E
    and |x| themselves, which are computed in the acc dtype). Subnormals may be flushed to zero
    (inputs, products, partial sums), an absolute error < 2^-126 (fp32) per operation and per
    element; (4n + 8) TINY (1 + E + |x|) with TINY = 2^-120 covers it 64 times over (2^-1000
    for fp64). So
        B = (n + 8) UNIT (E^2/2 + |x| E) 1.01 + (4n + 8) TINY (1 + E + |x|)
    bounds |h~_k - h_k| for every code k. Rows with |x| E >= LIMIT (2^60; 2^500 for fp64) or
    non-finite |x|^2 are flagged whatever their gap: their products or squares may overflow.
    """
    if dtype_name == "float64":
        return 2.0**-50, 2.0**-1000, 2.0**500
    if dtype_name == "float32":
        return 2.0**-19, 2.0**-120, 2.0**60
    return 2.0**-20, 2.0**-120, 2.0**60


@triton.jit
def _finish_rows(
    rows, rmask, v1, i1, v2,          # rows (int64), valid-row mask, the row's approximate top two
    x_ptr, x_S, D, x_sb, x_ss, x_sd,
    cb_ptr, K, e2_ptr,                # e2_ptr: E^2, the max squared norm of the finite codes
    zq_ptr, zq_S, zq_sb, zq_ss, zq_sd,
    idx_ptr, err_ptr, cnt_ptr,
    nflag_ptr, frow_ptr, thr_ptr,     # flagged rows: count (1,), rows (N,), thresholds (N,)
    ACC: tl.constexpr, UNIT: tl.constexpr, TINY: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_ZQ: tl.constexpr,
    X_MODE: tl.constexpr, ZQ_MODE: tl.constexpr,
):
    """Epilogue shared by the fused search and the split-K merge.

    A row is decided here when its runner-up is provably worse: v1 finite, |x|^2 finite,
    |x| E < LIMIT and v2 - v1 > 2B (bound_units). Then i1 is the exact argmin: every other code
    has h_k >= v2 - B > v1 + B >= h_i1. Its error sum (x - e)^2 (acc dtype), z_q and count are
    written here. Any other row (every comparison is ordered: NaN flags) is appended to the
    flagged list with the threshold v1 + 2B for vq_exact_kernel, which writes its outputs.
    """
    i1 = tl.where(i1 < K, i1, 0)      # no finite value at all: any valid code (the row is flagged)
    xoff = _row_offsets(rows, x_S, x_sb, x_ss, X_MODE)
    e1_off = i1.to(tl.int64) * D
    s1 = tl.zeros((BLOCK_N,), ACC)
    xn2 = tl.zeros((BLOCK_N,), ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (dd < D)[None, :]
        x = _widen(tl.load(x_ptr + xoff[:, None] + dd[None, :].to(tl.int64) * x_sd, mask=m,
                           other=0), ACC)
        e1 = _widen(tl.load(cb_ptr + e1_off[:, None] + dd[None, :], mask=m, other=0), ACC)
        t1 = x - e1
        s1 += tl.sum(t1 * t1, 1)
        xn2 += tl.sum(x * x, 1)
    e2 = tl.load(e2_ptr).to(ACC)
    # tl.sqrt may be approximate (a few ulps) and flush subnormals: the bound's 1.01 factor and
    # its absolute term cover both.
    big_e = tl.sqrt(e2)
    xn = tl.sqrt(xn2)
    n = tl.cast(D, ACC)
    bound = (n + 8) * UNIT * (0.5 * e2 + xn * big_e) * 1.01 + (4 * n + 8) * TINY * (1 + big_e + xn)
    fin1 = v1 < float("inf")
    gap = v2 - tl.where(fin1, v1, 0)  # (no inf - inf: the test below fails on fin1 anyway)
    sure = fin1 & (xn2 < float("inf")) & (xn * big_e < LIMIT) & (gap > 2 * bound)
    done = rmask & sure
    best = i1.to(tl.int64)
    tl.store(idx_ptr + rows, best, mask=done)
    tl.store(err_ptr + rows, s1, mask=done)
    if WRITE_ZQ:
        # A decided row and its code are finite: z_q is the code itself.
        zoff = _row_offsets(rows, zq_S, zq_sb, zq_ss, ZQ_MODE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = done[:, None] & (dd < D)[None, :]
            e = tl.load(cb_ptr + e1_off[:, None] + dd[None, :], mask=m, other=0)
            tl.store(zq_ptr + zoff[:, None] + dd[None, :].to(tl.int64) * zq_sd,
                     e.to(zq_ptr.dtype.element_ty), mask=m)
    tl.atomic_add(cnt_ptr + best, tl.full((BLOCK_N,), 1, tl.int64), mask=done, sem="relaxed")
    # Append the flagged rows: one atomic per program reserves their slots, in row order.
    flag = (rmask & (sure == 0)).to(tl.int32)
    n_flag = tl.sum(flag, 0)
    base = tl.atomic_add(nflag_ptr, n_flag, sem="relaxed")
    slot = (base + tl.cumsum(flag, 0) - 1).to(tl.int64)
    tl.store(frow_ptr + slot, rows, mask=flag > 0)
    tl.store(thr_ptr + slot, v1 + 2 * bound, mask=flag > 0)


@triton.jit
def _tail_piece(x_ptr, xoff, x_sd, rmask, D, kk, cbp_stride, OFF: tl.constexpr, W: tl.constexpr,
                UPCAST: tl.constexpr):
    """A tail piece of the search (columns OFF .. OFF + W): its row tile, loaded once (masked past
    D), and the loop-invariant offsets of its codebook tile (the padded copy has zeros there)."""
    dw = OFF + tl.arange(0, W)
    x = tl.load(x_ptr + xoff[:, None] + dw[None, :].to(tl.int64) * x_sd,
                mask=rmask[:, None] & (dw < D)[None, :], other=0)
    if UPCAST:
        x = x.to(tl.float32)
    return x, kk[None, :] * cbp_stride + dw[:, None]


@triton.jit
def _tail_codes(e_ptrs, kmask, UPCAST: tl.constexpr):
    """A tail piece's code tile (loaded in the pipelined loop like the main one)."""
    e = tl.load(e_ptrs, mask=kmask[None, :], other=0)
    if UPCAST:
        e = e.to(tl.float32)
    return e


# TUNE_N only keys the autotuner: no recompiles for its value.
@triton.jit(do_not_specialize=["TUNE_N"])
def vq_search_kernel(
    x_ptr, N, x_S, D, x_sb, x_ss, x_sd,   # z's rows (see module docstring)
    cb_ptr, K,                            # codebook (K, D), row-major, contiguous
    cbp_ptr, cbp_stride,                  # the same codes, rows padded with zeros to a multiple of
                                          # BLOCK_D (cbp_stride elements apart; often cb itself)
    hn_ptr,                               # |e_k|^2 / 2, (K,), acc dtype
    e2_ptr,                               # E^2 (see bound_units), (1,), acc dtype
    zq_ptr, zq_S, zq_sb, zq_ss, zq_sd,    # z_q's rows (its own (B, S) split of the same N)
    idx_ptr, err_ptr, cnt_ptr,            # (N,) int64, (N,) acc dtype, (K,) int64 zeroed
    nflag_ptr, frow_ptr, thr_ptr,         # flagged rows: (1,) int32 zeroed, (N,) int64, (N,) acc
    pv1_ptr, pi1_ptr, pv2_ptr,            # split-K partials, (splits, N): used when not FUSED
    TUNE_N,                               # bucket of N: autotune key only
    ACC: tl.constexpr,                    # tl.float32, or tl.float64 for float64 input
    UNIT: tl.constexpr, TINY: tl.constexpr, LIMIT: tl.constexpr,  # see bound_units
    PRECISION: tl.constexpr,              # tl.dot input precision: "tf32x3" for fp32, "ieee" else
    UPCAST: tl.constexpr,                 # feed tl.dot fp32 (interpreter: it can't multiply bf16)
    FUSED: tl.constexpr,                  # one program covers all of K: run the epilogue here
    WRITE_ZQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,               # main D tiles of BLOCK_D; 1 keeps the row tile resident
    W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,  # tail pieces after a resident main
                                          # tile: powers of two >= 16, or 0 (configs.d_layout)
    EVEN_D: tl.constexpr,                 # D >= D_CHUNKS * BLOCK_D: no mask along D in the main
                                          # tiles (the tails, loaded once, are always masked)
    EPI_D: tl.constexpr,                  # D chunk of the epilogue (it holds three fp32 tiles)
    X_MODE: tl.constexpr, ZQ_MODE: tl.constexpr,  # see _row_offsets
):
    """Nearest code of BLOCK_N rows, streaming codebook tiles (BLOCK_K codes) through tl.dot.

    Each row keeps its best approximate value v1, its code i1 and the second best value v2 over
    every code seen: each tile is reduced across its columns (as FlashAttention keeps a row max),
    so the result does not depend on BLOCK_K. The epilogue decides the rows whose gap is provably
    larger than the rounding and flags the others for the exact re-search (module docstring).
    The N x K distances only ever exist one (BLOCK_N, BLOCK_K) tile at a time, in registers.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    # Rows past N load zeros (masked) and are never stored.
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
    # D between powers of two: the columns past the main tile come as up to three narrower
    # power-of-two pieces (192 = 128 + 64, 129 -> 128 + 16) instead of one tile padded to the
    # next power of two (review F12), each with its own resident row tile and one more tl.dot
    # into the same accumulator per code tile. Only with a resident main tile (configs.d_layout:
    # outside the pipelined chunk loop a tail's code tile would be a stall per code tile).
    tl.static_assert(D_CHUNKS == 1 or W1 == 0)
    T1: tl.constexpr = BLOCK_D
    T2: tl.constexpr = T1 + W1
    T3: tl.constexpr = T2 + W2
    if W1 > 0:
        x1, e1_offs = _tail_piece(x_ptr, xoff, x_sd, rmask, D, kk, cbp_stride, T1, W1, UPCAST)
    if W2 > 0:
        x2, e2_offs = _tail_piece(x_ptr, xoff, x_sd, rmask, D, kk, cbp_stride, T2, W2, UPCAST)
    if W3 > 0:
        x3, e3_offs = _tail_piece(x_ptr, xoff, x_sd, rmask, D, kk, cbp_stride, T3, W3, UPCAST)

    v1 = tl.full((BLOCK_N,), float("inf"), ACC)
    v2 = tl.full((BLOCK_N,), float("inf"), ACC)
    i1 = tl.full((BLOCK_N,), _NO_CODE, tl.int32)
    # Walk the codebook by pointer increments: k0 * D could overflow int32 for K * D >= 2^31.
    e_tile = cbp_ptr + k_lo.to(tl.int64) * cbp_stride
    x_step = tl.cast(x_sd, tl.int64) * BLOCK_D  # x_sd is a plain constant when the JIT sees 1
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + kk
        kmask = ks < k_hi
        # The code norms are loaded before the dot, so their latency hides behind the MMAs;
        # loaded after it they made every tile wait one L2 round trip with the tensor cores idle
        # (review F6; the AOT report's "dependent loads" column checks it).
        # Codes past the end get +inf (see below).
        hn = tl.load(hn_ptr + ks, mask=kmask, other=float("inf"))
        if D_CHUNKS == 1:
            # The tails' code tiles are loaded first: in this order ptxas fits 128 x 128 tiles
            # with three tails (D = 200) in 228 registers; loaded after the main dot, 255 and a
            # spill (AOT, sm_90).
            if W1 > 0:
                e1 = _tail_codes(e_tile + e1_offs, kmask, UPCAST)
            if W2 > 0:
                e2 = _tail_codes(e_tile + e2_offs, kmask, UPCAST)
            if W3 > 0:
                e3 = _tail_codes(e_tile + e3_offs, kmask, UPCAST)
            e = tl.load(e_tile + e_offs, mask=kmask[None, :], other=0)
            if UPCAST:
                e = e.to(tl.float32)
            acc = tl.dot(x, e, input_precision=PRECISION, out_dtype=ACC)
            if W1 > 0:
                acc = tl.dot(x1, e1, acc, input_precision=PRECISION, out_dtype=ACC)
            if W2 > 0:
                acc = tl.dot(x2, e2, acc, input_precision=PRECISION, out_dtype=ACC)
            if W3 > 0:
                acc = tl.dot(x3, e3, acc, input_precision=PRECISION, out_dtype=ACC)
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
        # NaN distances become +inf, as codes past the end (a non-finite row or code, or an
        # overflow: all of them end up flagged or never win), which keeps the reductions NaN-free.
        dist = hn[None, :] - acc
        dist = tl.where(dist == dist, dist, float("inf"))
        # The tile's best, its lowest code, and its second best (any other column).
        t1, tc = tl.min(dist, 1, return_indices=True, return_indices_tie_break_left=True)
        t2 = tl.min(tl.where(kk[None, :] == tc[:, None], float("inf"), dist), 1)
        tk = k0 + tc
        # Strict <: on equal values the earlier tile (the lower index) keeps first place.
        new = t1 < v1
        v2 = tl.where(new, tl.minimum(v1, t2), tl.minimum(v2, t1))
        i1 = tl.where(new, tk, i1)
        v1 = tl.where(new, t1, v1)

    if FUSED:
        _finish_rows(rows, rmask, v1, i1, v2, x_ptr, x_S, D, x_sb, x_ss, x_sd, cb_ptr, K, e2_ptr,
                     zq_ptr, zq_S, zq_sb, zq_ss, zq_sd, idx_ptr, err_ptr, cnt_ptr,
                     nflag_ptr, frow_ptr, thr_ptr, ACC, UNIT, TINY, LIMIT, BLOCK_N, EPI_D,
                     WRITE_ZQ, X_MODE, ZQ_MODE)
    else:
        p = pid_s.to(tl.int64) * N + rows
        tl.store(pv1_ptr + p, v1, mask=rmask)
        tl.store(pi1_ptr + p, i1, mask=rmask)
        tl.store(pv2_ptr + p, v2, mask=rmask)


@triton.jit
def vq_merge_kernel(
    x_ptr, N, x_S, D, x_sb, x_ss, x_sd,
    cb_ptr, K, e2_ptr,
    zq_ptr, zq_S, zq_sb, zq_ss, zq_sd,
    idx_ptr, err_ptr, cnt_ptr,
    nflag_ptr, frow_ptr, thr_ptr,
    pv1_ptr, pi1_ptr, pv2_ptr, n_split,
    ACC: tl.constexpr, UNIT: tl.constexpr, TINY: tl.constexpr, LIMIT: tl.constexpr,
    WRITE_ZQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    X_MODE: tl.constexpr, ZQ_MODE: tl.constexpr,
):
    """Split-K: merge each row's per-split (v1, i1, v2) into the overall ones, then the epilogue.
    v2 is the second smallest of all the values: the loser of the two firsts against the
    winner's own second."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    b1 = tl.load(pv1_ptr + rows, mask=rmask, other=float("inf"))
    j1 = tl.load(pi1_ptr + rows, mask=rmask, other=_NO_CODE)
    b2 = tl.load(pv2_ptr + rows, mask=rmask, other=float("inf"))
    for s in range(1, n_split):
        # Split s's partials start s * N elements in: step the base pointers, never form s * N.
        pv1_ptr += N
        pi1_ptr += N
        pv2_ptr += N
        a1 = tl.load(pv1_ptr + rows, mask=rmask, other=float("inf"))
        k1 = tl.load(pi1_ptr + rows, mask=rmask, other=_NO_CODE)
        a2 = tl.load(pv2_ptr + rows, mask=rmask, other=float("inf"))
        # Later splits hold higher indices, so on equal values the running first (lower) stays.
        a_first = a1 < b1
        b2 = tl.where(a_first, tl.minimum(b1, a2), tl.minimum(b2, a1))
        j1 = tl.where(a_first, k1, j1)
        b1 = tl.where(a_first, a1, b1)
    _finish_rows(rows, rmask, b1, j1, b2, x_ptr, x_S, D, x_sb, x_ss, x_sd, cb_ptr, K, e2_ptr,
                 zq_ptr, zq_S, zq_sb, zq_ss, zq_sd, idx_ptr, err_ptr, cnt_ptr,
                 nflag_ptr, frow_ptr, thr_ptr, ACC, UNIT, TINY, LIMIT, BLOCK_N, BLOCK_D,
                 WRITE_ZQ, X_MODE, ZQ_MODE)


@triton.jit
def vq_exact_kernel(
    x_ptr, x_S, D, x_sb, x_ss, x_sd,
    cb_ptr, K, hn_ptr,
    zq_ptr, zq_S, zq_sb, zq_ss, zq_sd,
    idx_ptr, err_ptr, cnt_ptr,
    nflag_ptr, frow_ptr, thr_ptr,         # the flagged rows (see _finish_rows)
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, WRITE_ZQ: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EX_D: tl.constexpr,
    X_MODE: tl.constexpr, ZQ_MODE: tl.constexpr,
):
    """Exact search of the flagged rows, BLOCK_R of them per program (the grid covers N rows; a
    program past the flagged count exits at once, so with no flagged row this costs one launch).

    Candidates: each tile's approximate half distances are recomputed the way the fast pass
    computes them (same tl.dot precision, same |e|^2 / 2), so the bound B holds for them too: the
    exact best k* has h~_k* <= h_k* + B <= h_i1 + B <= v1 + 2B, the row's threshold. A code
    above it cannot be the answer; with a threshold that is not finite every code is a candidate.
    For tiles holding a candidate, the float64 distances sum (x - e)^2 are computed directly
    (NaN -> +inf), and the lowest code with the least one wins. The winner's float64 error is the
    row's sqerr; z_q is NaN exactly where it is not finite.
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK_R
    n_flag = tl.load(nflag_ptr)
    if start < n_flag:
        slots = start + tl.arange(0, BLOCK_R)
        smask = slots < n_flag
        rows = tl.load(frow_ptr + slots, mask=smask, other=0)
        thr = tl.load(thr_ptr + slots, mask=smask, other=-float("inf"))
        every = (thr < float("inf")) == 0           # +inf or NaN: every code is a candidate
        xoff = _row_offsets(rows, x_S, x_sb, x_ss, X_MODE)
        kk = tl.arange(0, BLOCK_K)
        dd = tl.arange(0, BLOCK_D)
        ee = tl.arange(0, EX_D)
        best_d = tl.full((BLOCK_R,), float("inf"), tl.float64)
        best_k = tl.zeros((BLOCK_R,), tl.int32)     # every distance NaN / inf: code 0
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + kk
            kmask = ks < K
            acc = tl.zeros((BLOCK_R, BLOCK_K), ACC)
            for d0 in range(0, D, BLOCK_D):
                m = (d0 + dd) < D
                x = tl.load(x_ptr + xoff[:, None] + (d0 + dd)[None, :].to(tl.int64) * x_sd,
                            mask=smask[:, None] & m[None, :], other=0)
                e = tl.load(cb_ptr + ks[None, :].to(tl.int64) * D + (d0 + dd)[:, None],
                            mask=kmask[None, :] & m[:, None], other=0)
                if UPCAST:
                    x = x.to(tl.float32)
                    e = e.to(tl.float32)
                acc = tl.dot(x, e, acc, input_precision=PRECISION, out_dtype=ACC)
            hn = tl.load(hn_ptr + ks, mask=kmask, other=float("inf"))
            cand = ((hn[None, :] - acc <= thr[:, None]) | every[:, None]) & kmask[None, :]
            cand = cand & smask[:, None]
            if tl.max(cand.to(tl.int32)) > 0:
                d = tl.zeros((BLOCK_R, BLOCK_K), tl.float64)
                for d0 in range(0, D, EX_D):
                    m = (d0 + ee) < D
                    x = _widen(tl.load(x_ptr + xoff[:, None] + (d0 + ee)[None, :].to(tl.int64)
                                       * x_sd, mask=smask[:, None] & m[None, :], other=0),
                               tl.float64)
                    e = _widen(tl.load(cb_ptr + ks[:, None].to(tl.int64) * D + (d0 + ee)[None, :],
                                       mask=kmask[:, None] & m[None, :], other=0), tl.float64)
                    t = x[:, None, :] - e[None, :, :]
                    d += tl.sum(t * t, 2)
                d = tl.where(cand & (d == d), d, float("inf"))
                t1 = tl.min(d, 1)
                tk = tl.min(tl.where(d == t1[:, None], ks[None, :], _NO_CODE), 1)
                new = t1 < best_d
                best_k = tl.where(new, tk, best_k)
                best_d = tl.where(new, t1, best_d)
        # The winner's own float64 error (NaN stays NaN: the row's sqerr, as the reference).
        best = best_k.to(tl.int64)
        err = tl.zeros((BLOCK_R,), tl.float64)
        for d0 in range(0, D, EX_D):
            m = smask[:, None] & ((d0 + ee) < D)[None, :]
            x = _widen(tl.load(x_ptr + xoff[:, None] + (d0 + ee)[None, :].to(tl.int64) * x_sd,
                               mask=m, other=0), tl.float64)
            e = _widen(tl.load(cb_ptr + best[:, None] * D + (d0 + ee)[None, :], mask=m, other=0),
                       tl.float64)
            t = x - e
            err += tl.sum(t * t, 1)
        tl.store(idx_ptr + rows, best, mask=smask)
        tl.store(err_ptr + rows, err.to(err_ptr.dtype.element_ty), mask=smask)
        if WRITE_ZQ:
            finite = err < float("inf")   # err >= 0: false exactly for NaN and +inf
            zoff = _row_offsets(rows, zq_S, zq_sb, zq_ss, ZQ_MODE)
            for d0 in range(0, D, EX_D):
                m = smask[:, None] & ((d0 + ee) < D)[None, :]
                e = tl.load(cb_ptr + best[:, None] * D + (d0 + ee)[None, :], mask=m, other=0)
                e = tl.where(finite[:, None], e, float("nan")).to(zq_ptr.dtype.element_ty)
                tl.store(zq_ptr + zoff[:, None] + (d0 + ee)[None, :].to(tl.int64) * zq_sd, e,
                         mask=m)
        tl.atomic_add(cnt_ptr + best, tl.full((BLOCK_R,), 1, tl.int64), mask=smask, sem="relaxed")


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
    cb_ptr, K,
    order_ptr,                            # row numbers sorted by code (stable), int64
    start_ptr,                            # (K + 1,) int64: code k owns order[start[k]:start[k+1]]
    piece_code_ptr,                       # (grid,) int64: the code of each piece slot (K: none)
    piece_base_ptr,                       # (K + 1,) int64: code k's pieces are the slots
                                          # piece_base[k] .. piece_base[k + 1] - 1
    part_base_ptr,                        # (K,) int64: code k's first row in part
    part_ptr,                             # (pieces of the multi-piece codes, D) acc dtype
    gcb_ptr, gcb_stride,                  # per-row codebook weights
    out_ptr,                              # (K, D) acc dtype
    PIECE: tl.constexpr,                  # sorted rows per piece, a multiple of BLOCK_R
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, X_MODE: tl.constexpr,
):
    """Deterministic grad_codebook, first level: 2 g (e_k - x) summed over one piece (at most
    PIECE sorted rows) of code k's rows, in a fixed order (sorted rows, fixed blocks, fixed
    reduction tree). A code with one piece is written out here; the pieces of a longer run go to
    `part` and vq_backward_codebook_join_kernel adds them. The tree's shape depends only on each
    code's row count, so the result is bitwise repeatable, and no program walks more than PIECE
    rows: a collapsed codebook (most rows on one code) spreads over N / PIECE programs instead of
    running serially in one (review F3)."""
    slot = tl.program_id(0).to(tl.int64)
    k = tl.load(piece_code_ptr + slot)
    if k < K:
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dd < D
        first = tl.load(piece_base_ptr + k)
        n_pieces = tl.load(piece_base_ptr + k + 1) - first
        j = slot - first
        lo = tl.load(start_ptr + k) + j * PIECE
        hi = tl.minimum(tl.load(start_ptr + k + 1), lo + PIECE)
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
        tot = 2 * tl.sum(acc, 0)
        if n_pieces == 1:
            tl.store(out_ptr + k * D + dd, tot, mask=dmask)
        else:
            row = tl.load(part_base_ptr + k) + j
            tl.store(part_ptr + row * D + dd, tot, mask=dmask)


@triton.jit
def vq_backward_codebook_join_kernel(
    D, piece_base_ptr, part_base_ptr, part_ptr, out_ptr,   # see vq_backward_codebook_kernel
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Second level: code k's piece sums, BLOCK_P at a time through a fixed reduction tree, in
    piece order. Codes of one piece (written by the first level) return at once."""
    k = tl.program_id(0).to(tl.int64)
    n_pieces = tl.load(piece_base_ptr + k + 1) - tl.load(piece_base_ptr + k)
    if n_pieces > 1:
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dd < D
        base = tl.load(part_base_ptr + k)
        acc = tl.zeros((BLOCK_D,), ACC)
        for p0 in range(0, n_pieces, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            m = (pp < n_pieces)[:, None] & dmask[None, :]
            v = tl.load(part_ptr + (base + pp)[:, None] * D + dd[None, :], mask=m, other=0)
            acc += tl.sum(v, 0)
        tl.store(out_ptr + k * D + dd, acc, mask=dmask)
