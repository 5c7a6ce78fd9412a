"""Every backend that runs here, through the public API, against the float64 reference."""
import math

import pytest
import torch

import vqkernels
from vqkernels import reference
from conftest import backend_device_params
from helpers import FLOAT_DTYPES, WEIRD_SHAPES, assert_search_ok, make_inputs

BD = backend_device_params()


def _gathered(codebook, indices):
    return codebook[indices.reshape(-1)]


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", WEIRD_SHAPES)
def test_forward_matches_reference(backend, device, dtype, N, K, D):
    z, cb = make_inputs(N, K, D, dtype, device=device)
    out = vqkernels.vq_quantize(z, cb, backend=backend)
    assert out.z_q.shape == z.shape and out.z_q.dtype == dtype
    assert out.indices.shape == (N,) and out.indices.dtype == torch.int64
    assert_search_ok(z, cb, out.indices)
    # z_q is the chosen code exactly: a gather, no arithmetic.
    assert torch.equal(out.z_q.reshape(-1, D), _gathered(cb, out.indices))
    idx, sqdist = vqkernels.nearest_code(z, cb, backend=backend)
    assert torch.equal(idx, out.indices)
    assert sqdist.dtype == reference.acc_dtype(dtype)
    assert_search_ok(z, cb, idx, sqdist)
    # The losses are means of the exact per-row error of the chosen code.
    exact = ((z.double() - _gathered(cb, out.indices).double()) ** 2).sum()
    want = exact / max(z.numel(), 1)
    rtol = 1e-12 if dtype == torch.float64 else 4 * math.sqrt(max(D, 1)) * 1.2e-7
    torch.testing.assert_close(out.codebook_loss.double(), want, rtol=rtol, atol=1e-30)
    torch.testing.assert_close(out.commitment_loss.double(), want, rtol=rtol, atol=1e-30)
    counts = torch.bincount(out.indices.reshape(-1).cpu(), minlength=K)
    p = counts.double() / max(N, 1)
    ppl = torch.exp(-torch.special.xlogy(p, p).sum())
    torch.testing.assert_close(out.perplexity.double().cpu(), ppl, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_forward_at_several_norm_scales(backend, device, scale):
    z, cb = make_inputs(200, 48, 24, torch.float32, scale=scale, device=device)
    idx, sqdist = vqkernels.nearest_code(z, cb, backend=backend)
    assert_search_ok(z, cb, idx, sqdist)


@pytest.mark.parametrize("backend,device", BD)
def test_channel_first_and_noncontiguous(backend, device):
    B, D, H, W, K = 3, 6, 5, 7, 11
    cb = torch.randn(K, D, device=device)
    z = torch.randn(B, D, H, W, device=device)
    out = vqkernels.vq_quantize(z, cb, dim=1, backend=backend)
    assert out.indices.shape == (B, H, W)
    rows = z.permute(0, 2, 3, 1).reshape(-1, D)
    assert_search_ok(rows, cb, out.indices)
    assert out.z_q.shape == z.shape
    assert torch.equal(out.z_q.permute(0, 2, 3, 1).reshape(-1, D), _gathered(cb, out.indices))
    # Sliced in two leading dims and strided along D: no (B, S) view exists, still right.
    big = torch.randn(9, 8, 2 * D, device=device)
    zs = big[::2, 1::2, ::2]
    assert not zs.is_contiguous()
    idx, sq = vqkernels.nearest_code(zs, cb, backend=backend)
    assert idx.shape == zs.shape[:-1]
    assert_search_ok(zs.reshape(-1, D), cb, idx, sq)


@pytest.mark.parametrize("backend,device", BD)
def test_ties_go_to_lowest_index(backend, device):
    cb = torch.randn(6, 5, device=device)
    cb = torch.cat([cb, cb, cb])  # every code appears three times
    z = cb[torch.randint(0, 6, (40,))] + 0.01 * torch.randn(40, 5, device=device)
    idx, _ = vqkernels.nearest_code(z, cb, backend=backend)
    assert int(idx.max()) < 6


# The NaN rows are the point: the interpreter's numpy arithmetic says so as it meets them.
@pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning")
@pytest.mark.parametrize("backend,device", BD)
def test_non_finite_rows_poison_their_output(backend, device):
    z, cb = make_inputs(10, 7, 4, device=device)
    z[3, 1] = float("nan")
    z[6, 0] = float("inf")
    out = vqkernels.vq_quantize(z, cb, backend=backend)
    assert torch.isnan(out.z_q[3]).all() and torch.isnan(out.z_q[6]).all()
    finite = [i for i in range(10) if i not in (3, 6)]
    assert torch.isfinite(out.z_q[finite]).all()
    assert not torch.isfinite(out.codebook_loss) and not torch.isfinite(out.loss)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 7
    with pytest.raises(ValueError, match="z_e contains NaN"):
        vqkernels.vq_quantize(z, cb, backend=backend, check_finite=True)


def _maxabs(t):
    return t.abs().max().item() if t.numel() else 0.0


def _low_precision_error(fn_lp, fn_64):
    """How far torch's own computation in a low precision lands from float64."""
    return _maxabs(fn_lp().double() - fn_64())


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (37, 5, 3), (120, 33, 129), (0, 4, 2)])
def test_backward_matches_reference(backend, device, dtype, N, K, D):
    z, cb = make_inputs(N, K, D, dtype, device=device)
    z.requires_grad_(True)
    cb.requires_grad_(True)
    out = vqkernels.vq_quantize(z, cb, beta=0.7, backend=backend)
    g = torch.randn_like(z)
    (out.z_q * g).sum().backward(retain_graph=True)
    (3.0 * out.codebook_loss + out.commitment_loss * 0.7 * 2.0).backward()
    with torch.no_grad():
        e = cb.double()[out.indices]
        diff = z.double() - e
        n = max(z.numel(), 1)
        want_z = g.double() + 2 * 1.4 / n * diff
        want_cb = torch.zeros(K, D, dtype=torch.float64, device=device).index_add_(
            0, out.indices, -2 * 3.0 / n * diff)
    if dtype in (torch.float32, torch.float64):
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z.grad.double(), want_z, **tol)
        torch.testing.assert_close(cb.grad.double(), want_cb, **tol)
    else:
        # Judged against torch's own error in this dtype for the same expressions.
        zl, gl, el = z.detach(), g, cb.detach()[out.indices]
        ref_z = _low_precision_error(lambda: gl + (2 * 1.4 / n) * (zl - el), lambda: want_z)
        got_z = _maxabs(z.grad.double() - want_z)
        assert got_z <= 2 * ref_z + 1e-6
        ref_cb = _low_precision_error(
            lambda: torch.zeros(K, D, dtype=dtype, device=device).index_add_(
                0, out.indices, (-2 * 3.0 / n) * (zl - el)), lambda: want_cb)
        got_cb = _maxabs(cb.grad.double() - want_cb)
        assert got_cb <= 2 * ref_cb + 1e-6


@pytest.mark.parametrize("backend,device", BD)
def test_backward_channel_first_with_strided_upstream_grad(backend, device):
    B, D, H, W, K = 2, 5, 3, 4, 9
    z = torch.randn(B, D, H, W, device=device, requires_grad=True)
    cb = torch.randn(K, D, device=device, requires_grad=True)
    out = vqkernels.vq_quantize(z, cb, dim=1, backend=backend)
    g = torch.randn(B, H, W, D, device=device).permute(0, 3, 1, 2)  # channel-last upstream grad
    (out.z_q * g).sum().backward(retain_graph=True)
    out.loss.backward()
    zr, cbr = z.detach().clone().requires_grad_(), cb.detach().clone().requires_grad_()
    ref = vqkernels.vq_quantize(zr, cbr, dim=1, backend="reference")
    assert torch.equal(ref.indices, out.indices)
    (ref.z_q * g).sum().backward(retain_graph=True)
    ref.loss.backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.grad, cbr.grad, rtol=1e-5, atol=1e-6)
