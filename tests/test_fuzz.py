"""Fuzzing the public API against float64 arithmetic: random shapes (empty, single rows and codes,
odd D), every dtype, layouts the kernels read in place (channel-first, transposed, sliced, stride
0) and magnitudes from 1e-3 to 1e3, near the origin and far from it. Each call is judged by
itself, in float64, not against another backend:

  - indices: exactly the float64 argmin wherever the best two codes are clearly apart, the lowest
    index on exact ties (adversarial.assert_exact: the contract of "What nearest means" in the
    README), and sqdist the chosen code's error.
  - z_q is a bit copy of the chosen code; the losses are the exact mean squared error of the
    chosen codes; the gradients are those of the straight-through estimator and the two losses,
    computed here from the returned indices.
"""
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from vqkernels import nearest_code, vq_quantize
from conftest import backend_params
from helpers import assert_search_ok, exact_sqdist
from adversarial import assert_exact

BACKENDS = [p.values[0] for p in backend_params("cpu", ("cpu", "reference")) if not p.marks]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["rows", "channel_first", "transposed", "dim0", "sliced", "broadcast"]


def _make(layout, N, D, values):
    """A tensor holding the (N, D) rows `values` in `layout`, and the dim its codes lie along."""
    if layout == "rows":
        return values.clone(), -1
    if layout == "transposed":  # (N, D) rows over (D, N) memory: elements strided by N
        return values.t().contiguous().t(), -1
    if layout == "dim0":  # (D, N): the codes along dim 0
        return values.t().contiguous(), 0
    if layout == "channel_first":  # (1, D, N, 1): a feature map, channels strided by N
        return values.t().contiguous().reshape(1, D, N, 1), 1
    if layout == "sliced":  # every other row and element of a bigger buffer
        big = torch.zeros(2 * N, 2 * D, dtype=values.dtype)
        big[::2, ::2] = values
        return big[::2, ::2], -1
    if layout == "broadcast":  # one row read N times: stride 0
        return values[:1].expand(N, D), -1
    raise AssertionError(layout)


def _rows(t, dim):
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


@settings(max_examples=80, deadline=None)
# A sum that cancels (K = 1, D = 1): the codebook gradient is ~0, its fp32 rounding is not.
@example(N=12, K=1, D=1, dtype=torch.bfloat16, layout="sliced", scale=1.0, far=1000.0, beta=0.0,
         seed=654578546, backend="cpu")
@given(N=st.integers(0, 48), K=st.integers(1, 24), D=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), far=st.sampled_from([0.0, 30.0, 1000.0]),
       beta=st.sampled_from([0.0, 0.25, 3.0]), seed=st.integers(0, 2**31 - 1),
       backend=st.sampled_from(BACKENDS))
