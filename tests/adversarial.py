"""Inputs built to break nearest-code searches, and the exact judgement of a search (issue 13).

Every family is made of values exact in the dtype under test, so the float64 distance of each row
to each code is the true one, and the truth is computed here by direct differences (not by the
package's reference). A search is judged by exact index equality: on rows whose best two codes are
apart by more than a tiny relative slack the index must be the exact argmin, and on exact ties
(equal float64 distances) the lowest such index. Nothing is judged by regret.
"""
from __future__ import annotations

import torch

# Gap between the best two exact distances, relative to the second, above which a row is "clear".
CLEAR_REL = 1e-6
# Power-of-two tile widths a kernel may group codes by (columns, panels, splits).
TILE_WIDTHS = [1, 2, 4, 8, 16, 32, 64, 128]


def exact_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 sum_d (x_d - e_d)^2 by direct differences; NaN counts as +inf."""
    D = codebook.shape[1]
    x64 = x.reshape(-1, D).double().cpu()
    e64 = codebook.double().cpu()
    out = torch.empty(x64.shape[0], e64.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, e64.shape[0] * max(D, 1)))
    for lo in range(0, x64.shape[0], step):
        out[lo:lo + step] = ((x64[lo:lo + step, None, :] - e64[None]) ** 2).sum(-1)
    return out.masked_fill(torch.isnan(out), float("inf"))


def exact_answer(x, codebook):
    """(index, clear, d): the lowest index of the minimal exact distance per row, whether the row's
    best two are clearly apart, and the distances."""
    d = exact_distances(x, codebook)
    best = d.min(1).values
    # Lowest index among exact minima (argmin's tie rule is not promised, so find it directly).
    ar = torch.arange(d.shape[1]).expand_as(d)
    idx = torch.where(d == best[:, None], ar, d.shape[1]).min(1).values
    idx = torch.where(torch.isfinite(best), idx, 0)
    if d.shape[1] > 1:
        two = d.topk(2, dim=1, largest=False).values
        clear = (two[:, 1] - two[:, 0]) > CLEAR_REL * two[:, 1]
    else:
        clear = torch.ones(d.shape[0], dtype=torch.bool)
    return idx, clear, d


def assert_exact(x, codebook, indices, *, what=""):
    """indices equal the exact argmin wherever the best two are clearly apart; on exact ties the
    lowest index; elsewhere (a near tie inside the slack) a code within the slack of the best."""
    idx = indices.reshape(-1).cpu()
    ref, clear, d = exact_answer(x, codebook)
    assert idx.shape == ref.shape
    wrong = clear & (idx != ref)
    assert not wrong.any(), (
        f"{what}: {int(wrong.sum())} of {int(clear.sum())} clearly separated rows got another code "
        f"than the exact nearest (first rows {wrong.nonzero()[:5, 0].tolist()})")
    best = d.min(1).values
    chosen = d.gather(1, idx.clamp(0, d.shape[1] - 1)[:, None])[:, 0]
    tie = chosen == best
    # An exact tie goes to the lowest index.
    bad_tie = tie & (idx != ref) & torch.isfinite(best)
    assert not bad_tie.any(), f"{what}: {int(bad_tie.sum())} exact ties not given to the lowest index"
    near = ~clear & ~tie & torch.isfinite(best)
    assert ((chosen[near] - best[near]) <= CLEAR_REL * chosen[near]).all(), what
    return int(clear.sum())


def _grid(gen, shape, lo, hi, step):
    return torch.randint(lo, hi + 1, shape, generator=gen).double() * step


def close_codes(gen, *, N=160, K=300, D=32, n_close=3, spacing=None, offset=2.0 ** 12,
                dtype=torch.float32):
    """Codes and rows far from the origin (|values| ~ offset) on a grid exact in fp32: `n_close`
    codes sit close to every row, at indices p0 + j * spacing (congruent modulo `spacing`), or at
    random indices when spacing is None; the rest are background codes a little farther away.
    At these magnitudes the fp32 expansion ||e||^2 - 2 x.e has rounding errors far larger than the
    gaps between the close codes."""
    center = torch.where(torch.rand(D, generator=gen) < 0.5, -1.0, 1.0).double() * offset
    center = center + _grid(gen, (D,), -8, 8, 1.0)
    if spacing is None:
        pos = torch.randperm(K, generator=gen)[:n_close]
    else:
        assert (n_close - 1) * spacing < K
        p0 = int(torch.randint(0, K - (n_close - 1) * spacing, (1,), generator=gen))
        pos = torch.arange(n_close) * spacing + p0
    cb = center + _grid(gen, (K, D), -96, 96, 1 / 64)
    cb[pos] = center + _grid(gen, (n_close, D), -24, 24, 1 / 64)
    x = center + _grid(gen, (N, D), -24, 24, 1 / 64)
    return x.to(dtype), cb.to(dtype)


def duplicated(gen, *, N=120, K0=40, D=16, copies=3, interleave=True, offset=2.0 ** 12,
               dtype=torch.float32):
    """Every code present `copies` times (consecutive copies, or the whole codebook repeated), far
    from the origin: the lowest copy must win."""
    center = offset + _grid(gen, (D,), -8, 8, 1.0)
    base = center + _grid(gen, (K0, D), -32, 32, 1 / 16)
    cb = base.repeat_interleave(copies, 0) if interleave else base.repeat(copies, 1)
    x = base[torch.randint(0, K0, (N,), generator=gen)] + _grid(gen, (N, D), -4, 4, 1 / 16)
    return x.to(dtype), cb.to(dtype)


def reflections(gen, *, N=100, D=8, offset=2.0 ** 10, extra=20, dtype=torch.float32):
    """Exact ties: for each row x a pair e_a = x + delta, e_b = x - delta (equal float64 distances),
    the pair's order in the codebook random, plus farther codes."""
    x = offset + _grid(gen, (N, D), -64, 64, 1 / 8)
    delta = _grid(gen, (N, D), -4, 4, 1 / 8)
    delta[:, 0] = 1 / 8  # never zero
    a, b = x + delta, x - delta
    flip = torch.rand(N, generator=gen) < 0.5
    first = torch.where(flip[:, None], b, a)
    second = torch.where(flip[:, None], a, b)
    far = offset + _grid(gen, (extra, D), -64, 64, 1 / 8) + 40.0
    cb = torch.cat([torch.stack([first, second], 1).reshape(2 * N, D), far])
    perm = torch.randperm(cb.shape[0], generator=gen)
    # Keep each pair's relative order random but both present: permuting keeps the tie (equal
    # distances) and moves which one is lower.
    return x.to(dtype), cb[perm].to(dtype)


