"""The k nearest codes and the cosine / inner-product metrics of `nearest_code`.

k = 1 with the squared-L2 metric is the fused kernels' search (vq_quantize's). Everything else
runs here, in plain torch over chunks of rows, in float64: memory is O(chunk x K) with about
2^22 float64s per chunk, never N x K (a native top-k kernel is future work; this is the chunked
implementation). The answer follows the exactness contract of the k = 1 search, extended to k:

- squared L2: d_j = sum_d (x_d - e_d)^2 as float64 computes it from the input values, a NaN
  distance counting as +inf; the k codes with the smallest d_j, sorted by (d_j, j), so exact ties
  go to the lower index.
- cosine: the inner product below on x / ||x|| and e / ||e|| normalised in float64 (a zero
  vector stays zero, so its cosine with anything is 0); the distance returned is 1 - cos.
- ip (maximum inner product): s_j = sum_d x_d e_d as float64 computes it elementwise; the k largest,
  sorted by (-s_j, j); the distance returned is -s_j (smaller is nearer, as for the others).

How: per chunk one float64 GEMM gives approximate values a_j; every code whose a_j is within a
generous slack of the row's k-th smallest is re-measured exactly (direct differences or products),
so the GEMM's rounding never decides an order. A row whose k-th value is not finite (NaN or inf in
the row, fewer than k finite codes) is measured exactly against every code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import _search_scale

METRICS = ("l2", "cosine", "ip")
_CHUNK_ELEMENTS = 1 << 22
# Relative slack of the candidate filter (derived at its use); a test sets it to 0 to show it is
# needed.
_SLACK_REL = 1e-9


def _exact(xr: Tensor, e: Tensor, metric: str) -> Tensor:
    """Exact values (smaller is nearer) of rows xr (m, D) against codes e (m, c, D) -> (m, c)."""
    if metric == "ip":
        v = -(xr[:, None, :] * e).sum(-1)
    else:
        diff = xr[:, None, :] - e
        v = (diff * diff).sum(-1)
    return v.masked_fill(torch.isnan(v), torch.inf)


def _sorted_topk(values: Tensor, cols: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest of `values` (m, c) at code indices `cols` (m, c), by (value, index)."""
    order = torch.argsort(cols, dim=1)  # by index first, then a stable sort by value
    v = values.gather(1, order)
    c = cols.gather(1, order)
    o2 = torch.argsort(v, dim=1, stable=True)[:, :k]
    return v.gather(1, o2), c.gather(1, o2)


def topk_rows(x: Tensor, codebook: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, values (N, k) float64) for float rows x (N, D) and codes (K, D)."""
    N, D = x.shape
    K = codebook.shape[0]
    e = codebook.detach().double()
    x = x.detach()
    scale = _search_scale(x, codebook) if metric == "l2" else 1.0
    if scale != 1.0:
        e = e * scale
    if metric == "cosine":
        e = torch.nn.functional.normalize(e, dim=1)
        metric = "ip"  # on the unit vectors; 1 - cos is added back at the end
        cosine = True
    else:
        cosine = False
    e_sq = (e * e).sum(1)
    code_ok = torch.isfinite(e_sq)
    e_max = float(e_sq[code_ok].max()) if bool(code_ok.any()) else 0.0
    idx = torch.empty(N, k, dtype=torch.long, device=x.device)
    val = torch.empty(N, k, dtype=torch.float64, device=x.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(K, 1))
    for lo in range(0, N, chunk):
        xc = x[lo:lo + chunk].double()
        if scale != 1.0:
            xc = xc * scale
        if cosine:
            xc = torch.nn.functional.normalize(xc, dim=1)
        xc_sq = (xc * xc).sum(1, keepdim=True)
        if metric == "ip":
            a = -(xc @ e.T)
        else:
            a = e_sq - 2.0 * (xc @ e.T)
        a = a.masked_fill(torch.isnan(a) | ~code_ok, torch.inf)
        kth = a.topk(k, dim=1, largest=False).values[:, -1:]
        # The GEMM's error is below (2D + 4) 2^-53 (||x||^2 + ||x|| ||e|| + ||e||^2) per value,
        # under 1e-9 of that sum for D < 10^6: a slack of 1e-9 keeps every code that could be in the
        # exact top k (the k-th exact value is at most kth + err, so a member's a_j is at most
        # kth + 2 err).
        slack = _SLACK_REL * (xc_sq + e_max + xc_sq.sqrt() * e_max ** 0.5) + 1e-300
        thr = kth + slack
        bad = ~torch.isfinite(thr).squeeze(1)
        near = a <= thr
        m = int(near.sum(1).max()) if near.numel() else 0
        m = max(m, k)
        cand_v, cand_c = a.topk(m, dim=1, largest=False)  # the candidates, in any order
        keep = cand_v <= thr
        # Exact values of the candidates, in row blocks so that duplicated codes (many ties, a
        # large m) cannot blow the m x D block up.
        vk = torch.empty(xc.shape[0], k, dtype=torch.float64, device=x.device)
        ck = torch.empty(xc.shape[0], k, dtype=torch.long, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // (m * D))
        for b in range(0, xc.shape[0], step):
            vals = _exact(xc[b:b + step], e[cand_c[b:b + step]], metric)
            vals = vals.masked_fill(~keep[b:b + step], torch.inf)
            vk[b:b + step], ck[b:b + step] = _sorted_topk(vals, cand_c[b:b + step], k)
        if bool(bad.any()):
            # Non-finite k-th value: every code measured exactly, one row at a time (rare).
            for r in bad.nonzero().flatten().tolist():
                allv = _exact(xc[r:r + 1], e[None], metric)
                v1, c1 = _sorted_topk(allv, torch.arange(K, device=x.device)[None], k)
                vk[r], ck[r] = v1[0], c1[0]
        idx[lo:lo + chunk] = ck
        val[lo:lo + chunk] = vk / (scale * scale) if scale != 1.0 else vk
    if cosine:
        val = val + 1.0
    return idx, val
