"""The Triton kernels as torch.library.triton_op: torch.compile sees through them.

  vqkernels::triton_vq_quantize(z, codebook, dim) -> (z_q, indices, err_codebook, err_commit, counts)
  vqkernels::triton_vq_quantize_backward(grad_zq, g_codebook, g_commit, z, codebook, indices, dim)
      -> (grad_z, grad_codebook)
  vqkernels::triton_nearest_code(x, codebook, dim) -> (indices, sqdist)

Same contract as the opaque custom ops of vqkernels.ops (which dispatch on a backend name), but
their bodies launch the kernels through torch.library.wrap_triton, so under
torch.compile(fullgraph=True) Inductor traces the launches into its graph (and can schedule and fuse
around them) instead of calling an opaque op. In eager mode a triton_op launches the kernels
directly, with no tracing overhead.

Public calls with backend "triton" (or "auto" resolving to it) on CUDA tensors go through these
ops; VQK_TRITON_OP=0 sends them through the opaque custom ops instead. Under TRITON_INTERPRET=1
(CPU tensors) the public calls keep the opaque ops: the interpreter cannot run on the fake tensors
of tracing, but these ops still run eagerly there and are tested that way.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import _env
from .._layout import RowPlan
from . import launch


@triton_op("vqkernels::triton_vq_quantize", mutates_args=())
def triton_vq_quantize(z: Tensor, codebook: Tensor, dim: int
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    z_q, indices, sqerr, counts = launch.forward(z, dim, codebook, RowPlan(z, dim),
                                                 wrap=wrap_triton)
    return z_q, indices, sqerr, sqerr.clone(), counts


@triton_op("vqkernels::triton_vq_quantize_backward", mutates_args=())
def triton_vq_quantize_backward(grad_zq: Optional[Tensor], g_codebook: Optional[Tensor],
                                g_commit: Optional[Tensor], z: Tensor, codebook: Tensor,
                                indices: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    return launch.backward(z, dim, codebook, indices, grad_zq, g_codebook, g_commit,
                           RowPlan(z, dim), wrap=wrap_triton)


@triton_op("vqkernels::triton_nearest_code", mutates_args=())
def triton_nearest_code(x: Tensor, codebook: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    _, indices, sqdist, _ = launch.forward(x, dim, codebook, RowPlan(x, dim), wrap=wrap_triton)
    return indices, sqdist


def _setup_context(ctx, inputs, output):
    z, codebook, dim = inputs
    ctx.save_for_backward(z, codebook, output[1])
    ctx.dim = dim


def _backward(ctx, grad_zq, _grad_indices, g_codebook, g_commit, _grad_counts):
    z, codebook, indices = ctx.saved_tensors
    grad_z, grad_cb = torch.ops.vqkernels.triton_vq_quantize_backward(
        grad_zq, g_codebook, g_commit, z, codebook, indices, ctx.dim)
    return (grad_z if ctx.needs_input_grad[0] else None,
            grad_cb if ctx.needs_input_grad[1] else None, None)


triton_vq_quantize.register_autograd(_backward, setup_context=_setup_context)


def enabled(device: torch.device) -> bool:
    """Whether public calls on `device` go through these ops (see the module docstring)."""
    return (device.type == "cuda" and not launch.interpreting()
            and _env.flag("VQK_TRITON_OP", True))