def test_fuzz_against_float64(N, K, D, dtype, layout, scale, far, beta, seed, backend):
    assume(N > 0 or layout != "broadcast")  # a broadcast needs a row to repeat
    g = torch.Generator().manual_seed(seed)
    # codes and rows around a centre `far` code-spreads from the origin
    centre = far * scale * torch.randn(D, generator=g, dtype=torch.float64)
    cb64 = centre + scale * torch.randn(K, D, generator=g, dtype=torch.float64)
    pick = torch.randint(0, K, (N,), generator=g)
    z64 = cb64[pick] + 0.5 * scale * torch.randn(N, D, generator=g, dtype=torch.float64)
    # stay inside the dtype's range, squares included (the errors are summed in fp32 at least)
    big = float(max(cb64.abs().max(), z64.abs().max() if N else 0.0))
    assume(big * big * D < torch.finfo(dtype if dtype == torch.float64 else torch.float32).max / 16)
    assume(big < torch.finfo(dtype).max / 4)
    cb = cb64.to(dtype)
    z, dim = _make(layout, N, D, z64.to(dtype))
    rows, N_eff = _rows(z, dim), z.numel() // D

    # the search alone
    idx, sq = nearest_code(z, cb, dim=dim, backend=backend)
    assert idx.shape == tuple(s for i, s in enumerate(z.shape) if i != dim % z.dim())
    assert_search_ok(rows, cb, idx, sq, exact_when_clear=False)  # sqdist; indices next
    assert_exact(rows, cb, idx, what=f"{backend} {dtype} {layout}")

    # the full op, forward and backward
    zr = z.detach().clone().requires_grad_(True) if layout != "broadcast" else \
        z.detach()[:1].clone().requires_grad_(True)
    zin = zr.expand(N, D) if layout == "broadcast" else zr
    cbr = cb.clone().requires_grad_(True)
    out = vq_quantize(zin, cbr, beta=beta, dim=dim, backend=backend)
    i = out.indices.reshape(-1)
    assert torch.equal(out.indices, idx)  # the same search
    assert torch.equal(_rows(out.z_q.detach(), dim), cb[i])  # a bit copy of the codes
    d = exact_sqdist(rows, cb).gather(1, i[:, None])[:, 0] if N_eff else torch.zeros(0)
    numel = max(z.numel(), 1)
    want = float(d.sum()) / numel
    rtol = 8 * math.sqrt(D) * torch.finfo(torch.float32).eps
    for got, w in ((out.commitment_loss, want), (out.codebook_loss, want),
                   (out.loss, (1 + beta) * want)):
        assert float(got.detach()) == pytest.approx(w, rel=2 * rtol, abs=1e-300)

    gzq = torch.randn(out.z_q.shape, generator=g, dtype=torch.float64).to(dtype)
    (out.z_q * gzq).sum().backward(retain_graph=True)
    out.loss.backward()
    # by hand, in float64, from the returned indices
    e = cb64.to(dtype).double()[i]
    x = rows.double()
    gz_rows = _rows(gzq, dim).double() + 2 * beta / numel * (x - e)
    gcb = torch.zeros(K, D, dtype=torch.float64).index_add_(0, i, 2.0 / numel * (e - x))
    # The same sums of absolute terms: what the rounding of a sum is relative to.
    gz_abs = _rows(gzq, dim).double().abs() + 2 * beta / numel * (x - e).abs()
    gcb_abs = torch.zeros(K, D, dtype=torch.float64).index_add_(0, i, 2.0 / numel * (e - x).abs())
    if layout == "broadcast":
        gz_want, gz_abs = gz_rows.sum(0, keepdim=True), gz_abs.sum(0, keepdim=True)
    else:
        shape = z.movedim(dim, -1).shape
        gz_want = gz_rows.reshape(shape).movedim(-1, dim)
        gz_abs = gz_abs.reshape(shape).movedim(-1, dim)
    eps = torch.finfo(dtype).eps
    eps_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    for got, want_g, terms in ((zr.grad, gz_want, gz_abs), (cbr.grad, gcb, gcb_abs)):
        assert got.dtype == dtype and got.shape == want_g.shape
        tol = 8 * eps * (float(want_g.abs().max()) if want_g.numel() else 0.0) + 1e-300
        # summed terms (the codebook's, and the broadcast row's) round once per addition
        tol *= max(1, N_eff)
        # ... relative to the sum of their absolute values, not to the result: where the terms
        # cancel (K = 1, rows on both sides of the code) the result is ~0 and its error is not.
        # Without this, 3 in 13,458 fuzz examples failed on correct fp32 sums (e.g. bf16, K = 1,
        # D = 1: got 7e-9 where the float64 sum is 1e-17 and the terms are ~1).
        tol = tol + (max(1, N_eff) + 4) * eps_acc * terms
        err = (got.double() - want_g).abs()
        assert bool((err <= tol).all()), (
            f"gradient off by {float(err.max()):.3g} (allowed {float(tol.flatten()[err.argmax()]):.3g})")
