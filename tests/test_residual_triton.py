"""The fused Triton residual-VQ kernel (issue 17) against the float64 reference, stage by stage.

Without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, set by conftest) on
small shapes; with one they run the compiled kernel on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

from vqkernels import backends
from vqkernels.residual import residual_forward, residual_vq

from adversarial import close_codes, duplicated, exact_answer, fp32_expansion_argmin
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
@pytest.mark.parametrize("blocks", [(16, 16), (32, 64)])
def test_fused_triton_equals_the_reference_for_every_block_shape(N, D, Ks, blocks):
    g = torch.Generator().manual_seed(N * 7 + D)
    z, cbs = _stagewise_data(g, N, D, Ks)
    q, i, e = _tri(z, cbs, block_n=blocks[0], block_k=blocks[1])
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
