"""The fused Triton residual-VQ kernel (issue 17) against the float64 reference, stage by stage.

Without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, set by conftest) on
small shapes; with one they run the compiled kernel on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

from vqkernels import backends
from vqkernels.residual import residual_forward, residual_vq

from adversarial import (assert_exact, close_codes, duplicated, exact_answer,
                         fp32_expansion_argmin)
from test_residual import _assert_every_stage_exact, _stagewise_data

_STATUS = backends.available_backends()["triton"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"triton: {_STATUS.detail}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tri(z, cbs, active=None, **kw):
    from vqkernels.triton import residual as tr
    out = tr.residual_forward(z.to(DEVICE), [c.to(DEVICE) for c in cbs],
                              None if active is None else active.to(DEVICE), **kw)
    return tuple(t.cpu() for t in out)


@pytest.mark.parametrize("N,D,Ks", [(1, 1, [1]), (33, 3, [5, 2, 40]), (45, 17, [64, 33])])
@pytest.mark.parametrize("blocks", [(16, 16, 16), (32, 64, 32)])
def test_fused_triton_equals_the_reference_for_every_block_shape(N, D, Ks, blocks):
    g = torch.Generator().manual_seed(N * 7 + D)
    z, cbs = _stagewise_data(g, N, D, Ks)
    q, i, e = _tri(z, cbs, block_n=blocks[0], block_k=blocks[1], block_d=blocks[2])
    q_ref, i_ref, e_ref = residual_forward(z, cbs, None, "reference")
    _assert_every_stage_exact(z, cbs, i, "triton")
    assert torch.equal(i, i_ref) and torch.equal(q, q_ref)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-6)


def test_far_from_the_origin_the_exact_path_decides():
    g = torch.Generator().manual_seed(3)
    x, cb0 = close_codes(g, N=40, K=70, D=16, n_close=3, spacing=16)
    cb1 = torch.randint(-64, 65, (20, 16), generator=g).float() / 32
    stats = {}
    q, i, e = _tri(x, [cb0, cb1], stats=stats)
    assert int(stats["flagged"]) > 0  # the exact path ran ...
    ref, clear, _ = exact_answer(x, cb0)
    # ... and was needed: the fp32 expansion alone picks other codes on these rows.
    assert (fp32_expansion_argmin(x, cb0) != ref)[clear].any()
    _assert_every_stage_exact(x, [cb0, cb1], i, "triton far")


# NaN and inf are the point here: the interpreter's numpy matmul warns about them.
@pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in:RuntimeWarning")
def test_duplicates_dropout_and_non_finite_rows():
    g = torch.Generator().manual_seed(4)
    x, cb = duplicated(g, N=30, K0=10, D=8, copies=3)
    cbs = [cb, cb - cb.mean(0)]
    x[2, 1] = float("nan")
    cbs[1][5, 0] = float("inf")
    act = torch.randint(0, 3, (30,), generator=g)
    q, i, e = _tri(x, cbs, act)
    q_ref, i_ref, _ = residual_forward(x, cbs, act, "reference")
    assert torch.equal(i, i_ref)
    assert torch.equal(q.isnan(), q_ref.isnan())
    ok = ~q.isnan()
    assert torch.equal(q[ok], q_ref[ok])


def test_the_op_uses_the_fused_kernel_with_gradients():
    g = torch.Generator().manual_seed(5)
    z, cbs = _stagewise_data(g, 20, 4, [6, 6])
    z = z.to(DEVICE).requires_grad_(True)
    cbs = [c.to(DEVICE).requires_grad_(True) for c in cbs]
    out = residual_vq(z, cbs, backend="triton")
    ref = residual_vq(z, cbs, backend="reference")
    assert torch.equal(out.indices, ref.indices)
    out.loss.backward()
    g1 = [z.grad.clone()] + [c.grad.clone() for c in cbs]
    for t in [z, *cbs]:
        t.grad = None
    ref.loss.backward()
    for a, b in zip(g1, [z.grad] + [c.grad for c in cbs]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ grouped, one launch
def _grouped_data(name, g, G, N):
    """(z (N, G d), G codebooks): each group its own family of hard inputs (or random)."""
    from adversarial import large_mean, magnitudes, reflections
    parts, books = [], []
    for i in range(G):
        if name == "random":
            x, cb = torch.randn(N, 5, generator=g), torch.randn(11 + 3 * i, 5, generator=g)
        elif name == "close":
            x, cb = close_codes(g, N=N, K=40 + i, D=8, n_close=3 + 2 * i, spacing=None)
        elif name == "duplicated":
            x, cb = duplicated(g, N=N, K0=7, D=8, copies=3 + 2 * (i % 2), interleave=i % 2 == 0)
        elif name == "reflections":
            x, cb = reflections(g, N=N, D=8, extra=5)  # K = 2 N + 5, every row an exact tie
        elif name == "large_mean":
            x, cb = large_mean(g, N=N, K=30, D=8)
        else:  # magnitudes: huge and tiny groups side by side
            x, cb = magnitudes(g, 1e25 if i % 2 else 1e-30, N=N, K=20, D=8)
        parts.append(x)
        books.append(cb)
    return torch.cat(parts, 1), books


_FAMILIES = ["random", "close", "duplicated", "reflections", "large_mean", "magnitudes"]


# Squares of 1e25 overflow fp32 on purpose: the interpreter's numpy warns about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in:RuntimeWarning")
@pytest.mark.parametrize("name", _FAMILIES)
def test_grouped_one_launch_is_exact_for_every_group(name):
    from vqkernels.triton import residual as tr
    g = torch.Generator().manual_seed(1700 + _FAMILIES.index(name))
    G, N = 3, 19
    z, books = _grouped_data(name, g, G, N)
    d = books[0].shape[1]
    stats = {}
    q, i, e = (t.cpu() for t in tr.grouped_forward(z.to(DEVICE), [b.to(DEVICE) for b in books],
                                                   block_n=16, block_k=16, block_d=16,
                                                   stats=stats))
    assert i.shape == (G, N) and q.shape == (N, G * d)
    for k in range(G):
        x = z[:, k * d:(k + 1) * d]
        assert_exact(x, books[k], i[k], what=f"{name} group {k}")
        fin = torch.isfinite(x).all(1)
        assert torch.equal(q[fin, k * d:(k + 1) * d], books[k][i[k][fin]])
        ref = ((x.double() - books[k].double()[i[k]]) ** 2).sum(1)
        torch.testing.assert_close(e[k].double(), ref.float().double(), rtol=1e-5, atol=0)
    if name in ("close", "duplicated"):
        assert int(stats["flagged"]) > 0  # the exact path decided some rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_vq_runs_one_launch_with_the_loops_gradients(dtype, monkeypatch):
    from vqkernels import residual as res
    from vqkernels.triton import residual as tr
    g = torch.Generator().manual_seed(17)
    z0 = torch.randn(2, 12, 7, generator=g).to(dtype)  # D = 12 at dim 1, G = 3
    books0 = [torch.randn(9 + k, 4, generator=g).to(dtype) for k in range(3)]
    mask = torch.rand(2, 7, generator=g) < 0.8

    def run():
        z = z0.clone().to(DEVICE).requires_grad_(True)
        books = [b.clone().to(DEVICE).requires_grad_(True) for b in books0]
        out = res.grouped_vq(z, books, dim=1, beta=0.5, mask=mask.to(DEVICE), backend="triton")
        (out.loss + (out.z_q.float() * torch.arange(12.0, device=DEVICE)[:, None]).sum()
         ).backward()
        return out, [z.grad] + [b.grad for b in books]

    launches = []
    real = tr._launch
    monkeypatch.setattr(tr, "_launch", lambda *a, **k: launches.append(1) or real(*a, **k))
    fused, g_fused = run()
    assert len(launches) == 1  # all three groups in one launch
    monkeypatch.setattr(res, "_grouped_fused", lambda *a: None)  # the per-group loop
    loop, g_loop = run()
    assert len(launches) == 1
    assert torch.equal(fused.indices, loop.indices) and torch.equal(fused.z_q, loop.z_q)
    assert fused.z_q.dtype == dtype
    for a, b in [(fused.codebook_loss, loop.codebook_loss),
                 (fused.commitment_loss, loop.commitment_loss)] + list(zip(g_fused, g_loop)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(fused.counts, loop.counts):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_input_runs_the_fused_kernel_on_its_fp32_widening(dtype, monkeypatch):
    from vqkernels.triton import residual as tr
    g = torch.Generator().manual_seed(6)
    z, cbs = _stagewise_data(g, 23, 6, [9, 7, 5])
    z, cbs = z.to(dtype), [c.to(dtype) for c in cbs]
    launches = []
    real = tr._launch
    monkeypatch.setattr(tr, "_launch", lambda *a, **k: launches.append(1) or real(*a, **k))
    out = residual_vq(z.to(DEVICE), [c.to(DEVICE) for c in cbs], backend="triton")
    assert len(launches) == 1  # every stage in the one fused launch
    ref = residual_vq(z, cbs, backend="reference")
    assert torch.equal(out.indices.cpu(), ref.indices)
    assert out.z_q.dtype == dtype and torch.equal(out.z_q.cpu(), ref.z_q)
    _assert_every_stage_exact(z.float(), [c.float() for c in cbs], out.indices.cpu().T, "16-bit")


@pytest.mark.parametrize("shared", [False, True])
def test_grouped_module_runs_one_launch_with_the_loops_outputs_and_gradients(shared, monkeypatch):
    # GroupedVectorQuantizer on backend="triton" takes the one-launch grouped path as the CPU
    # backend takes its one native call, and gives the per-group loop's outputs and gradients.
    from vqkernels import GroupedVectorQuantizer
    from vqkernels.quantizers import multi
    from vqkernels.triton import residual as tr
    g = torch.Generator().manual_seed(1718)
    z0 = torch.randn(2, 12, 5, generator=g)  # channel-first, D = 12 in G = 3 groups of 4
    mask = torch.rand(2, 5, generator=g) < 0.8
    vq = GroupedVectorQuantizer(12, 3, num_codes=[7, 9, 6] if not shared else 7, beta=0.5,
                                shared_codebook=shared, channel_dim=1, backend="triton",
                                ema=False, kmeans_init=False, restart_after=None).to(DEVICE)

    def run():
        vq.zero_grad(set_to_none=True)
        z = z0.clone().to(DEVICE).requires_grad_(True)
        out = vq(z, mask=mask.to(DEVICE))
        (out.loss + (out.z_q * torch.arange(12.0, device=DEVICE)[:, None]).sum()).backward()
        return out, [z.grad] + [b.codebook.grad for b in vq.books]

    launches = []
    real = tr._launch
    monkeypatch.setattr(tr, "_launch", lambda *a, **k: launches.append(1) or real(*a, **k))
    fused, g_fused = run()
    assert len(launches) == 1  # every group in one launch
    monkeypatch.setattr(multi, "_grouped_fused", lambda *a: None)  # the per-group loop
    loop, g_loop = run()
    assert len(launches) == 1  # the loop runs the single-stage kernel, group by group
    assert torch.equal(fused.indices, loop.indices) and torch.equal(fused.z_q, loop.z_q)
    for a, b in [(fused.codebook_loss, loop.codebook_loss),
                 (fused.commitment_loss, loop.commitment_loss), (fused.loss, loop.loss),
                 (fused.perplexity, loop.perplexity)] + list(zip(g_fused, g_loop)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(fused.counts, loop.counts):
        assert torch.equal(a, b)
