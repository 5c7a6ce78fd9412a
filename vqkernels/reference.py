"""Plain-PyTorch vector quantization: the oracle every other backend is tested against.

Short and obviously right rather than fast. Everything is computed in float64 whatever the input
dtype, so against it a float32 kernel is judged by fp32 rounding alone. The search runs over
chunks of rows, so memory is O(chunk x K), never N x K.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._layout import output_like


__all__ = ["forward", "backward", "acc_dtype"]

# Rows per chunk are picked so that one chunk's distance block holds about this many float64s.
_CHUNK_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-row errors and gradient weights: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(z: torch.Tensor, dim: int) -> torch.Tensor:
    return z.movedim(dim, -1).reshape(-1, z.shape[dim])


def forward(z: torch.Tensor, codebook: torch.Tensor, dim: int = -1):
    """(z_q, indices, sqerr, counts) for `z` quantized along `dim` against `codebook` (K, D).

    indices and sqerr have z's shape without `dim`; sqerr is the exact sum of (z - e)^2 of the chosen
    code e in `acc_dtype`; a row whose error is not finite gets NaN in z_q; ties go to the lowest index.
    """
    K = codebook.shape[0]
    x = _rows(z, dim).double()
    e = codebook.double()
    e_sq = (e * e).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=z.device)
    chunk = max(1, _CHUNK_ELEMENTS // K)
    for lo in range(0, x.shape[0], chunk):
        xc = x[lo:lo + chunk]
        # ||x||^2 is the same for every code of a row; keeping it makes these true distances.
        xc_sq = (xc * xc).sum(1, keepdim=True)
        d = xc_sq - 2.0 * (xc @ e.T) + e_sq
        # The expansion is only a filter: a BLAS matmul may round two equal columns differently,
        # so every code within float64 rounding of the minimum is re-measured by direct
        # differences, and the first minimum of those exact distances wins (ties to lowest index).
        slack = 1e-9 * (xc_sq + e_sq.max())
        near = (d <= d.min(1, keepdim=True).values + slack).nonzero()
        exact = torch.full_like(d, torch.inf)
        exact[near[:, 0], near[:, 1]] = ((xc[near[:, 0]] - e[near[:, 1]]) ** 2).sum(1)
        best = exact.argmin(1)
        # A row with NaN has no finite distance: it keeps the expansion's argmin (a NaN at 0).
        idx[lo:lo + chunk] = torch.where(torch.isfinite(exact.min(1).values), best, d.argmin(1))
    chosen = e[idx]
    sqerr = ((x - chosen) ** 2).sum(1)
    zq_rows = torch.where(torch.isfinite(sqerr)[:, None], chosen, torch.nan)
    lead = z.movedim(dim, -1).shape[:-1]
    z_q = output_like(z, dim)
    z_q.copy_(zq_rows.reshape(*lead, codebook.shape[1]).movedim(-1, dim))
    counts = torch.bincount(idx, minlength=K)
    return z_q, idx.reshape(lead), sqerr.to(acc_dtype(z.dtype)).reshape(lead), counts


def backward(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, dim: int,
             grad_zq: Optional[torch.Tensor], g_codebook: Optional[torch.Tensor],
             g_commit: Optional[torch.Tensor]):
    """(grad_z, grad_codebook) of the straight-through VQ op.

    grad_z = grad_zq + 2 g_commit (z - e); grad_codebook[k] = sum over rows choosing k of
    2 g_codebook (e - z). g_* are per-row weights shaped like `indices`; None means zero.
    """
    x = _rows(z, dim).double()
    idx = indices.reshape(-1)
    e = codebook.double()[idx]
    diff = x - e
    gx = torch.zeros_like(x) if grad_zq is None else _rows(grad_zq, dim).double()
    if g_commit is not None:
        gx = gx + 2.0 * g_commit.reshape(-1, 1).double() * diff
    grad_cb = torch.zeros_like(codebook, dtype=torch.float64)
    if g_codebook is not None:
        grad_cb.index_add_(0, idx, -2.0 * g_codebook.reshape(-1, 1).double() * diff)
    lead = z.movedim(dim, -1).shape[:-1]
    grad_z = output_like(z, dim)
    grad_z.copy_(gx.reshape(*lead, codebook.shape[1]).movedim(-1, dim))
    return grad_z, grad_cb.to(codebook.dtype)


