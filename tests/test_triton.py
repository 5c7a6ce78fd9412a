"""The Triton backend against the float64 reference.

On a machine without a GPU these run with TRITON_INTERPRET=1 on CPU tensors, through Triton's
interpreter (small shapes); with a CUDA device they run the compiled kernels on cuda tensors.
Ordinary searches are judged by float64 distance regret (tests/helpers.py); the exactness contract
of issue 13 (last section) by index equality with the float64 argmin on clearly separated rows.
"""
from __future__ import annotations

import math
import secrets

import pytest
import torch

import vqkernels
from vqkernels import backends, reference
from vqkernels._layout import RowPlan
from helpers import EPS32, FLOAT_DTYPES, WEIRD_SHAPES, assert_search_ok, exact_sqdist, make_inputs

_STATUS = backends.available_backends()["triton"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"triton: {_STATUS.detail}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _launch():
    from vqkernels.triton import launch
    return launch


def _op(z, cb, dim=-1):
    """The custom op itself: (z_q, indices, err_codebook, err_commit, counts)."""
    return torch.ops.vqkernels.vq_quantize(z, cb, dim, "triton")


def _check_forward(z, cb, z_q, idx, err, counts, dim=-1):
    """Everything the forward promises, judged in float64."""
    D = cb.shape[1]
    x = z.movedim(dim, -1).reshape(-1, D)
    assert_search_ok(x, cb, idx, err)
    assert idx.shape == z.movedim(dim, -1).shape[:-1]
    assert err.dtype == reference.acc_dtype(z.dtype)
    # z_q is the chosen code itself, bit for bit, in z's dtype, shape and dim.
    assert z_q.dtype == z.dtype and z_q.shape == z.shape
    torch.testing.assert_close(z_q.movedim(dim, -1).reshape(-1, D), cb[idx.reshape(-1)],
                               rtol=0, atol=0)
    assert torch.equal(counts.cpu(), torch.bincount(idx.reshape(-1).cpu(), minlength=cb.shape[0]))


# ------------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", WEIRD_SHAPES)
def test_forward_weird_shapes(N, K, D, dtype):
    z, cb = make_inputs(N, K, D, dtype, device=DEVICE)
    z_q, idx, err, err2, counts = _op(z, cb)
    _check_forward(z, cb, z_q, idx, err, counts)
    assert torch.equal(err, err2)
    idx_nc, sq = vqkernels.nearest_code(z, cb, backend="triton")
    assert torch.equal(idx_nc, idx) and torch.equal(sq, err)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_forward_norm_scales(dtype, scale):
    z, cb = make_inputs(200, 70, 24, dtype, scale=scale, device=DEVICE)
    z_q, idx, err, _, counts = _op(z, cb)
    _check_forward(z, cb, z_q, idx, err, counts)


def _configs():
    from vqkernels.triton import configs as cfg
    out = []
    for dt in ("bfloat16", "float32", "float64"):
        for bn, bk, _, _ in cfg.shapes(dt):
            out.append(pytest.param(dt, bn, bk, id=f"{dt}-{bn}x{bk}"))
    return out


@pytest.mark.parametrize("dtype_name,block_n,block_k", _configs())
def test_every_autotune_shape(dtype_name, block_n, block_k):
    """Each block shape the autotuner may pick gives a right answer (interpreter: all of them)."""
    launch = _launch()
    dtype = getattr(torch, dtype_name)
    z, cb = make_inputs(block_n + 3, 2 * block_k + 5, 40, dtype, device=DEVICE)
    conf = launch.SearchConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)
    z_q, idx, err, counts = launch.forward(z, -1, cb, RowPlan(z, -1), conf)
    _check_forward(z, cb, z_q, idx, err, counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("split", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("block_d", [None, 16])  # 16 < D: the row tile is streamed in chunks
def test_split_k_and_d_chunks(dtype, split, block_d):
    """Split-K (more splits than tiles included: empty splits) and a D streamed in chunks."""
    launch = _launch()
    z, cb = make_inputs(45, 150, 37, dtype, device=DEVICE)
    conf = launch.SearchConfig(block_n=16, block_k=16, block_d=block_d, split=split)
    z_q, idx, err, counts = launch.forward(z, -1, cb, RowPlan(z, -1), conf)
    _check_forward(z, cb, z_q, idx, err, counts)


@pytest.mark.parametrize("row_mode", [1, 2])
def test_row_modes(row_mode, monkeypatch):
    """The 32- and 64-bit (b, s) splits of a row number give the same rows (64-bit is what
    N >= 2^31 rows would use; forced here on a small channel-first map, whose z_q and gradients
    are channel-first too while the upstream gradient is row-major: each view its own split)."""
    launch = _launch()
    monkeypatch.setattr(launch, "row_mode", lambda v: 0 if v.B == 1 else row_mode)
    z, cb = make_inputs(3 * 5 * 7, 20, 6, torch.float32, device=DEVICE)
    z = z.reshape(3, 5, 7, 6).permute(0, 3, 1, 2).contiguous()  # channel-first memory: B = 3
    z_q, idx, err, counts = launch.forward(z, 1, cb, RowPlan(z, 1))
    _check_forward(z, cb, z_q, idx, err, counts, dim=1)
    g = torch.randn(3, 5, 7, 6, device=DEVICE).permute(0, 3, 1, 2)  # channel-last: B = 1
    w = torch.rand(3, 5, 7, device=DEVICE)
    grad_z, grad_cb = launch.backward(z, 1, cb, idx, g, w, 2 * w, RowPlan(z, 1))
    ref = reference.backward(z, cb, idx, 1, g, w, 2 * w)
    torch.testing.assert_close(grad_z, ref[0])
    torch.testing.assert_close(grad_cb, ref[1])


def test_large_codebook_int32_indices():
    """K = 2^20 codes, split along K: indices past 2^16 and the merge of many splits."""
    launch = _launch()
    K, D = 1 << 20, 4
    gen = torch.Generator().manual_seed(7)
    cb = torch.randn(K, D, generator=gen)
    pick = torch.tensor([K - 1, 3, K // 2 + 5])
    z = (cb[pick] + 1e-3 * torch.randn(3, D, generator=gen)).to(DEVICE)
    cb = cb.to(DEVICE)
    conf = launch.SearchConfig(block_n=16, block_k=8192, split=8)
    z_q, idx, err, counts = launch.forward(z, -1, cb, RowPlan(z, -1), conf)
    _check_forward(z, cb, z_q, idx, err, counts)
    assert idx.cpu().tolist() == pick.tolist()


@pytest.mark.parametrize("split", [1, 2])
def test_exact_recheck_beats_the_expansion(split):
    """Far from the origin |x|^2 dwarfs the distances and |e|^2 - 2 x.e cancels: in fp32 it
    cannot tell two close codes apart. The fast pass flags these rows (their gap is within its
    rounding bound) and the exact re-search finds the nearest code. The test first shows the
    plain fp32 expansion failing on the same data, so it can tell the difference. (16-bit data
    that makes the expansion fail: test_close_codes_far_from_the_origin.)"""
    launch = _launch()
    dtype = torch.float32
    gen = torch.Generator().manual_seed(11)
    D, N = 16, 400
    off, step = 1000.0, 0.05
    # Two close codes at indices 0 and 17 (different tiles, and splits when split=2); the others
    # are far away.
    K = 18
    cb64 = off + 40 * step * (1 + torch.rand(K, D, generator=gen, dtype=torch.float64))
    cb64[0] = off
    cb64[17] = off + step * torch.randint(-2, 3, (D,), generator=gen)
    z64 = off + step * torch.randint(-3, 4, (N, D), generator=gen).double()
    cb, z = cb64.to(dtype), z64.to(dtype)
    d = exact_sqdist(z, cb)
    best = d.argmin(1)
    two = d.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-6 * two[:, 1] + 1e-9
    assert clear.sum() > N // 4

    zf, cf = z.float(), cb.float()
    expansion = ((cf * cf).sum(1)[None, :] - 2 * zf @ cf.T).argmin(1)
    assert (expansion[clear] != best[clear]).sum() > 10, "data too easy: the test would not fail"

    conf = launch.SearchConfig(block_n=16, block_k=16, split=split)
    z_q, idx, err, counts = launch.forward(z.to(DEVICE), -1, cb.to(DEVICE), RowPlan(z, -1), conf)
    assert torch.equal(idx.cpu()[clear], best[clear])
    torch.testing.assert_close(err.cpu().double(), d.gather(1, idx.cpu()[:, None])[:, 0],
                               rtol=4 * math.sqrt(D) * EPS32, atol=0)


def test_nan_row_and_ties():
    """A NaN row gets code 0, a NaN z_q row and a NaN error, as in the reference; exact ties go
    to the lowest index."""
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], device=DEVICE)
    z = torch.tensor([[float("nan"), 0.0], [1.0, 0.1], [0.1, 1.0], [0.5, 0.5]], device=DEVICE)
    z_q, idx, err, _, counts = _op(z, cb)
    r = reference.forward(z.cpu(), cb.cpu(), -1)
    assert idx.cpu().tolist() == [0, 0, 1, 0] == r[1].tolist()
    assert torch.isnan(z_q[0]).all() and torch.isnan(err[0])
    assert torch.equal(z_q[1:].cpu(), r[0][1:])
    assert counts.cpu().tolist() == [3, 1, 0, 0]


def test_channel_first_and_strided_inputs():
    z, cb = make_inputs(2 * 9 * 11, 33, 5, torch.float32, device=DEVICE)
    cf = z.reshape(2, 9, 11, 5).permute(0, 3, 1, 2)  # (B, D, H, W) view, no copy
    out = _op(cf, cb, 1)
    _check_forward(cf, cb, out[0], out[1], out[2], out[4], dim=1)
    sliced = torch.cat([z, z], 1)[:, ::2]  # element stride 2 along D
    out = _op(sliced, cb)
    _check_forward(sliced, cb, out[0], out[1], out[2], out[4])
    rows = z.reshape(2, 99, 5)[:, ::3]  # row stride 15
    out = _op(rows, cb)
    _check_forward(rows, cb, out[0], out[1], out[2], out[4])


def test_every_output_element_is_written(monkeypatch):
    """Outputs are allocated poisoned (NaN, or -7 for integers): the kernels must overwrite all."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    launch = _launch()
    for conf in (None, launch.SearchConfig(block_n=16, block_k=16, split=3)):
        z, cb = make_inputs(77, 40, 19, torch.bfloat16, device=DEVICE)
        z_q, idx, err, counts = launch.forward(z, -1, cb, RowPlan(z, -1), conf)
        assert not torch.isnan(z_q).any() and not torch.isnan(err).any() and int(idx.min()) >= 0
        _check_forward(z, cb, z_q, idx, err, counts)
        g = torch.randn(77, device=DEVICE)
        grad_z, grad_cb = launch.backward(z, -1, cb, idx, None, g, g, RowPlan(z, -1))
        assert not torch.isnan(grad_z).any() and not torch.isnan(grad_cb).any()


# ------------------------------------------------------------------------------------------------
# backward


def _grads(z, cb, backend, w, beta=0.25, dim=-1):
    z = z.detach().clone().requires_grad_(True)
    cb = cb.detach().clone().requires_grad_(True)
    out = vqkernels.vq_quantize(z, cb, beta=beta, dim=dim, backend=backend)
    loss = out.loss + (out.z_q.float() * w).sum()
    loss.backward()
    return z.grad, cb.grad, out


def _cb_tolerance(z, cb, idx, scale):
    """Per-element bound for an fp32 scatter-add of n terms: (n + 4) eps sum |terms|."""
    D = cb.shape[1]
    x = z.detach().reshape(-1, D).double().cpu()
    i = idx.reshape(-1).cpu()
    terms = (scale * (cb.detach().double().cpu()[i] - x)).abs()
    total = torch.zeros(cb.shape, dtype=torch.float64).index_add_(0, i, terms)
    n = torch.bincount(i, minlength=cb.shape[0]).double()[:, None]
    return (n + 4) * EPS32 * total


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (50, 9, 3), (65, 31, 129), (300, 64, 32)])
def test_backward_matches_reference(N, K, D, dtype, deterministic, monkeypatch):
    z, cb = make_inputs(N, K, D, dtype, device=DEVICE)
    w = torch.randn(N, D, device=DEVICE)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    gz, gcb, out = _grads(z, cb, "triton", w=w)
    # The reference backward on the indices the kernel chose (a near-tie may be resolved either
    # way, and the gradient follows the choice). loss = codebook + 0.25 commitment + sum(z_q w).
    acc = reference.acc_dtype(dtype)
    g_cb = torch.full(out.indices.shape, 1.0 / z.numel(), dtype=acc)
    g_cm = torch.full(out.indices.shape, 0.25 / z.numel(), dtype=acc)
    idx = out.indices.cpu()
    ref_gz, ref_gcb = reference.backward(z.cpu(), cb.cpu(), idx, -1, w.cpu().to(dtype), g_cb, g_cm)
    if dtype == torch.float64:
        torch.testing.assert_close(gz.cpu(), ref_gz, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(gcb.cpu(), ref_gcb, rtol=1e-12, atol=1e-15)
        return
    # grad_z: computed in fp32 (a few roundings of its two terms), then cast to z's dtype (half
    # an ulp of that dtype, which the reference's cast also takes: one ulp apart at most).
    terms = w.cpu().double().abs() + 2 * g_cm[:, None].double() * (
        z.cpu().double() - cb.cpu().double()[idx]).abs()
    bound = torch.finfo(dtype).eps * ref_gz.double().abs() + 4 * EPS32 * terms
    diff = (gz.cpu().double() - ref_gz.double()).abs()
    assert (diff <= bound).all(), float((diff - bound).max())
    # grad_codebook: an fp32 scatter-add, then the cast to the codebook's dtype.
    bound = (_cb_tolerance(z, cb, idx, 2.0 / z.numel())
             + torch.finfo(dtype).eps * ref_gcb.double().abs())
    diff = (gcb.cpu().double() - ref_gcb.double()).abs()
    assert (diff <= bound).all(), float((diff - bound).max())


def test_deterministic_backward_is_bitwise_repeatable(monkeypatch):
    """Many rows per code, fp32: the sorted reduction gives the same bits every time, and the
    same values (to rounding) as the atomic one."""
    launch = _launch()
    z, cb = make_inputs(700, 5, 24, torch.float32, device=DEVICE)
    z_q, idx, err, counts = launch.forward(z, -1, cb, RowPlan(z, -1))
    g = torch.rand(700, device=DEVICE)
    runs = [launch.backward(z, -1, cb, idx, None, g, g, RowPlan(z, -1), deterministic=True)
            for _ in range(3)]
    for gz, gcb in runs[1:]:
        assert torch.equal(gz, runs[0][0]) and torch.equal(gcb, runs[0][1])
    gz_a, gcb_a = launch.backward(z, -1, cb, idx, None, g, g, RowPlan(z, -1), deterministic=False)
    tol = _cb_tolerance(z, cb, idx, 2 * g.max())
    assert ((gcb_a - runs[0][1]).abs().cpu().double() <= 2 * tol).all()
    ref = reference.backward(z.cpu(), cb.cpu(), idx.cpu(), -1, None, g.cpu(), g.cpu())
    assert ((runs[0][1].cpu().double() - ref[1].double()).abs() <= tol).all()
    # torch's switch selects it
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    gz_d, gcb_d = launch.backward(z, -1, cb, idx, None, g, g, RowPlan(z, -1))
    assert torch.equal(gcb_d, runs[0][1])


@pytest.mark.parametrize("piece_rows", [32, 96, None], ids=["piece32", "piece96", "default"])
def test_deterministic_backward_under_codebook_collapse(piece_rows):
    """Review F3: nearly every row on one code (a collapsed codebook). The deterministic sum is
    cut into pieces of sorted rows summed by separate programs and joined in piece order: the
    same bits every run, the reference's values to rounding, and the codes of one piece untouched
    by the join."""
    launch = _launch()
    gen = torch.Generator().manual_seed(secrets.randbits(32))
    N, K, D = 1000, 6, 20
    z = torch.randn(N, D, generator=gen).to(DEVICE)
    cb = torch.randn(K, D, generator=gen).to(DEVICE)
    idx = torch.full((N,), 3, dtype=torch.long)
    idx[torch.randperm(N, generator=gen)[:7]] = torch.tensor([0, 0, 1, 5, 5, 5, 2])
    idx = idx.to(DEVICE)
    g = torch.rand(N, generator=gen).to(DEVICE)
    runs = [launch.backward(z, -1, cb, idx, None, g, None, RowPlan(z, -1), deterministic=True,
                            piece_rows=piece_rows)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    ref = reference.backward(z.cpu(), cb.cpu(), idx.cpu(), -1, None, g.cpu(), None)[1]
    tol = _cb_tolerance(z, cb, idx.cpu(), 2 * g.max())
    assert ((runs[0].cpu().double() - ref.double()).abs() <= tol).all()
    assert (runs[0][4] == 0).all()  # a code with no rows
    with pytest.raises(ValueError, match="piece_rows"):
        launch.backward(z, -1, cb, idx, None, g, None, RowPlan(z, -1), deterministic=True,
                        piece_rows=40)


def test_gradient_routing():
    """codebook_loss reaches only the codebook, commitment_loss only z, z_q is straight-through."""
    z, cb = make_inputs(40, 7, 6, torch.float32, device=DEVICE)
    cases = (("codebook_loss", False, True), ("commitment_loss", True, False), ("z_q", True, False))
    for part, z_moves, cb_moves in cases:
        zz = z.clone().requires_grad_(True)
        cc = cb.clone().requires_grad_(True)
        out = vqkernels.vq_quantize(zz, cc, backend="triton")
        v = getattr(out, part)
        (v.sum() if part == "z_q" else v).backward()
        assert (zz.grad is not None and bool(zz.grad.abs().sum() > 0)) == z_moves, part
        assert (cc.grad is not None and bool(cc.grad.abs().sum() > 0)) == cb_moves, part
        if part == "z_q":
            assert torch.equal(zz.grad, torch.ones_like(z))


def test_gradcheck_float64():
    """Each loss term is a true function of the argument its gradient reaches (with the choice of
    codes fixed, which the well-separated inputs keep under gradcheck's perturbations), so
    gradcheck applies to the pairs: commitment_loss of z, codebook_loss of the codebook. (z_q is
    straight-through by design: its gradient is not its derivative.)"""
    z, cb = make_inputs(6, 4, 3, torch.float64, device=DEVICE)

    def commit(z):
        return vqkernels.vq_quantize(z, cb, backend="triton").commitment_loss

    def codebook(cb):
        return vqkernels.vq_quantize(z, cb, backend="triton").codebook_loss

    assert torch.autograd.gradcheck(commit, (z.clone().requires_grad_(),), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(codebook, (cb.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# integration


def _assert_matches_eager(f, z, cb, loss, idx, zz, cc):
    """The compiled step's (loss, indices) and gradients on (zz, cc) equal eager f's on z, cb."""
    loss.backward()
    z2, c2 = z.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    loss2, idx2 = f(z2, c2)
    loss2.backward()
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(zz.grad, z2.grad)
    torch.testing.assert_close(cc.grad, c2.grad)


def test_torch_compile_fullgraph():
    z, cb = make_inputs(64, 16, 8, torch.float32, device=DEVICE)
    w = torch.randn(64, 8, device=DEVICE)

    def f(z, cb):
        out = vqkernels.vq_quantize(z, cb, backend="triton")
        return out.loss + (out.z_q * w).sum(), out.indices

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    zz, cc = z.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    loss, idx = compiled(zz, cc)
    _assert_matches_eager(f, z, cb, loss, idx, zz, cc)


def test_opcheck():
    z, cb = make_inputs(20, 6, 5, torch.float32, device=DEVICE)
    torch.library.opcheck(torch.ops.vqkernels.vq_quantize.default, (z, cb, -1, "triton"))
    torch.library.opcheck(torch.ops.vqkernels.nearest_code.default, (z, cb, -1, "triton"))


def test_auto_picks_triton_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: backend='auto' picks triton only for CUDA tensors")
    assert backends.resolve("auto", torch.device("cuda")).name == "triton"


# ------------------------------------------------------------------------------------------------
# the triton_op path (vqkernels.triton.ops): what torch.compile traces into on CUDA


def _grads_via(call, z, cb, w):
    zz, cc = z.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    z_q, idx, err_cb, err_cm, counts = call(zz, cc)
    (err_cb.sum() / z.numel() + 0.25 * err_cm.sum() / z.numel() + (z_q * w).sum()).backward()
    return z_q.detach(), idx, err_cb.detach(), counts, zz.grad, cc.grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (50, 9, 3), (65, 31, 129)])
def test_triton_ops_equal_the_custom_ops(N, K, D, dtype, monkeypatch):
    """The triton_ops launch the same kernels as the opaque custom op: bitwise the same outputs
    and (deterministic mode) gradients; the forward is judged against float64 as well."""
    pytest.importorskip("vqkernels.triton.ops")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    z, cb = make_inputs(N, K, D, dtype, device=DEVICE)
    w = torch.randn(N, D, device=DEVICE, dtype=dtype)
    a = _grads_via(lambda z, c: torch.ops.vqkernels.triton_vq_quantize(z, c, -1), z, cb, w)
    b = _grads_via(lambda z, c: _op(z, c), z, cb, w)
    _check_forward(z, cb, a[0], a[1], a[2], a[3])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    idx, sq = torch.ops.vqkernels.triton_nearest_code(z, cb, -1)
    assert torch.equal(idx, a[1]) and torch.equal(sq, a[2])


def test_public_calls_route_through_triton_ops(monkeypatch):
    """With the routing on (as for CUDA tensors), vq_quantize / nearest_code / VectorQuantizer
    call the triton_ops, whose launches go through wrap_triton."""
    pytest.importorskip("vqkernels.triton.ops")
    from torch.library import wrap_triton
    from vqkernels import ops
    launch = _launch()
    wraps = []
    real = launch.forward

    def spy(*args, **kwargs):
        wraps.append(kwargs.get("wrap"))
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "forward", spy)
    monkeypatch.setattr(ops, "use_triton_ops", lambda backend, device: backend == "triton")
    z, cb = make_inputs(40, 7, 6, torch.float32, device=DEVICE)
    zz = z.clone().requires_grad_(True)
    out = vqkernels.vq_quantize(zz, cb, backend="triton")
    out.loss.backward()
    vqkernels.nearest_code(z, cb, backend="triton")
    assert wraps == [wrap_triton, wrap_triton]
    ref = vqkernels.vq_quantize(z, cb, backend="reference")
    assert_search_ok(z, cb, out.indices)
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=1e-5, atol=0)
    assert zz.grad is not None and bool(zz.grad.abs().sum() > 0)
    vqkernels.vq_quantize(z, cb, backend="reference")  # other backends keep the custom op
    assert len(wraps) == 2


def test_inductor_traces_into_the_triton_kernels():
    """On a GPU, torch.compile(fullgraph=True) with Inductor puts the Triton launches themselves in
    its generated code (no opaque op), and the compiled step equals the eager one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the interpreter cannot run on the fake tensors of tracing")
    from torch._inductor.utils import run_and_get_code
    z, cb = make_inputs(512, 64, 32, torch.bfloat16, device="cuda")
    w = torch.randn(512, 32, device="cuda", dtype=torch.bfloat16)

    def f(z, cb):
        out = vqkernels.vq_quantize(z * 1.0, cb, backend="auto")
        return out.loss + (out.z_q.float() * w).sum(), out.indices

    zz, cc = z.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True)
    (loss, idx), code = run_and_get_code(compiled, zz, cc)
    assert any("vq_search_kernel" in c for c in code), "the search kernel is not in Inductor's code"
    assert not any("vqkernels.vq_quantize" in c for c in code), "the opaque op is still called"
    _assert_matches_eager(f, z, cb, loss, idx, zz, cc)
    torch.library.opcheck(torch.ops.vqkernels.triton_vq_quantize.default, (z, cb, -1))


# ------------------------------------------------------------------------------------------------
# the exactness contract (issue 13): the index of every clearly separated row equals the float64
# argmin of the exact distances sum (x - e)^2 (NaN counts as +inf, ties to the lowest index), for
# any tile shape, autotune config and split; judged by index equality, never by regret.


def _oracle(x, cb):
    """(float64 distances with NaN -> +inf, their argmin: the lowest index among equal minima)."""
    d = exact_sqdist(x.reshape(-1, cb.shape[1]).cpu(), cb.cpu())
    d = torch.where(torch.isnan(d), torch.inf, d)
    return d, (d.argmin(1) if cb.shape[0] else torch.zeros(0, dtype=torch.long))


def _clear(d, groups=None):
    """Rows whose best two distinct codes are more than 1e-6 (relative) apart. `groups` maps each
    code to its group of bitwise duplicates: copies of one code are one candidate."""
    if groups is not None:
        g = torch.full((d.shape[0], int(groups.max()) + 1), torch.inf, dtype=torch.float64)
        d = g.scatter_reduce(1, groups[None].expand(d.shape[0], -1), d, "amin")
    if d.shape[1] < 2:
        return torch.ones(d.shape[0], dtype=torch.bool)
    two = d.topk(2, dim=1, largest=False).values
    return ((two[:, 1] - two[:, 0]) > 1e-6 * two[:, 1]) | (torch.isinf(two[:, 1])
                                                          & torch.isfinite(two[:, 0]))


def _run(z, cb, conf=None):
    """launch.forward with `conf`, plus the number of rows its approximate pass flagged."""
    launch = _launch()
    stats = {}
    z_q, idx, err, counts = launch.forward(z.to(DEVICE), -1, cb.to(DEVICE), RowPlan(z, -1), conf,
                                           stats=stats)
    return z_q.cpu(), idx.cpu(), err.cpu(), counts.cpu(), int(stats["flagged"])


def _check_exact(z, cb, out, groups=None, min_clear=1):
    """Index equality with the float64 argmin on clear rows; sqerr is the chosen code's exact
    error; z_q the chosen code, NaN exactly where that error is not finite; counts agree."""
    z_q, idx, err, counts, _ = out
    D = cb.shape[1]
    d, best = _oracle(z, cb)
    clear = _clear(d, groups)
    assert int(clear.sum()) >= min_clear, "data too ambiguous: the test would not test much"
    wrong = (idx[clear] != best[clear]).sum()
    assert wrong == 0, f"{int(wrong)} / {int(clear.sum())} clearly separated rows got a wrong code"
    x64 = z.reshape(-1, D).double().cpu()
    chosen = ((x64 - cb.double().cpu()[idx]) ** 2).sum(1)
    acc = reference.acc_dtype(z.dtype)
    fin = torch.isfinite(chosen)
    # sqerr: fp32 sums (decided rows) or the float64 exact error cast to the acc dtype (flagged
    # rows: it may overflow to inf or underflow to 0 there, as the reference's cast does).
    rtol = 4 * D * EPS32 if acc == torch.float32 else 1e-12
    e, want = err.double(), chosen.to(acc).double()
    assert torch.equal(torch.isfinite(e[fin]), torch.isfinite(want[fin]))
    ok = torch.isfinite(want)
    torch.testing.assert_close(e[ok], want[ok], rtol=rtol, atol=torch.finfo(acc).tiny)
    rows = z_q.reshape(-1, D)
    assert torch.equal(rows[fin], cb.cpu()[idx[fin]])
    assert torch.isnan(rows[~fin]).all()
    assert torch.equal(counts, torch.bincount(idx, minlength=cb.shape[0]))


def _far_rows(dtype, N, K, D, close_at, gen, offset=None):
    """Codes and rows whose fp32 expansion |e|^2 - 2 x.e cancels: the first D // 2 coordinates
    are a large power of two (the same for every row and code, exact in the dtype), the others a
    coarse grid exact in the dtype. The codes at `close_at` sit on the grid near the rows, the
    rest farther out. The offset makes the fp32 expansion unable to rank the close codes."""
    if offset is None:
        # A random power of two: from where a few rows are near ties to where every one is.
        lo, hi = {torch.float32: (10, 21), torch.bfloat16: (10, 21), torch.float16: (10, 15),
                  torch.float64: (30, 50)}[dtype]
        offset = 2.0 ** int(torch.randint(lo, hi, (1,), generator=gen))
    big = D // 2
    step = 0.125
    cb = 40 * step * (1 + torch.rand(K, D, generator=gen, dtype=torch.float64))
    cb[close_at] = step * torch.randint(-2, 3, (len(close_at), D), generator=gen).double()
    z = step * torch.randint(-3, 4, (N, D), generator=gen).double()
    cb[:, :big] = offset
    z[:, :big] = offset
    return z.to(dtype), cb.to(dtype)


def _congruent(n, K, gen, period=128):
    """n code indices congruent modulo every power-of-two tile width up to `period`."""
    p0 = int(torch.randint(0, min(period, K - (n - 1) * period), (1,), generator=gen))
    return [p0 + j * period for j in range(n)]


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


@pytest.mark.parametrize("close", [16, 17])
@pytest.mark.parametrize("split", [1, 2])
def test_f1_close_code_in_the_same_column(close, split):
    """The review's F1 repro: the data of test_exact_recheck_beats_the_expansion with the close
    code at 16, which shares code 0's column of a 16-wide tile. The approximate pass must flag the
    rows and the exact re-search find the nearest code."""
    gen = torch.Generator().manual_seed(11)
    D, N, K = 16, 400, 18
    off, step = 1000.0, 0.05
    cb64 = off + 40 * step * (1 + torch.rand(K, D, generator=gen, dtype=torch.float64))
    cb64[0] = off
    cb64[close] = off + step * torch.randint(-2, 3, (D,), generator=gen)
    if close == 16:
        cb64[17] = off + 40 * step * (1 + torch.rand(D, generator=gen, dtype=torch.float64))
    z = (off + step * torch.randint(-3, 4, (N, D), generator=gen).double()).float()
    cb = cb64.float()
    d, best = _oracle(z, cb)
    clear = _clear(d)
    expansion = ((cb * cb).sum(1)[None, :] - 2 * z @ cb.T).argmin(1)
    assert (expansion[clear] != best[clear]).sum() > 10, "data too easy: the test would not fail"
    out = _run(z, cb, _launch().SearchConfig(block_n=16, block_k=16, split=split))
    _check_exact(z, cb, out, min_clear=N // 4)
    assert out[4] > 0, "no row was flagged: the re-search was not exercised"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_close", [2, 3, 5, 9])
@pytest.mark.parametrize("where", ["congruent", "random"])
def test_close_codes_far_from_the_origin(dtype, n_close, where):
    gen = _gen()
    D, N = 8, 48
    K = 128 * n_close + int(torch.randint(1, 40, (1,), generator=gen))
    if where == "congruent":
        at = _congruent(n_close, K, gen)
    else:
        at = torch.randperm(K, generator=gen)[:n_close].tolist()
    z, cb = _far_rows(dtype, N, K, D, at, gen)
    # The fp32 expansion cannot rank these codes: without the exact re-search this would fail.
    d, best = _oracle(z, cb)
    zf, cf = z.float(), cb.float()
    expansion = ((cf * cf).sum(1)[None, :] - 2 * zf @ cf.T).argmin(1)
    clear = _clear(d)
    assert (expansion[clear] != best[clear]).any()
    out = _run(z, cb)
    _check_exact(z, cb, out, min_clear=N // 8)
    assert out[4] > 0


def _every_config():
    from vqkernels.triton import configs as cfg
    out = []
    for dt in ("bfloat16", "float32", "float64"):
        for bn, bk, _, _ in cfg.shapes(dt):
            for split in (1, 3):
                out.append(pytest.param(dt, bn, bk, split, id=f"{dt}-{bn}x{bk}-split{split}"))
    return out


@pytest.mark.parametrize("dtype_name,block_n,block_k,split", _every_config())
def test_every_config_is_exact(dtype_name, block_n, block_k, split):
    """Each autotune config, forced, with and without split-K: 3 close codes congruent modulo
    every tile width (same column of every tile shape) plus 2 at random indices."""
    gen = _gen()
    dtype = getattr(torch, dtype_name)
    D, N = 8, block_n + 5
    K = 3 * 128 + 37
    at = _congruent(3, K, gen)
    at += [i for i in torch.randperm(K, generator=gen).tolist() if i not in at][:2]
    z, cb = _far_rows(dtype, N, K, D, at, gen)
    conf = _launch().SearchConfig(block_n=block_n, block_k=block_k, split=split)
    out = _run(z, cb, conf)
    _check_exact(z, cb, out, min_clear=N // 8)
    # The same answer whatever the config: compare with the default launch as well.
    assert torch.equal(out[1], _run(z, cb)[1])


@pytest.mark.parametrize("copies", [3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_duplicated_codes_go_to_the_lowest_index(copies, dtype):
    gen = _gen()
    D, N, U = 8, 64, 24
    z, u = _far_rows(dtype, N, U, D, list(range(0, U, 3)), gen)
    groups = torch.arange(U).repeat(copies)[torch.randperm(U * copies, generator=gen)]
    cb = u[groups]
    for split in (1, 2):
        out = _run(z, cb, _launch().SearchConfig(block_n=16, block_k=16, split=split))
        _check_exact(z, cb, out, groups=groups, min_clear=N // 8)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("D", [1, 3, 129])
def test_tiny_codebooks_and_odd_widths(K, D):
    gen = _gen()
    N = 40
    z, cb = _far_rows(torch.float32, N, K, D, list(range(min(K, 2))), gen)
    # At D = 1 the two grid codes may coincide: copies are judged as one code (lowest index).
    groups = torch.unique(cb, dim=0, return_inverse=True)[1]
    for split in (1, 2):
        out = _run(z, cb, _launch().SearchConfig(block_n=16, block_k=16, split=split))
        _check_exact(z, cb, out, groups=groups, min_clear=1)


def test_large_mean_data():
    """1000 + N(0, 1), D = 64, K = 256: every index equals the float64 answer."""
    z = 1000 + torch.randn(48, 64)
    cb = 1000 + torch.randn(256, 64)
    out = _run(z, cb)
    _check_exact(z, cb, out, min_clear=40)
    assert torch.equal(out[1], _oracle(z, cb)[1])


# Overflowing fp32 squares are the point: the interpreter's numpy arithmetic warns as it meets them.
@pytest.mark.filterwarnings("ignore:overflow encountered in:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-25, 1e-37])
def test_extreme_magnitudes(dtype, scale):
    """Finite inputs whose squares overflow or underflow fp32: right codes, finite z_q."""
    z, cb = make_inputs(40, 37, 12, torch.float64)
    z, cb = (z * scale).to(dtype), (cb * scale).to(dtype)
    assert torch.isfinite(z).all() and torch.isfinite(cb).all()
    for split in (1, 2):
        out = _run(z, cb, _launch().SearchConfig(block_n=16, block_k=16, split=split))
        _check_exact(z, cb, out, min_clear=30)
        assert torch.isfinite(out[0]).all()


# NaN and inf are the point: the interpreter's numpy arithmetic warns as it meets them.
@pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_non_finite_rows_and_codes(dtype):
    """NaN/inf rows get index 0 and a NaN z_q; a NaN or inf code is never chosen for a finite row;
    a codebook of non-finite codes only gives index 0."""
    z, cb = make_inputs(40, 30, 6, torch.float64)
    z[3, 2] = torch.nan
    z[5, 0] = torch.inf
    z[7, 4] = -torch.inf
    cb[0, 1] = torch.inf      # code 0 non-finite: rows 3/5/7 still get 0, finite rows never do
    cb[11, 3] = torch.nan
    cb[29, 5] = -torch.inf
    z[8] = cb[11].nan_to_num(0)  # a row right next to the NaN code
    z, cb = z.to(dtype), cb.to(dtype)
    for split in (1, 2):
        out = _run(z, cb, _launch().SearchConfig(block_n=16, block_k=16, split=split))
        _check_exact(z, cb, out, min_clear=30)
        idx = out[1]
        assert idx[[3, 5, 7]].tolist() == [0, 0, 0]
        assert torch.isnan(out[0][[3, 5, 7]]).all()
        finite = torch.isfinite(z).all(1)
        assert not torch.isin(idx[finite], torch.tensor([0, 11, 29])).any()
    allbad = torch.full((4, 6), torch.nan, dtype=dtype)
    allbad[1, 0] = torch.inf
    out = _run(z, allbad)
    assert (out[1] == 0).all() and torch.isnan(out[0]).all()


def test_random_data_is_rarely_flagged():
    """The approximate pass decides almost every row of ordinary data alone."""
    z, cb = make_inputs(256, 128, 32, torch.float32)
    out = _run(z, cb)
    _check_exact(z, cb, out, min_clear=200)
    assert out[4] <= 256 // 10


# ------------------------------------------------------------------------------------------------
# Padded work and codebook copies (review F12, issue 19)


class _LaunchSpy:
    """A `wrap` for launch.forward that records each kernel launch (kernel, args, meta) and runs
    it unchanged."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        spy = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **meta):
                    spy.calls.append((kernel, args, meta))
                    return kernel[grid](*args, **meta)
                return run
        return _Grid()

    def search(self):
        from vqkernels.triton import kernels as K_
        (hit,) = [c for c in self.calls if c[0] is K_.vq_search_kernel]
        return hit


def _work_width(meta):
    """Columns of D the search's MMAs run over: the main tiles plus the tail pieces."""
    return (meta["BLOCK_D"] * meta["D_CHUNKS"]
            + sum(meta.get(w, 0) for w in ("W1", "W2", "W3")))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [48, 96, 160, 192])
def test_widths_between_powers_of_two_are_not_padded(D, dtype):
    """F12: D between powers of two ran next_pow2(D)-deep MMAs (D = 192: 256, a third more work;
    D = 129: twice) and copied the codebook padded on every call. A multiple of 16 now runs
    exactly D deep, straight from the caller's codebook (no copy, on any call)."""
    launch = _launch()
    z, cb = make_inputs(21, 37, D, dtype, device=DEVICE)
    for _ in range(2):
        spy = _LaunchSpy()
        z_q, idx, err, counts = launch.forward(z, -1, cb, RowPlan(z, -1),
                                               launch.SearchConfig(block_n=16, block_k=16),
                                               wrap=spy)
        _check_forward(z, cb, z_q, idx, err, counts)
        _, args, meta = spy.search()
        assert _work_width(meta) == D, meta
        assert args[9] is cb, "the codebook was copied"


@pytest.mark.parametrize("D,dtype,block_d,padded", [
    (129, torch.bfloat16, None, 144), (200, torch.bfloat16, None, 208),
    (37, torch.float64, None, 48), (100, torch.float32, None, 112),
    (129, torch.float32, None, 160), (100, torch.float32, 32, 128)], ids=str)
def test_unaligned_widths_pad_to_a_multiple_of_16(D, dtype, block_d, padded):
    """An unaligned resident D runs over D rounded up to 16 (not to a power of two), as a main
    tile and up to three power-of-two tail pieces (200 -> 128 + 64 + 16); a streamed one (fp32
    past 128, or a forced chunk width) over whole chunks. Only then is the codebook copied,
    padded with zeros. Every layout is exact on data far from the origin, with close codes
    congruent modulo every tile width."""
    launch = _launch()
    gen = _gen()
    N, K = 24, 2 * 128 + 11
    at = _congruent(3, K, gen)
    z, cb = _far_rows(dtype, N, K, D, at, gen)
    spy = _LaunchSpy()
    conf = launch.SearchConfig(block_n=16, block_k=32, block_d=block_d)
    stats = {}
    z_q, idx, err, counts = launch.forward(z, -1, cb, RowPlan(z, -1), conf, wrap=spy, stats=stats)
    _check_exact(z, cb, (z_q, idx, err, counts, int(stats["flagged"])), min_clear=N // 8)
    _, args, meta = spy.search()
    assert _work_width(meta) == padded, meta
    cbp = args[9]
    assert cbp.shape == (K, padded) and args[10] == padded
    assert torch.equal(cbp[:, :D], cb) and not cbp[:, D:].any()


def test_codebook_written_through_data_is_seen():
    """The padded codebook is made afresh on every call, never cached on the tensor's version:
    writes through `.data` (vqkernels.compat does that) and fused optimizers do not bump
    `_version`, and a cache keyed on it would search the old codes."""
    import adversarial as A
    launch = _launch()
    gen = torch.Generator().manual_seed(5)
    D = 129
    z, cb = make_inputs(30, 20, D, torch.float32)
    cb = torch.nn.Parameter(cb)
    first = launch.forward(z, -1, cb.detach(), RowPlan(z, -1))[1]
    perm = torch.randperm(cb.shape[0], generator=gen)
    v = cb._version
    cb.data.copy_(cb.detach()[perm])   # the codes move to new indices
    assert cb._version == v            # (what makes a version-keyed cache unsafe)
    second = launch.forward(z, -1, cb.detach(), RowPlan(z, -1))[1]
    A.assert_exact(z, cb.detach(), second, what="after .data.copy_")
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D,spacing", [(96, 128), (200, None)], ids=["96-congruent", "200-random"])
def test_piece_layouts_on_the_adversarial_families(D, dtype, spacing):
    """tests/adversarial.py's close codes far from the origin and duplicated codes, at a D cut
    into two (96 = 64 + 32) and, for 16-bit, three (200 -> 128 + 64 + 16, padded copy) resident
    pieces (fp32 200 is streamed in chunks): exact indices, with and without split."""
    import adversarial as A
    launch = _launch()
    gen = _gen()
    # (the interpreter pays for every flagged row's exact re-search: small N and K)
    x, cb = A.close_codes(gen, N=24, K=150, D=D, n_close=2 if spacing else 3, spacing=spacing,
                          dtype=dtype)
    for split in (1, 2):
        idx = launch.forward(x, -1, cb, RowPlan(x, -1),
                             launch.SearchConfig(block_n=16, block_k=32, split=split))[1]
        A.assert_exact(x, cb, idx, what=f"close codes D={D} split={split}")
    x, cb = A.duplicated(gen, N=24, K0=16, D=D, copies=3, interleave=spacing is None,
                         dtype=dtype)
    idx = launch.forward(x, -1, cb, RowPlan(x, -1))[1]
    A.assert_exact(x, cb, idx, what=f"duplicated D={D}")
