"""Launchers for the Triton kernels: pick blocks, allocate outputs, launch.

forward(z, dim, codebook, plan) and backward(...) follow the backend contract of
vqkernels.backends (semantics of vqkernels.reference). On a CUDA tensor the search kernel is
autotuned over configs.configs(dtype, D), keyed on (K, D, bucket of N, dtype). Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors through Triton's interpreter with one fixed
config (or the one a test asks for), since timing configs there means nothing. Tuned configs are
kept per key across processes (vqkernels.triton.tuning: warm up before CUDA graph capture).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._layout import RowPlan, RowView
from . import configs as cfg
from . import kernels as K_
from . import tuning

_ACC = {torch.float64: tl.float64}
_NO_CODE = 2**31 - 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class SearchConfig(NamedTuple):
    """A fixed search config (tests, interpreter); None fields take the launcher's default."""
    block_n: int = 32
    block_k: int = 32
    block_d: Optional[int] = None
    split: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2


_INTERPRET_DEFAULT = SearchConfig()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def _tuned_search(dtype_name: str, D: int, smem_limit: int, device_index: int = 0):
    """The autotuned search kernel for one (dtype, D, device smem limit) on one device: its
    configs depend on the first three (an H100 fits deeper pipelines than an A100), and one
    Autotuner object per device keeps tunings on different devices apart (its per-call state is
    not thread-safe: it only ever runs under the device's lock, see tuning.py)."""
    return triton.autotune(
        configs=cfg.configs(dtype_name, D, smem_limit),
        key=["K", "D", "TUNE_N", "FUSED"],  # the autotuner adds the tensors' dtypes to the key
        # counts and the flagged-row count are atomics: each timed run must start at 0
        reset_to_zero=["cnt_ptr", "nflag_ptr"],
    )(K_.vq_search_kernel)


@functools.lru_cache(maxsize=None)
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", cfg.DEFAULT_SMEM)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def _versions() -> dict:
    return {"triton": triton.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "kernels": tuning.source_hash()}


