"""backend="cuda" on a real GPU, on the paths the generic tests (tests/test_backends.py) do not
reach with their small shapes: codebooks split across blocks up to K = 2^20, rows too long to
stay resident in shared memory, codes shared by very many rows in both backward modes, and a
non-default stream. Skipped without a CUDA device (tests/test_cuda_emulated.py covers the same
logic on CPU through the emulator)."""
from __future__ import annotations

import pytest
import torch

import vqkernels
from vqkernels import backends, reference
from vqkernels._layout import RowPlan
from helpers import EPS32, make_inputs, regret_tolerance

pytestmark = pytest.mark.skipif(not vqkernels.available_backends()["cuda"].available,
                                reason="needs the CUDA backend on a CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _regret_ok(z, cb, idx, sq=None):
    """Judged on the GPU against the float64 reference's choice (chunked: no N x K x D tensor):
    the chosen code is as near as the best up to fp32 rounding, and sq is its exact error."""
    ref_idx = reference.forward(z, cb)[1]
    z64, cb64 = z.double(), cb.double()
    mine = ((z64 - cb64[idx]) ** 2).sum(1)
    best = ((z64 - cb64[ref_idx]) ** 2).sum(1)
    assert bool((mine <= best + regret_tolerance(z, cb)).all())
    if sq is not None:
        torch.testing.assert_close(sq.double(), mine, rtol=4 * z.shape[1] ** 0.5 * EPS32, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", [(16, 1 << 20, 4), (100, 70000, 64), (3000, 4097, 32)])
def test_split_codebooks(dtype, N, K, D):
    z, cb = make_inputs(N, K, D, dtype, device="cuda")
    idx, sq = vqkernels.nearest_code(z, cb, backend="cuda")
    _regret_ok(z, cb, idx, sq)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [200, 520, 1500])
def test_long_rows(dtype, D):
    # Past a few hundred elements x no longer fits shared memory and is staged chunk by chunk.
    z, cb = make_inputs(700, 300, D, dtype, device="cuda")
    out = vqkernels.vq_quantize(z, cb, backend="cuda")
    _regret_ok(z, cb, out.indices)
    assert torch.equal(out.z_q, cb[out.indices])


def test_channel_first_large():
    cb = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(4, 256, 16, 16, device="cuda", dtype=torch.bfloat16)
    out = vqkernels.vq_quantize(z, cb, dim=1, backend="cuda")
    rows = z.permute(0, 2, 3, 1).reshape(-1, 256)
    _regret_ok(rows, cb, out.indices.reshape(-1))
    assert torch.equal(out.z_q.permute(0, 2, 3, 1).reshape(-1, 256), cb[out.indices.reshape(-1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_modes_under_heavy_collisions(monkeypatch, dtype):
    N, K, D = 200_000, 16, 64
    z, cb = make_inputs(N, K, D, dtype, device="cuda")
    idx = torch.where(torch.rand(N, device="cuda") < 0.8, 3, torch.randint(0, K, (N,), device="cuda"))
    acc = reference.acc_dtype(dtype)
    gcb = torch.rand(N, device="cuda", dtype=acc) / N
    run = backends.REGISTRY["cuda"].backward
    plan = RowPlan(z, -1)
    want = reference.backward(z, cb, idx, -1, None, gcb, None)[1].double()
    monkeypatch.setenv("VQK_DETERMINISTIC", "1")
    det = [run(z, -1, cb, idx, None, gcb, None, plan)[1] for _ in range(3)]
    assert all(torch.equal(det[0], d) for d in det[1:])  # bitwise
    monkeypatch.setenv("VQK_DETERMINISTIC", "0")
    atomic = run(z, -1, cb, idx, None, gcb, None, plan)[1]
    scale = float(want.abs().max())
    # fp32 atomics add 160000 terms into one code in arbitrary order: ~sqrt(n) eps of drift.
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype] * scale
    assert float((det[0].double() - want).abs().max()) <= tol
    assert float((atomic.double() - want).abs().max()) <= tol


def test_runs_on_the_current_stream():
    z, cb = make_inputs(5000, 1000, 64, torch.bfloat16, device="cuda")
    want = vqkernels.nearest_code(z, cb, backend="cuda")[0]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = vqkernels.nearest_code(z, cb, backend="cuda")[0]
        zr = z.clone().requires_grad_(True)
        out = vqkernels.vq_quantize(zr, cb, backend="cuda")
        out.loss.backward()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(got, want) and torch.isfinite(zr.grad).all()
