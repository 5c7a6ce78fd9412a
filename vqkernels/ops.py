"""torch.library custom ops: one schema per op, fake (meta) implementations, autograd registered once.

  vqkernels::nearest_code(x, codebook, dim, backend) -> (indices, sqdist)
  vqkernels::vq_quantize(z, codebook, dim, backend) -> (z_q, indices, err_codebook, err_commit, counts)
  vqkernels::vq_quantize_backward(...) -> (grad_z, grad_codebook)

vq_quantize returns the exact per-row squared error twice: `err_codebook` and `err_commit` hold the
same values, but the gradient of the first reaches only the codebook and that of the second only z.
That is how the two VQ losses stay separate without a second pass or any N x K tensor.

On CUDA tensors the Triton backend goes through the triton_ops of vqkernels.triton.ops instead,
which torch.compile traces into (see use_triton_ops).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from . import backends, reference
from ._layout import RowPlan, output_like


def _lead_shape(z: Tensor, dim: int) -> list[int]:
    return [s for i, s in enumerate(z.shape) if i != dim % z.dim()]


@torch.library.custom_op("vqkernels::nearest_code", mutates_args=())
def nearest_code(x: Tensor, codebook: Tensor, dim: int, backend: str) -> tuple[Tensor, Tensor]:
    b = backends.resolve(backend, x.device)
    _, indices, sqdist, _ = b.forward(x, dim, codebook, RowPlan(x, dim), want_zq=False)
    return indices, sqdist


@nearest_code.register_fake
def _(x, codebook, dim, backend):
    lead = _lead_shape(x, dim)
    return (x.new_empty(lead, dtype=torch.long),
            x.new_empty(lead, dtype=reference.acc_dtype(x.dtype)))


@torch.library.custom_op("vqkernels::vq_quantize", mutates_args=())
def vq_quantize(z: Tensor, codebook: Tensor, dim: int, backend: str
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    b = backends.resolve(backend, z.device)
    z_q, indices, sqerr, counts = b.forward(z, dim, codebook, RowPlan(z, dim))
    return z_q, indices, sqerr, sqerr.clone(), counts


@vq_quantize.register_fake
def _(z, codebook, dim, backend):
    lead = _lead_shape(z, dim)
    acc = reference.acc_dtype(z.dtype)
    return (output_like(z, dim), z.new_empty(lead, dtype=torch.long), z.new_empty(lead, dtype=acc),
            z.new_empty(lead, dtype=acc), z.new_empty(codebook.shape[0], dtype=torch.long))


@torch.library.custom_op("vqkernels::vq_quantize_backward", mutates_args=())
def vq_quantize_backward(grad_zq: Optional[Tensor], g_codebook: Optional[Tensor],
                         g_commit: Optional[Tensor], z: Tensor, codebook: Tensor, indices: Tensor,
                         dim: int, backend: str) -> tuple[Tensor, Tensor]:
    b = backends.resolve(backend, z.device)
    return b.backward(z, dim, codebook, indices, grad_zq, g_codebook, g_commit, RowPlan(z, dim))


@vq_quantize_backward.register_fake
def _(grad_zq, g_codebook, g_commit, z, codebook, indices, dim, backend):
    return output_like(z, dim), torch.empty_like(codebook)


def _setup_context(ctx, inputs, output):
    z, codebook, dim, backend = inputs
    # An output nobody used (z_q when only the losses are trained, say) has no gradient: let it
    # arrive as None rather than as a z-sized tensor of zeros; the kernels treat None as zero.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, codebook, output[1])
    ctx.dim, ctx.backend = dim, backend


def _backward(ctx, grad_zq, _grad_indices, g_codebook, g_commit, _grad_counts):
    z, codebook, indices = ctx.saved_tensors
    grad_z, grad_cb = torch.ops.vqkernels.vq_quantize_backward(
        grad_zq, g_codebook, g_commit, z, codebook, indices, ctx.dim, ctx.backend)
    return (grad_z if ctx.needs_input_grad[0] else None,
            grad_cb if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd("vqkernels::vq_quantize", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, grad_z, grad_codebook):
    raise NotImplementedError(
        "vq_quantize has no second derivative here: its backward was recorded with "
        "create_graph=True and is now being differentiated again (double backward, e.g. a "
        "gradient penalty). Use create_graph=False, or take the penalty's path around the "
        "quantizer (through z_q = z_e + (e - z_e).detach() in plain torch)")


# create_graph=True records the backward; differentiating it again says so instead of failing
# with "no autograd formula was registered".
torch.library.register_autograd("vqkernels::vq_quantize_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _skip_dynamo_import_when_absent(op) -> int:
    """torch.library.custom_op wraps each implementation in torch._disable_dynamo, which imports
    torch._dynamo on the op's first call (the first vq_quantize of a process took 1.4 s, the
    second 0.5 ms, on an Ice Lake Xeon, family 6 model 106, AVX-512 VNNI, 2 vCPU) only to mark
    the implementation as one dynamo must not trace. Until something has imported torch._dynamo
    no frame can be traced, so that marking can wait: the wrapper's cached hook
    (`__dynamo_disable`, which it looks up before importing) is set to a function that calls the
    implementation directly while torch._dynamo is absent and otherwise does what the wrapper
    would have done (torch._dynamo.disable, recursive, no wrapping), once. Returns how many
    implementations it reached (0 where torch's internals differ: then nothing changes but the
    first call's time)."""
    n = 0
    for fn in getattr(op, "_backend_fns", {}).values():
        raw = getattr(fn, "__wrapped__", None)
        if raw is None or getattr(fn, "__name__", None) != getattr(raw, "__name__", None) or \
                hasattr(raw, "__dynamo_disable"):
            continue

        def lazy(*args, _raw=raw, _cell=[], **kwargs):
            if not _cell:
                dynamo = sys.modules.get("torch._dynamo")
                if dynamo is None:
                    return _raw(*args, **kwargs)
                _cell.append(dynamo.disable(_raw, True, wrapping=False))
            return _cell[0](*args, **kwargs)

        setattr(raw, "__dynamo_disable", lazy)
        n += 1
    return n


_DYNAMO_DEFERRED = sum(_skip_dynamo_import_when_absent(op)
                       for op in (nearest_code, vq_quantize, vq_quantize_backward))




def _assume_constant_result(fn):
    # torch.compiler.assume_constant_result imports torch._dynamo (1.7 s, a third of
    # `import vqkernels`) only to set this marker, which dynamo reads when it traces a call.
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def use_triton_ops(backend: str, device: torch.device) -> bool:
    """Whether a call with `backend` on `device` goes through vqkernels.triton.ops (CUDA tensors
    whose backend is, or "auto" resolves to, triton; VQK_TRITON_OP=0 opts out). torch.compile
    takes the answer as a constant; eager calls look it up (decided once per backend, device and
    setting, not on every call)."""
    if device.type != "cuda" or backend not in ("triton", "auto"):
        return False
    return _use_triton_ops(backend, device, os.environ.get("VQK_TRITON_OP", "1"))


@functools.lru_cache(maxsize=None)
def _use_triton_ops(backend: str, device: torch.device, _setting: str) -> bool:
    try:
        if backends.resolve(backend, device).name != "triton":
            return False
    except (RuntimeError, ValueError):
        return False  # the custom op raises the backend's own error
    from .triton import ops as triton_ops
    return triton_ops.enabled(device)
