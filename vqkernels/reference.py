"""Plain-PyTorch vector quantization: the oracle every other backend is tested against.

Short and obviously right rather than fast. Everything is computed in float64 whatever the input
dtype, so against it a float32 kernel is judged by fp32 rounding alone. The search runs over
chunks of rows, so memory is O(chunk x K), never N x K.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._layout import output_like


__all__ = ["forward", "backward", "acc_dtype", "nearest"]

# Rows per chunk are picked so that one chunk's distance block holds about this many float64s.
_CHUNK_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-row errors and gradient weights: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(z: torch.Tensor, dim: int) -> torch.Tensor:
    return z.movedim(dim, -1).reshape(-1, z.shape[dim])


# Float64 squares overflow past 2^511 and lose bits below 2^-511; float64 input beyond those
# magnitudes is searched on values scaled by one power of two (exact, so ties stay ties).
_BIG, _SMALL = 2.0 ** 480, 2.0 ** -480


def _search_scale(x: torch.Tensor, e: torch.Tensor) -> float:
    """The power of two a float64 search multiplies rows and codes by (1.0 for anything narrower
    than float64, whose squares always fit float64)."""
    if x.dtype != torch.float64 or x.numel() == 0 or e.numel() == 0:
        return 1.0
    m = max(float(torch.nan_to_num(x.abs(), posinf=0.0, nan=0.0).max()),
            float(torch.nan_to_num(e.abs(), posinf=0.0, nan=0.0).max()))
    if m > _BIG:
        return 2.0 ** (480 - math.frexp(m)[1])
    if 0.0 < m < _SMALL:
        return 2.0 ** (-480 - math.frexp(m)[1])
    return 1.0


def _nan_inf(t: torch.Tensor) -> torch.Tensor:
    return t.masked_fill(torch.isnan(t), torch.inf)


def nearest(x: torch.Tensor, e: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Indices of the nearest codes of float64 rows `x` (n, D) in float64 codes `e` (K, D).

    The answer every backend must give: the lowest k minimising the exact sum_d (x_d - e_d)^2 as
    float64 computes it, a NaN distance counting as +inf. So a row with NaN or +-inf gets index 0,
    and a code with NaN or +-inf is never chosen for a finite row unless every code is non-finite.
    """
    if scale != 1.0:
        x, e = x * scale, e * scale
    K = e.shape[0]
    e_sq = (e * e).sum(1)
    code_ok = torch.isfinite(e_sq)
    e_max = float(e_sq[code_ok].max()) if bool(code_ok.any()) else 0.0
    idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(K, 1))
    for lo in range(0, x.shape[0], chunk):
        xc = x[lo:lo + chunk]
        # ||x||^2 is the same for every code of a row; keeping it makes these true distances.
        xc_sq = (xc * xc).sum(1, keepdim=True)
        d = _nan_inf(xc_sq - 2.0 * (xc @ e.T) + e_sq)
        d[:, ~code_ok] = torch.inf
        # The expansion is only a filter: every code within far more than its float64 rounding
        # ((2D + 4) 2^-53 (||x||^2 + max||e||^2), below 1e-9 of it for D < 10^6) of the minimum is
        # re-measured by direct differences, and the first minimum of those exact distances wins.
        # A row whose expansion is not finite (non-finite values) is measured against every code.
        m = d.min(1, keepdim=True).values
        slack = 1e-9 * (xc_sq + e_max) + 1e-300
        near = ((d <= m + slack) | ~torch.isfinite(m)).nonzero()
        exact = torch.full_like(d, torch.inf)
        diff = xc[near[:, 0]] - e[near[:, 1]]
        exact[near[:, 0], near[:, 1]] = _nan_inf((diff * diff).sum(1))
        best = exact.argmin(1)  # the first minimum: ties to the lowest index
        idx[lo:lo + chunk] = torch.where(torch.isfinite(exact.min(1).values), best, 0)
    return idx