def _launch_tuned(args, meta, grid_n, split, dname, D, Kc, N, fused, device_index, wrap):
    """The search through its autotuner, or straight with the config tuned for this key before
    (in this process or, through the autotune cache file, an earlier one): see tuning.py."""
    smem = _smem_limit(device_index)
    tuner = _tuned_search(dname, D, smem, device_index)
    device = _device_name(device_index)
    key = tuning.make_key(device, _versions(), dict(
        kernel="vq_search", dtype=dname, D=D, K=Kc, N_bucket=cfg.tune_bucket(N), fused=fused,
        smem=smem))
    tc = tuning.cache()
    c = tc.get(key)
    allowed = [tuning.config_dict(x) for x in cfg.configs(dname, D, smem)]
    if c is not None and c not in allowed:
        c = None  # a config this version no longer has: tune again
    if c is None:
        if wrap is not _raw:
            # Traced by torch.compile: Inductor runs the autotuner itself, before any capture.
            wrap(tuner)[lambda m: (grid_n(m["BLOCK_N"]), split)](*args, **meta)
            return

        def tune():
            # Times every config, then runs the best one: this call's outputs are written.
            tuner[lambda m: (grid_n(m["BLOCK_N"]), split)](*args, **meta)
            return tuning.config_dict(tuner.best_config)

        c, tuned_now = tc.get_or_tune(device, key, tune)
        if tuned_now:
            return
    c = dict(c)
    wrap(K_.vq_search_kernel)[(grid_n(c["BLOCK_N"]), split)](
        *args, **meta, BLOCK_N=c.pop("BLOCK_N"), BLOCK_K=c.pop("BLOCK_K"),
        num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages"))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullCtx()


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rows_args(v: RowView) -> tuple:
    # Each view has its own (B, S) split: z, z_q and the gradients may differ in layout.
    return (v.tensor, v.S, v.sb, v.ss, v.sd)


def row_mode(v: RowView) -> int:
    """How a kernel turns row numbers into offsets (see kernels._row_offsets)."""
    if v.B == 1:
        return 0
    return 1 if v.B * v.S < 2**31 else 2


def padded_codebook(cb: torch.Tensor, width: int) -> torch.Tensor:
    """The codebook as the search loop reads it: rows padded with zeros to `width` columns (the
    layout's D rounded up to a multiple of 16), so they start on 16-byte boundaries and the
    loads need no mask along D. The codebook itself (no copy) when D already is that width, as
    for every multiple of 16.

    The copy is made on every call, on purpose: a cache keyed on the tensor and its version
    counter would miss updates that do not bump the counter (writes through `.data`, fused
    optimizers such as Adam(fused=True)) and search stale codes. It costs K x width elements,
    against N x K x D multiply-adds for the search."""
    K, D = cb.shape
    if width == D:
        return cb
    return torch.nn.functional.pad(cb, (0, width - D))


def _raw(kernel):
    return kernel


def half_sqnorms(cb: torch.Tensor, wrap=_raw) -> tuple[torch.Tensor, torch.Tensor]:
    """(|e_k|^2 / 2 in the accumulation dtype, E^2 = the largest |e_k|^2 of a finite code as a
    (1,) tensor), computed once per call (not per program); E^2 feeds the rounding bound."""
    K, D = cb.shape
    acc = reference.acc_dtype(cb.dtype)
    out = torch.empty(K, dtype=acc, device=cb.device)
    fin = torch.empty(K, dtype=acc, device=cb.device)
    bd = min(64, max(16, triton.next_power_of_2(D)))
    bk = 4096 if interpreting() else 64  # the interpreter pays per program and per operation
    wrap(K_.half_sqnorm_kernel)[(triton.cdiv(K, bk),)](
        cb, out, K, D, fin, ACC=_ACC.get(cb.dtype, tl.float32), BLOCK_K=bk, BLOCK_D=bd,
        num_warps=4)
    return out, fin.amax().reshape(1)


def forward(z: torch.Tensor, dim: int, codebook: torch.Tensor, plan: RowPlan,
            config: Optional[SearchConfig] = None, wrap=_raw, stats: Optional[dict] = None):
    """(z_q, indices, sqerr, counts) of z against codebook: see vqkernels.reference.forward.

    The index is the exact nearest code (float64 distances, NaN as +inf, ties to the lowest
    index) whatever the config: a fast pass decides the rows it can prove, vq_exact_kernel
    searches the others (see vqkernels.triton.kernels). `stats`, when a dict, receives
    "flagged": a (1,) int32 tensor, the number of rows the fast pass could not decide.

    `wrap` is applied to every kernel before its launch: torch.library.wrap_triton when called
    from the triton_op bodies of vqkernels.triton.ops, so that torch.compile traces the launches.
    """
    Kc, D = codebook.shape
    if Kc >= _NO_CODE:
        raise ValueError(f"codebook has {Kc} codes; the Triton kernels index codes in int32 "
                         "(K < 2^31)")
    acc = reference.acc_dtype(z.dtype)
    dname = _dtype_name(z.dtype)
    cb = codebook.contiguous()
    xv = plan.view(z)
    z_q, zqv = plan.empty_like(z)
    N = plan.N
    indices = torch.empty(plan.lead, dtype=torch.long, device=z.device)
    sqerr = torch.empty(plan.lead, dtype=acc, device=z.device)
    counts = torch.zeros(Kc, dtype=torch.long, device=z.device)
    if N == 0:
        return z_q, indices, sqerr, counts

    if config is None and interpreting():
        config = _INTERPRET_DEFAULT
    lay = cfg.d_layout(D, dname, config.block_d if config is not None else None)
    tails = lay.tails + (0,) * (3 - len(lay.tails))
    if config is not None and config.split is not None:
        split = config.split
    else:
        split = cfg.choose_split(N, Kc, _num_sms(z.device.index or 0) if z.is_cuda else None)
    fused = split == 1

    unit, tiny, limit = K_.bound_units(dname)
    with _device_ctx(z):
        hn, e2 = half_sqnorms(cb, wrap)
        cbp = padded_codebook(cb, lay.padded)
        if fused:
            # Never touched (the FUSED kernel writes no partials), but typed as in the split case
            # and distinct: torch.compile's analysis of a wrap_triton launch sees no aliasing.
            part = tuple(torch.empty(1, dtype=t, device=z.device)
                         for t in (acc, torch.int32, acc))
        else:
            part = (torch.empty((split, N), dtype=acc, device=z.device),
                    torch.empty((split, N), dtype=torch.int32, device=z.device),
                    torch.empty((split, N), dtype=acc, device=z.device))
        # The rows the fast pass leaves to the exact search: count, row numbers, thresholds.
        flagged = (torch.zeros(1, dtype=torch.int32, device=z.device),
                   torch.empty(N, dtype=torch.long, device=z.device),
                   torch.empty(N, dtype=acc, device=z.device))
        if stats is not None:
            stats["flagged"] = flagged[0]
        args = (xv.tensor, N, xv.S, D, xv.sb, xv.ss, xv.sd, cb, Kc, cbp, cbp.stride(0), hn, e2,
                *_rows_args(zqv), indices, sqerr, counts, *flagged, *part, cfg.tune_bucket(N))
        meta = dict(
            ACC=_ACC.get(z.dtype, tl.float32), UNIT=unit, TINY=tiny, LIMIT=limit,
            PRECISION="tf32x3" if z.dtype == torch.float32 else "ieee",
            # The interpreter multiplies bf16 as raw uint16; fp32 operands give the same products
            # (bf16 x bf16 is exact in fp32), so only the summation order differs from the GPU.
            UPCAST=interpreting() and z.dtype == torch.bfloat16,
            FUSED=fused, WRITE_ZQ=True, BLOCK_D=lay.block_d, D_CHUNKS=lay.chunks,
            W1=tails[0], W2=tails[1], W3=tails[2], EVEN_D=D >= lay.block_d * lay.chunks,
            EPI_D=cfg.epilogue_d(lay.block_d), X_MODE=row_mode(xv), ZQ_MODE=row_mode(zqv),
        )
        if config is not None:
            grid = (triton.cdiv(N, config.block_n), split)
            wrap(K_.vq_search_kernel)[grid](
                *args, **meta, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages)
        else:
            index = z.device.index if z.device.index is not None else torch.cuda.current_device()
            _launch_tuned(args, meta, lambda bn: triton.cdiv(N, bn), split, dname, D, Kc, N, fused,
                          index, wrap)
        if not fused:
            bn = 64
            wrap(K_.vq_merge_kernel)[(triton.cdiv(N, bn),)](
                xv.tensor, N, xv.S, D, xv.sb, xv.ss, xv.sd, cb, Kc, e2, *_rows_args(zqv),
                indices, sqerr, counts, *flagged, *part, split,
                ACC=meta["ACC"], UNIT=unit, TINY=tiny, LIMIT=limit, WRITE_ZQ=True, BLOCK_N=bn,
                BLOCK_D=meta["EPI_D"], X_MODE=meta["X_MODE"], ZQ_MODE=meta["ZQ_MODE"],
                num_warps=4)
        # The exact re-search of the flagged rows. The grid must not depend on their number
        # (no host sync, capturable, traceable): programs past it return at once.
        br, bk, bdx, exd = EXACT_BLOCKS_INTERPRET if interpreting() else EXACT_BLOCKS
        wrap(K_.vq_exact_kernel)[(triton.cdiv(N, br),)](
            xv.tensor, xv.S, D, xv.sb, xv.ss, xv.sd, cb, Kc, hn, *_rows_args(zqv),
            indices, sqerr, counts, *flagged,
            ACC=meta["ACC"], PRECISION=meta["PRECISION"], UPCAST=meta["UPCAST"], WRITE_ZQ=True,
            BLOCK_R=br, BLOCK_K=bk, BLOCK_D=min(bdx, max(16, triton.next_power_of_2(D))),
            EX_D=exd, X_MODE=meta["X_MODE"], ZQ_MODE=meta["ZQ_MODE"], num_warps=4)
    return z_q, indices, sqerr, counts


# (BLOCK_R, BLOCK_K, BLOCK_D, EX_D) of vq_exact_kernel: 16 flagged rows per program; the float64
# distances of a (16, 64) tile are summed over EX_D-wide slices of D (16 x 64 x 4 per step, 32
# values a thread). The interpreter pays per operation, not per element: wide code tiles there.
EXACT_BLOCKS = (16, 64, 64, 4)
EXACT_BLOCKS_INTERPRET = (16, 1024, 64, 8)


def backward_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps) of the backward row kernel: 2048-element tiles on 8 warps,
    8 elements per thread. Each element carries x, e, their difference, the incoming gradient and
    four 64-bit addresses (the atomics' included): ptxas needs about 170 registers for 8 of them,
    and spills at 16 (see vqkernels.triton.aot)."""
    bd = min(128, max(16, triton.next_power_of_2(D)))
    return bd, max(16, 2048 // bd), 8


def _per_row(g: Optional[torch.Tensor], like: torch.Tensor):
    """A per-row weight as (flat tensor, stride): an expanded scalar gradient stays stride 0."""
    if g is None:
        return like, 0
    flat = g.reshape(-1)
    return flat, flat.stride(0)


def backward(z: torch.Tensor, dim: int, codebook: torch.Tensor, indices: torch.Tensor,
             grad_zq: Optional[torch.Tensor], g_codebook: Optional[torch.Tensor],
             g_commit: Optional[torch.Tensor], plan: RowPlan, deterministic: Optional[bool] = None,
             wrap=_raw, piece_rows: Optional[int] = None):
    """(grad_z, grad_codebook): see vqkernels.reference.backward.

    grad_codebook is a scatter-add over the chosen codes: fp32 atomics by default, or, when
    `deterministic` (default: torch.are_deterministic_algorithms_enabled()), a sorted segment
    reduction whose result is bitwise repeatable (`piece_rows`: the sorted rows one program sums,
    see _deterministic_codebook_grad; tests make it small).
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    acc = reference.acc_dtype(z.dtype)
    Kc, D = codebook.shape
    cb = codebook.contiguous()
    xv = plan.view(z)
    grad_z, gzv = plan.empty_like(z)
    grad_cb = torch.zeros((Kc, D), dtype=acc, device=z.device)
    N = plan.N
    if N == 0:
        return grad_z, grad_cb.to(codebook.dtype)
    idx, idx_stride = _per_row(indices, None)
    gcm, gcm_stride = _per_row(g_commit, idx)
    gcb, gcb_stride = _per_row(g_codebook, idx)
    gzqv = plan.view(grad_zq) if grad_zq is not None else gzv
    ACC = _ACC.get(z.dtype, tl.float32)
    bd, bn, warps = backward_blocks(D)
    atomic = g_codebook is not None and not deterministic
    with _device_ctx(z):
        wrap(K_.vq_backward_rows_kernel)[(triton.cdiv(N, bn),)](
            xv.tensor, N, xv.S, D, xv.sb, xv.ss, xv.sd, cb, idx, idx_stride,
            *_rows_args(gzqv), gcm, gcm_stride, gcb, gcb_stride, *_rows_args(gzv), grad_cb,
            ACC=ACC, HAS_GZQ=grad_zq is not None, HAS_GCM=g_commit is not None, WRITE_GZ=True,
            ATOMIC_CB=atomic, BLOCK_N=bn, BLOCK_D=bd, X_MODE=row_mode(xv),
            GZQ_MODE=row_mode(gzqv), GZ_MODE=row_mode(gzv), num_warps=warps)
        if g_codebook is not None and deterministic:
            _deterministic_codebook_grad(xv, cb, idx, gcb, gcb_stride, grad_cb, ACC, wrap,
                                         piece_rows)
    return grad_z, grad_cb.to(codebook.dtype)


# Sorted rows one program of the deterministic codebook gradient sums (32 blocks of 32 rows), and
# the piece sums its join kernel loads at a time.
PIECE_ROWS = 1024
JOIN_BLOCK_P = 32


def _deterministic_codebook_grad(xv: RowView, cb, idx, gcb, gcb_stride, grad_cb, ACC, wrap,
                                 piece_rows: Optional[int] = None):
    """grad_cb[k] = sum over code k's rows, bitwise repeatable. A stable sort groups the rows of
    each code in ascending row order (start[k] is where code k's rows begin); each code's run is
    cut into pieces of P sorted rows, each summed by one program, and the pieces of a longer run
    are added in piece order by a second kernel: a two-level tree whose shape depends only on the
    codes' row counts. O(N + K) memory, no N x K anything, no host sync: the grid is a bound on
    the number of pieces, cdiv(N, P) + min(K, N), and the spare slots exit at once."""
    K, D = cb.shape
    N = idx.numel()
    P = piece_rows or PIECE_ROWS
    br = 32
    if P <= 0 or P % br:
        raise ValueError(f"piece_rows must be a positive multiple of {br}, got {P}")
    dev = idx.device
    sorted_idx, order = torch.sort(idx, stable=True)
    start = torch.searchsorted(sorted_idx, torch.arange(K + 1, device=dev))
    n_pieces = (start[1:] - start[:-1] + (P - 1)) // P                  # 0 for an unused code
    piece_base = torch.cat([n_pieces.new_zeros(1), torch.cumsum(n_pieces, 0)])
    slots = triton.cdiv(N, P) + min(K, N)
    piece_code = torch.searchsorted(piece_base[1:], torch.arange(slots, device=dev), right=True)
    # Only the codes of two pieces or more keep partial sums: 2 N / P rows of them at most.
    multi = torch.where(n_pieces > 1, n_pieces, 0)
    part_base = torch.cumsum(multi, 0) - multi
    part = torch.empty((2 * triton.cdiv(N, P) + 1, D), dtype=grad_cb.dtype, device=dev)
    bdc = min(64, max(16, triton.next_power_of_2(D)))
    wrap(K_.vq_backward_codebook_kernel)[(slots, triton.cdiv(D, bdc))](
        xv.tensor, xv.S, D, xv.sb, xv.ss, xv.sd, cb, K, order, start, piece_code, piece_base,
        part_base, part, gcb, gcb_stride, grad_cb, PIECE=P, ACC=ACC, BLOCK_R=br, BLOCK_D=bdc,
        X_MODE=row_mode(xv), num_warps=4)
    wrap(K_.vq_backward_codebook_join_kernel)[(K, triton.cdiv(D, bdc))](
        D, piece_base, part_base, part, grad_cb, ACC=ACC, BLOCK_P=JOIN_BLOCK_P, BLOCK_D=bdc,
        num_warps=4)