def large_mean(gen, *, N=300, K=256, D=64, mean=1000.0, dtype=torch.float32):
    """Data with a large common mean (1000 + N(0, 1)): rows and codes alike."""
    x = mean + torch.randn(N, D, generator=gen, dtype=torch.float64)
    cb = mean + torch.randn(K, D, generator=gen, dtype=torch.float64)
    return x.to(dtype), cb.to(dtype)


def magnitudes(gen, scale, *, N=200, K=64, D=16, dtype=torch.float32):
    """Finite values of magnitude ~scale (1e19..1e30: squares overflow fp32; 1e-25..1e-38: they
    underflow), rows near codes."""
    cb = torch.randn(K, D, generator=gen, dtype=torch.float64)
    x = cb[torch.randint(0, K, (N,), generator=gen)] + 0.3 * torch.randn(N, D, generator=gen,
                                                                          dtype=torch.float64)
    return (x * scale).to(dtype), (cb * scale).to(dtype)


def fp32_expansion_argmin(x, codebook):
    """What a plain fp32 search on the expansion ||e||^2 - 2 x.e returns (the approximate pass
    alone): used to show the families really defeat it."""
    x32 = x.reshape(-1, codebook.shape[1]).float()
    e32 = codebook.float()
    return ((e32 * e32).sum(1)[None] - 2 * x32 @ e32.T).argmin(1)