def forward(z: torch.Tensor, codebook: torch.Tensor, dim: int = -1):
    """(z_q, indices, sqerr, counts) for `z` quantized along `dim` against `codebook` (K, D).

    indices and sqerr have z's shape without `dim`; indices follow `nearest`; sqerr is the exact sum
    of (z - e)^2 of the chosen code, computed in float64 and returned in `acc_dtype` (+inf where it
    exceeds that range); NaN in z_q where the row or its code is not finite. Memory: chunks of rows
    in float64, never the whole input.
    """
    K, D = codebook.shape
    rows = _rows(z, dim)
    e = codebook.double()
    scale = _search_scale(rows, e)
    N = rows.shape[0]
    idx = torch.empty(N, dtype=torch.long, device=z.device)
    sqerr = torch.empty(N, dtype=acc_dtype(z.dtype), device=z.device)
    z_q = output_like(z, dim)
    zq_moved = z_q.movedim(dim, -1)
    # Written in place where z_q's rows are a view (any row-major z), else through a buffer.
    direct = zq_moved.is_contiguous()
    zq_rows = zq_moved.view(-1, D) if direct else torch.empty(N, D, dtype=z.dtype, device=z.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(K, D, 1))
    for lo in range(0, N, chunk):
        xc = rows[lo:lo + chunk].double()
        ic = nearest(xc, e, scale)
        chosen = e[ic]
        diff = xc - chosen
        err = (diff * diff).sum(1)
        idx[lo:lo + chunk] = ic
        sqerr[lo:lo + chunk] = err.to(sqerr.dtype)
        # NaN where the row or the code is not finite (not where a finite float64 error overflows).
        ok = torch.isfinite(err) if scale == 1.0 else torch.isfinite(
            ((xc * scale - chosen * scale) ** 2).sum(1))
        zq_rows[lo:lo + chunk] = torch.where(ok[:, None], chosen, torch.nan)
    lead = z.movedim(dim, -1).shape[:-1]
    if not direct:
        z_q.copy_(zq_rows.reshape(*lead, D).movedim(-1, dim))
    counts = torch.bincount(idx, minlength=K)
    return z_q, idx.reshape(lead), sqerr.reshape(lead), counts


def backward(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, dim: int,
             grad_zq: Optional[torch.Tensor], g_codebook: Optional[torch.Tensor],
             g_commit: Optional[torch.Tensor]):
    """(grad_z, grad_codebook) of the straight-through VQ op.

    grad_z = grad_zq + 2 g_commit (z - e); grad_codebook[k] = sum over rows choosing k of
    2 g_codebook (e - z). g_* are per-row weights shaped like `indices`; None means zero.
    """
    K, D = codebook.shape
    rows = _rows(z, dim)
    g_rows = None if grad_zq is None else _rows(grad_zq, dim)
    idx = indices.reshape(-1)
    gc = None if g_codebook is None else g_codebook.reshape(-1)
    gm = None if g_commit is None else g_commit.reshape(-1)
    e_all = codebook.double()
    grad_cb = torch.zeros_like(codebook, dtype=torch.float64)
    grad_z = output_like(z, dim)
    gz_moved = grad_z.movedim(dim, -1)
    direct = gz_moved.is_contiguous()  # written in place where grad_z's rows are a view
    gx_rows = gz_moved.view(-1, D) if direct else torch.empty(rows.shape, dtype=z.dtype,
                                                              device=z.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(D, 1))
    for lo in range(0, rows.shape[0], chunk):
        hi = lo + chunk
        ic = idx[lo:hi]
        diff = rows[lo:hi].double() - e_all[ic]
        gx = torch.zeros_like(diff) if g_rows is None else g_rows[lo:hi].double()
        if gm is not None:
            gx = gx + 2.0 * gm[lo:hi, None].double() * diff
        if gc is not None:
            grad_cb.index_add_(0, ic, -2.0 * gc[lo:hi, None].double() * diff)
        gx_rows[lo:hi] = gx
    if not direct:
        grad_z.copy_(gx_rows.reshape(*z.movedim(dim, -1).shape[:-1], D).movedim(-1, dim))
    return grad_z, grad_cb.to(codebook.dtype)
