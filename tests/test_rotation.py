"""The rotation trick (Fifty et al. 2024) as vq_quantize's gradient estimator: its O(N D)
backward against an explicit D x D float64 construction of the paper's rotation, by gradcheck."""
import pytest
import torch

from vqkernels import vq_quantize
from vqkernels.rotation import rotation_grad


def _rotation_matrix(z, e):
    """lambda and R (D x D, float64) by Rodrigues' formula in the plane of z and e: an independent
    construction of the rotation that takes z/|z| to e/|e| and is the identity elsewhere."""
    a = z / z.norm()
    b = e / e.norm()
    c = a @ b
    v = b - c * a
    s = v.norm()
    D = z.shape[0]
    eye = torch.eye(D, dtype=torch.float64)
    if s < 1e-12:  # parallel (R = I) -- the tests avoid antiparallel rows here
        return e.norm() / z.norm(), eye
    v = v / s
    R = eye + (c - 1) * (torch.outer(a, a) + torch.outer(v, v)) + s * (torch.outer(v, a) -
                                                                       torch.outer(a, v))
    return e.norm() / z.norm(), R


class _FrozenRotation(torch.autograd.Function):
    """forward: the paper's q~ = sg[lambda R] z' with lambda and R fixed at (z0, e) (plain torch,
    explicit matrix); backward: vqkernels' O(N D) formula at z0. gradcheck compares the two."""

    @staticmethod
    def forward(ctx, zp, z0, e, lam, R):
        ctx.save_for_backward(z0, e)
        return lam * (zp @ R.T)  # rows: lambda R z'

    @staticmethod
    def backward(ctx, g):
        z0, e = ctx.saved_tensors
        return rotation_grad(z0, e, g), None, None, None, None


@pytest.mark.parametrize("D", [2, 3, 8, 33])
def test_gradcheck_against_the_papers_rotation(D):
    z0 = torch.randn(1, D, dtype=torch.float64)
    e = torch.randn(1, D, dtype=torch.float64) * 3
    lam, R = _rotation_matrix(z0[0], e[0])
    torch.testing.assert_close(lam * (R @ z0[0]), e[0])  # it maps z onto e
    torch.testing.assert_close(R.T @ R, torch.eye(D, dtype=torch.float64))  # a rotation
    zp = z0.clone().requires_grad_()
    assert torch.autograd.gradcheck(_FrozenRotation.apply, (zp, z0, e, lam, R))
    g = torch.randn(1, D, dtype=torch.float64)
    torch.testing.assert_close(rotation_grad(z0, e, g)[0], lam * (R.T @ g[0]))


def test_edge_rows():
    z = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    e = torch.tensor([[-3.0, 0.0], [1.0, 2.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    g = torch.randn(4, 2, dtype=torch.float64)
    out = rotation_grad(z, e, g)
    # antiparallel: R = I + 2 q u^T (w = 0) still maps u to q; here R^T g flips the first axis
    torch.testing.assert_close(out[0], 3.0 * torch.stack([-g[0, 0], g[0, 1]]))
    torch.testing.assert_close(out[1], g[1])  # z = 0: straight-through
    torch.testing.assert_close(out[2], g[2])  # e = 0: straight-through
    torch.testing.assert_close(out[3], 2.0 * g[3])  # parallel: R = I, lambda = 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vq_quantize_rotation_trick(dtype):
    z = torch.randn(3, 5, 4, 2, dtype=dtype, requires_grad=True)  # channels on dim 1
    cb = torch.randn(11, 5, dtype=dtype, requires_grad=True)
    plain = vq_quantize(z, cb, channel_dim=1)
    rot = vq_quantize(z, cb, channel_dim=1, rotation_trick=True)
    assert torch.equal(rot.z_q, plain.z_q) and torch.equal(rot.indices, plain.indices)
    assert torch.equal(rot.loss, plain.loss)
    g = torch.randn_like(z)
    gz, gcb = torch.autograd.grad((rot.z_q * g).sum() + rot.loss, (z, cb))
    pz, pcb = torch.autograd.grad((plain.z_q * g).sum() + plain.loss, (z, cb))
    torch.testing.assert_close(gcb, pcb)  # the codebook's gradient is the loss's alone
    rows = z.detach().double().movedim(1, -1).reshape(-1, 5)
    codes = cb.detach().double()[rot.indices.reshape(-1)]
    gr = g.double().movedim(1, -1).reshape(-1, 5)
    expect = torch.stack([_rotation_matrix(r, c)[0] * (_rotation_matrix(r, c)[1].T @ h)
                          for r, c, h in zip(rows, codes, gr)])
    loss_part = (pz - g).double().movedim(1, -1).reshape(-1, 5)  # the commitment term
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(gz.double().movedim(1, -1).reshape(-1, 5), expect + loss_part,
                               **tol)
    with pytest.raises(TypeError, match="rotation_trick"):
        vq_quantize(z, cb, channel_dim=1, rotation_trick=1)


@pytest.mark.parametrize("cosine", [False, True])
def test_vector_quantizer_rotation_trick(cosine):
    # The module option is vq_quantize's: same z_q, same gradient to z_e (through the normalised
    # input when cosine), and not the straight-through one.
    from vqkernels import VectorQuantizer
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, ema=False, restart_after=None, kmeans_init=False, cosine=cosine,
                         rotation_trick=True).double()
    assert "rotation_trick=True" in repr(vq)
    z = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64)
    out = vq(z)
    (out.z_q * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    cb = vq.codebook.detach()
    zn = torch.nn.functional.normalize(z2, dim=1) if cosine else z2
    cbn = torch.nn.functional.normalize(cb, dim=1) if cosine else cb
    ref = vq_quantize(zn, cbn, rotation_trick=True, backend="reference")
    (ref.z_q * w).sum().backward()
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.z_q, ref.z_q)
    torch.testing.assert_close(z.grad, z2.grad)
    if not cosine:
        assert not torch.allclose(z.grad, w)  # the straight-through gradient would be w itself
    with pytest.raises(TypeError, match="rotation_trick"):
        VectorQuantizer(16, 8, rotation_trick=1)
