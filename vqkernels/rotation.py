"""The rotation trick (Fifty et al. 2024, "Restructuring vector quantization with the rotation
trick", sec. 4.2) as a gradient estimator for the quantized output.

Forward: the chosen code e itself (the value is exactly z_q). Backward: instead of the
straight-through copy (d e / d z = I) the gradient reaches z through the rotation-and-rescaling
that maps z onto e, held constant: q~ = sg[lambda R] z with lambda = ||e|| / ||z|| and R the
rotation taking u = z/||z|| to q = e/||e|| in their common plane, so

    grad_z = lambda R^T g,  R = I - 2 w w^T + 2 q u^T,  w = (u + q) / ||u + q||
    R^T g  = g - 2 (w.g) w + 2 (q.g) u

-- two dot products per row: O(N D) time and memory, never a D x D matrix (w = 0 when u = -q; R
then still maps u to q). Rows with z = 0 or e = 0 (no direction to rotate) get the
straight-through gradient. The sums run in float32 for 16-bit input (float64 for float64).
The codebook gets no gradient through this path (lambda and R are constants), as in the paper.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotation_grad(z: Tensor, e: Tensor, g: Tensor, dim: int = -1) -> Tensor:
    """lambda R^T g for rows z, codes e and output gradient g, all shaped alike with the vectors
    along `dim`."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, e, g = z.to(acc), e.to(acc), g.to(acc)
    nz = torch.linalg.vector_norm(z, dim=dim, keepdim=True)
    ne = torch.linalg.vector_norm(e, dim=dim, keepdim=True)
    ok = (nz > 0) & (ne > 0)
    one = torch.ones((), dtype=acc, device=z.device)
    u = z / torch.where(ok, nz, one)
    q = e / torch.where(ok, ne, one)
    s = u + q
    ns = torch.linalg.vector_norm(s, dim=dim, keepdim=True)
    w = s / torch.where(ns > 0, ns, one)
    rt_g = g - 2 * (w * g).sum(dim, keepdim=True) * w + 2 * (q * g).sum(dim, keepdim=True) * u
    return torch.where(ok, rt_g * (ne / torch.where(ok, nz, one)), g)


class _RotationTrick(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, e, dim):
        ctx.save_for_backward(z, e)
        ctx.dim = dim
        return e.clone()

    @staticmethod
    def backward(ctx, g):
        z, e = ctx.saved_tensors
        return rotation_grad(z, e, g, ctx.dim).to(z.dtype), None, None


def rotate_to(z: Tensor, e: Tensor, dim: int = -1) -> Tensor:
    """e's values, with the rotation trick's gradient to z (none to e)."""
    return _RotationTrick.apply(z, e.detach(), dim)
