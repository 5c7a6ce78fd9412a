"""Codebook upkeep for the quantizer modules (`VectorQuantizer`, the residual and grouped quantizers): k-means++ initialisation, EMA statistics, dead-code
restarts, usage statistics and their synchronisation across torch.distributed ranks.

Everything here works from the search's indices and per-code counts: per-code sums are a
scatter-add over indices (`index_add_`), counts a `bincount`, k-means++ keeps one distance per row
(to the nearest centre chosen so far). No N x K matrix and no one-hot tensor is ever formed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quantize import nearest_code

__all__ = ["kmeans_plusplus", "laplace_smoothed", "usage_stats", "DistContext", "batch_usage",
           "upkeep_errors", "book_losses"]

# Generators are seeded from (seed, step) through this odd multiplier so that nearby seeds and
# steps give unrelated streams while staying identical on every rank.
_SEED_MIX = 0x9E3779B97F4A7C15


def seeded_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from `seed` and `salt`: the same on every rank for the same inputs."""
    s = seed & (2**63 - 1)
    for v in salt:
        s = (s * _SEED_MIX + v + 1) & (2**63 - 1)
    return torch.Generator().manual_seed(s)


# ------------------------------------------------------------------------------ k-means++
def kmeans_plusplus(x: Tensor, k: int, *, generator: Optional[torch.Generator] = None,
                    iters: int = 0, backend: str = "auto", cosine: bool = False) -> Tensor:
    """`k` centres for the rows of `x` (N, D): k-means++ seeding, then `iters` Lloyd iterations.

    Seeding (Arthur & Vassilvitskii 2007) draws each new centre with probability proportional to a
    row's squared distance to its nearest centre so far. That distance is kept per row and lowered
    against each new centre as it is drawn: O(N*D) per centre, one matrix-vector product. The draw
    is an inverse-CDF lookup on the running cumsum with uniforms drawn up front from `generator`
    (on the CPU), so the result depends only on `x` and the generator, not on the device, and needs
    no host sync per centre.
    When every row already coincides with a centre (fewer distinct rows than `k`) the remaining
    centres are drawn uniformly, duplicates included; restarts can later move them.

    Lloyd iterations assign with `vqkernels.nearest_code` and recompute means by scatter-add; an
    empty cluster keeps its centre. With `cosine`, rows are expected l2-normalised and means are
    re-normalised (spherical k-means). No autograd: x is detached.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {tuple(x.shape)}")
    x = x.detach()  # an initialisation, not a differentiable function of x
    # Rows with NaN or inf would become (or poison) centres: they take no part.
    x = x[torch.isfinite(x).all(1)]
    N, D = x.shape
    if N == 0:
        raise ValueError("x must have at least one row (a finite one) to seed k-means++ from")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    u = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    uniform_pick = (u * N).long().clamp_(max=N - 1)
    # Distances by the expansion |x|^2 - 2 x.c + |c|^2, one GEMV per centre (several times
    # cheaper than forming x - c), in float64: products of float32 values are exact there, so
    # the cancellation left for a row equal to a centre is ~1e-16 of the norms, and is set to 0
    # below with everything else under 1e-12 of them. The cumsum over N rows is float64 too, so
    # small distances are not lost to rounding.
    x64 = x.double()
    x_sq = (x64 * x64).sum(1)

    def sqdist_to(row):
        c = x64[row[0]]
        c_sq = (c * c).sum()
        d = x_sq - 2.0 * (x64 @ c) + c_sq
        return torch.where(d <= 1e-12 * (x_sq + c_sq), 0.0, d)

    picks = [uniform_pick[:1]]
    d2 = sqdist_to(picks[0])
    for j in range(1, k):
        cdf = torch.cumsum(d2, 0)
        total = cdf[-1:]
        # right=True returns the first row whose cdf exceeds u*total: rows at distance 0 (already
        # centres) have a flat cdf step and can never be picked.
        pick = torch.searchsorted(cdf, u[j:j + 1] * total, right=True).clamp_(max=N - 1)
        pick = torch.where(total > 0, pick, uniform_pick[j:j + 1])
        picks.append(pick)
        torch.minimum(d2, sqdist_to(pick), out=d2)
    centres = x.index_select(0, torch.cat(picks))
    return lloyd(x, centres, iters, backend=backend, cosine=cosine)


def lloyd(x: Tensor, centres: Tensor, iters: int, *, backend: str = "auto",
          cosine: bool = False) -> Tensor:
    """`iters` Lloyd iterations from `centres`, assigning with the fused nearest-code search."""
    k = centres.shape[0]
    for _ in range(iters):
        idx, _ = nearest_code(x, centres, backend=backend)
        cnt = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        new = sums / cnt.clamp(min=1).to(sums.dtype)[:, None]
        if cosine:
            new = F.normalize(new, dim=1)
        centres = torch.where((cnt > 0)[:, None], new, centres)
    return centres


# ------------------------------------------------------------------------------ EMA
def laplace_smoothed(cluster_size: Tensor, eps: float) -> Tensor:
    """Sonnet's VectorQuantizerEMA smoothing: (N_k + eps) / (n + K eps) * n with n = sum N_k.

    It keeps every size strictly positive (so sum_k / size_k never divides by zero) while keeping
    the total n unchanged.
    """
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.numel() * eps) * n


# ------------------------------------------------------------------------------ statistics
def usage_stats(counts: Tensor) -> dict[str, float]:
    """perplexity (exp of the entropy of code usage), codes_used and used_fraction from per-code
    counts (e.g. a bincount of a held-out set's indices)."""
    c = counts.double()
    total = c.sum()
    p = c / total.clamp(min=1)
    used = int((c > 0).sum())
    return {"perplexity": float(torch.exp(-torch.special.xlogy(p, p).sum())),
            "codes_used": used, "used_fraction": used / max(c.numel(), 1)}


# ------------------------------------------------------------------------------ several books
# What the residual and grouped quantizers (quantizers/multi.py) do for each of their books after
# the search, in one place.
def batch_usage(idx: Tensor, weights: Optional[Tensor], num_codes: int,
                acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(counts, perplexity) of one book in this batch: int64 per-code counts of `idx` (rows with
    index -1 must carry weight 0), each row weighted by `weights` (None: 1), and exp of the entropy
    of that usage (in `acc`)."""
    cnt = torch.bincount(idx.clamp(min=0), weights=weights, minlength=num_codes)
    counts = cnt.round().long() if cnt.is_floating_point() else cnt
    p = cnt.to(acc) / cnt.sum().clamp(min=1).to(acc)
    return counts, torch.special.entr(p).sum().exp()


def upkeep_errors(err: Tensor, idx: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Per-row errors for a book's upkeep, inf on the rows it must skip: rows that sat its stage
    out (index -1) and padding rows (valid False)."""
    skip = idx < 0 if valid is None else (idx < 0) | ~valid
    return torch.where(skip, torch.inf, err)


def book_losses(codebook_loss: Tensor, commitment_loss: Tensor, beta: float,
                ema: bool) -> tuple[Tensor, Tensor]:
    """(codebook_loss, loss) of per-book loss terms: loss = sum codebook + beta commitment, or, when
    the books move by EMA, beta * sum commitment with the codebook term reported detached."""
    if ema:
        return codebook_loss.detach(), beta * commitment_loss.sum()
    return codebook_loss, (codebook_loss + beta * commitment_loss).sum()


# ------------------------------------------------------------------------------ distributed
class DistContext:
    """The process group a quantizer synchronises over: world size 1 (no collectives) when
    torch.distributed is not initialised, `sync` is off, or the group has one rank."""

    def __init__(self, sync: bool, group=None):
        self.group, self.world, self.rank = None, 1, 0
        if not sync:
            return
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_(self, buf: Tensor, op: str = "sum") -> Tensor:
        if self.active:
            import torch.distributed as dist
            dist.all_reduce(buf, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        return buf

    def broadcast_from_first_(self, buf: Tensor) -> Tensor:
        if self.active:
            import torch.distributed as dist
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast(buf, src=src, group=self.group)
        return buf

    def gather_rows(self, local: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Every rank's first `m` rows of `local` (padded where a rank has fewer), concatenated in
        rank order, with a validity mask: an all_gather written as one all_reduce of disjoint
        slots, so it can share a packed buffer with other sums."""
        D = local.shape[1]
        slot = local.new_zeros(self.world, m, D + 1)
        n = min(m, local.shape[0])
        slot[self.rank, :n, :D] = local[:n]
        slot[self.rank, :n, D] = 1
        self.all_reduce_(slot)
        slot = slot.view(-1, D + 1)
        return slot[:, :D], slot[:, D] > 0


def pick_rows(n_rows: int, m: int, generator: torch.Generator, device) -> Tensor:
    """Up to `m` distinct row indices out of `n_rows`, drawn with `generator` (on the CPU)."""
    if n_rows <= m:
        return torch.arange(n_rows, device=device)
    if n_rows <= 16 * m or n_rows <= (1 << 16):
        return torch.randperm(n_rows, generator=generator)[:m].to(device)
    # A randperm of a huge batch per step would cost more than the step's bookkeeping; with
    # n_rows > 16 m, draws with replacement rarely collide and a collision only wastes a slot.
    return torch.randint(n_rows, (m,), generator=generator).to(device)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_positive_int(name: str, v, allow_none: bool = False, minimum: int = 1):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {v!r}")


def check_unit_interval(name: str, v, *, closed_low: bool, closed_high: bool):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 0 if closed_low else v > 0) and (v <= 1 if closed_high else v < 1)
    if not ok:
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        raise ValueError(f"{name} must be a number in {lo}0, 1{hi}, got {v!r}")
