"""Exact nearest code on every CPU-side backend (issue 13): the reference and the native CPU kernel
on every instruction-set path this CPU runs, one and two threads, on inputs built to defeat the
fp32 expansion (tests/adversarial.py). Judged by exact index equality with the float64 argmin on
clearly separated rows and lowest index on exact ties -- never by regret. The Triton and CUDA
searches run the same families in test_triton.py and test_cuda_emulated.py.
"""
import hashlib
import math
import os
import secrets

import pytest
import torch

import adversarial as A
from vqkernels import native, nearest_code, vq_quantize
from cpu_isas import ISA_PARAMS

CPU_OK = native.cpu_status() is None


def _backends():
    out = [pytest.param(("reference", None), id="reference")]
    for p in ISA_PARAMS:
        marks = list(p.marks)
        if not CPU_OK:
            marks.append(pytest.mark.skip(reason=f"native CPU kernel: {native.cpu_status()}"))
        out.append(pytest.param(("cpu", p.values[0]), id=f"cpu-{p.values[0]}", marks=marks))
    return out


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    name, isa = request.param
    if isa is not None:
        monkeypatch.setenv("VQK_CPU_ISA", isa)
    return name


def _gen(request):
    """A generator on a fresh seed every run, mixed with the test's id so that parameters draw
    different data; VQK_EXACT_SEED=n replays a run, and a failing test's captured output names n."""
    base = int(os.environ.get("VQK_EXACT_SEED") or secrets.randbits(31))
    print(f"VQK_EXACT_SEED={base} replays this test's data")
    node = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    return torch.Generator().manual_seed(node ^ base)


def _check(x, cb, backend, what):
    idx, sq = nearest_code(x, cb, backend=backend)
    n_clear = A.assert_exact(x, cb, idx, what=what)
    out = vq_quantize(x, cb, backend=backend)
    assert torch.equal(out.indices, idx), f"{what}: vq_quantize and nearest_code disagree"
    # z_q is the chosen code, bit for bit, wherever row and code are finite.
    fin = torch.isfinite(x).all(1) & torch.isfinite(cb[idx]).all(1)
    assert torch.equal(out.z_q[fin], cb[idx][fin]), f"{what}: z_q is not the chosen code"
    assert torch.isnan(out.z_q[~fin]).all()
    # sqdist is the exact error of the chosen code (inf where it exceeds the float32 range).
    want = ((x.double() - cb[idx].double()) ** 2).sum(1)
    torch.testing.assert_close(sq.double()[fin], want.to(sq.dtype).double()[fin], rtol=1e-5,
                               atol=0, equal_nan=True)
    return n_clear


@pytest.mark.parametrize("n_close", [2, 3, 5, 9])
@pytest.mark.parametrize("spacing", A.TILE_WIDTHS + [None], ids=lambda s: f"mod{s}")
def test_close_codes_far_from_origin(backend, threads, n_close, spacing, request):
    g = _gen(request)
    K = max(300, (n_close - 1) * (spacing or 1) + 40)
    x, cb = A.close_codes(g, n_close=n_close, spacing=spacing, K=K, D=24 if spacing else 33)
    n = _check(x, cb, backend, f"{n_close} close codes, spacing {spacing}")
    assert n > 0.9 * x.shape[0]


@pytest.mark.parametrize("offset", [2.0 ** 12, 2.0 ** 18])
def test_close_codes_defeat_the_expansion(backend, offset, request):
    """The family is hard: the fp32 expansion alone gets most clear rows wrong; the backend none."""
    x, cb = A.close_codes(_gen(request), n_close=5, offset=offset)
    ref, clear, _ = A.exact_answer(x, cb)
    assert (A.fp32_expansion_argmin(x, cb)[clear] != ref[clear]).float().mean() > 0.5
    _check(x, cb, backend, f"offset {offset}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_close", [2, 5])
def test_close_codes_16bit(backend, dtype, n_close, request):
    # Values around 2^8 (bf16) / 2^10 (fp16): exact in the dtype; the fp32 sums cancel.
    offset = 2.0 ** 8 if dtype == torch.bfloat16 else 2.0 ** 10
    x, cb = A.close_codes(_gen(request), n_close=n_close, spacing=8, offset=offset, dtype=dtype)
    _check(x, cb, backend, f"{dtype}")


@pytest.mark.parametrize("copies", [3, 5])
@pytest.mark.parametrize("interleave", [True, False], ids=["consecutive", "repeated"])
def test_duplicated_codes_lowest_index(backend, threads, copies, interleave, request):
    x, cb = A.duplicated(_gen(request), copies=copies, interleave=interleave)
    _check(x, cb, backend, f"{copies} copies")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reflection_ties_lowest_index(backend, dtype, request):
    x, cb = A.reflections(_gen(request), dtype=dtype)
    idx, _ = nearest_code(x, cb, backend=backend)
    ref, _, d = A.exact_answer(x, cb)
    # Every row has an exact tie by construction, and it must go to the lower of the two.
    assert (d.topk(2, 1, largest=False).values.diff(dim=1) == 0).all()
    assert torch.equal(idx, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_large_mean(backend, dtype, request):
    x, cb = A.large_mean(_gen(request), dtype=dtype)
    _check(x, cb, backend, "1000 + N(0, 1)")
    # Enough rows judged by equality: clearly apart, or exact ties (16-bit values at 1000 sit on a
    # grid, 4 apart in bf16, so distances are exact and many rows tie; assert_exact gives a tied
    # row the lowest index and no other code is within its slack). Counting clear rows alone,
    # bf16 left a share of 0.32 +- 0.034 (min 0.20 over 1,500 seeds) against a bar of 0.2.
    _, clear, d = A.exact_answer(x, cb)
    tie = (d == d.min(1, keepdim=True).values).sum(1) > 1
    assert int((clear | tie).sum()) > 0.9 * x.shape[0]


@pytest.mark.parametrize("scale", [1e19, 1e25, 1e30, 1e-20, 1e-25, 1e-30, 1e-36])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_magnitudes(backend, scale, dtype, request):
    x, cb = A.magnitudes(_gen(request), scale, dtype=dtype)
    if dtype == torch.bfloat16 and scale < 1e-36:
        pytest.skip("bf16 subnormals at this scale lose the pattern")
    n = _check(x, cb, backend, f"scale {scale:g}")
    assert n > 0.9 * x.shape[0]
    _, sq = nearest_code(x, cb, backend=backend)
    if scale >= 1e25:
        assert torch.isinf(sq).all()  # the true error exceeds float32's range
    assert torch.isfinite(vq_quantize(x, cb, backend=backend).z_q).all()


@pytest.mark.parametrize("K,D", [(1, 1), (2, 3), (3, 129), (2, 1), (3, 3), (1, 129)])
def test_tiny_codebooks_far_from_origin(backend, K, D, request):
    g = _gen(request)
    x, cb = A.close_codes(g, N=50, K=K, D=D, n_close=min(K, 2), spacing=1)
    _check(x, cb, backend, f"K={K} D={D}")


def test_nonfinite_rows_and_codes_policy(backend, request):
    """A NaN or +-inf row gets index 0 and a NaN z_q; a code with NaN or inf is never chosen for a
    finite row; if every code is non-finite, index 0."""
    g = _gen(request)
    x, cb = A.large_mean(g, N=40, K=20, D=8, mean=0.0)
    x[3, 2], x[7, 0], x[9, 5] = float("nan"), float("inf"), float("-inf")
    cb[0, 1], cb[4, 0], cb[5, 3] = float("nan"), float("inf"), float("-inf")
    # Make the poisoned codes the would-be nearest of some rows.
    x[11] = cb[4].nan_to_num(posinf=0.0)
    x[12] = cb[0].nan_to_num(nan=0.0)
    idx, sq = nearest_code(x, cb, backend=backend)
    assert idx[[3, 7, 9]].tolist() == [0, 0, 0]
    assert not torch.isin(idx[torch.isfinite(x).all(1)], torch.tensor([0, 4, 5])).any()
    A.assert_exact(x, cb, idx, what="non-finite policy")
    zq = vq_quantize(x, cb, backend=backend).z_q
    assert torch.isnan(zq[[3, 7, 9]]).all()
    assert torch.isfinite(zq[torch.isfinite(x).all(1)]).all()
    allbad = torch.full((3, 8), float("nan"))
    idx2, _ = nearest_code(x[:5].nan_to_num(), allbad, backend=backend)
    assert (idx2 == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cpu_research_is_exercised_and_needed(backend, dtype, monkeypatch, request):
    """On the far-from-origin family the CPU kernel's fast pass proves nothing, the exact
    re-search measures the rows (its counter moves), and without it (the debug switch
    VQK_DEBUG_APPROX_ONLY=1) many clear rows get a wrong code. The share wrong depends on the
    path and the seed: over seeds 0-149, min 0.975 (avx2, fp32), 0.574 (avx2, fp16), 0.481
    (avx2_i16, fp32), 0.186 (avx2_i16, fp16); over 1,500 more, avx2_i16 fp16 had mean 0.67, sd
    0.15 and 2 seeds under 0.1 (min 0.075). So the bar is 10%, and a draw under it is redrawn
    (up to 4 times: the family must defeat the fast pass, not at every seed)."""
    if backend != "cpu":
        pytest.skip("the native CPU kernel's re-search")
    offset = 2.0 ** 10 if dtype == torch.float16 else 2.0 ** (40 if dtype == torch.float64 else 14)
    g = _gen(request)
    wrong = []
    for _ in range(4):
        x, cb = A.close_codes(g, n_close=5, spacing=4, offset=offset, dtype=dtype)
        if dtype == torch.float64:  # far enough that float64's own expansion cancels
            x, cb = x * 2.0 ** 20, cb * 2.0 ** 20
        ref, clear, _ = A.exact_answer(x, cb)
        monkeypatch.setenv("VQK_DEBUG_APPROX_ONLY", "1")
        approx, _ = nearest_code(x, cb, backend="cpu")
        monkeypatch.delenv("VQK_DEBUG_APPROX_ONLY")
        wrong.append(float((approx[clear] != ref[clear]).float().mean()))
        if wrong[-1] > 0.1:
            break
    assert wrong[-1] > 0.1, f"the fast pass alone was wrong on only {wrong} of the clear rows"
    before = native.module().cpu_exact_rows()
    idx, _ = nearest_code(x, cb, backend="cpu")
    assert native.module().cpu_exact_rows() - before >= int(clear.sum()) // 2
    assert torch.equal(idx[clear], ref[clear])


def test_cpu_research_is_rare_on_random_data(backend):
    """Random data far from ties: the fast pass proves almost every row (cost stays low)."""
    if backend != "cpu":
        pytest.skip("the native CPU kernel's re-search")
    x, cb = torch.randn(4096, 64), torch.randn(512, 64)
    before = native.module().cpu_exact_rows()
    nearest_code(x, cb, backend="cpu")
    assert native.module().cpu_exact_rows() - before < 0.01 * x.shape[0]


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300])
def test_float64_whole_range(backend, scale, request):
    """float64 far past the range where its squares overflow (or vanish): searched on values
    scaled by a power of two, so the codes are right and z_q is finite."""
    x, cb = A.magnitudes(_gen(request), 1.0, dtype=torch.float64)
    x, cb = x * scale, cb * scale
    idx, sq = nearest_code(x, cb, backend=backend)
    # The truth on values scaled back into range (exact: a power of two).
    s = 2.0 ** -round(math.log2(scale))
    ref, clear, _ = A.exact_answer(x * s, cb * s)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], ref[clear])
    assert torch.isfinite(vq_quantize(x, cb, backend=backend).z_q).all()
