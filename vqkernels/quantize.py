"""vq_quantize, nearest_code and VQOutput: the single-codebook functional API.

The quantizer modules (VectorQuantizer, the residual and grouped quantizers) and their codebook
upkeep live in `vqkernels.quantizers`; `VectorQuantizer` is still importable from here (looked up
on first use, so this module never imports the package that imports it).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, ops  # ops also registers the torch.library ops

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class VQOutput(NamedTuple):
    z_q: Tensor              # chosen codes, z_e's shape and dtype; gradient to z_e is the identity
    indices: Tensor          # int64, z_e's shape without `dim`
    codebook_loss: Tensor    # mean (sg[z_e] - e)^2: gradient reaches the codebook only
    commitment_loss: Tensor  # mean (z_e - sg[e])^2, unweighted: gradient reaches z_e only
    loss: Tensor             # codebook_loss + beta * commitment_loss
    perplexity: Tensor       # exp(entropy of this batch's code usage)


def _check(z_e, codebook, dim, backend, z_name="z_e"):
    if not isinstance(z_e, Tensor):
        raise TypeError(f"{z_name} must be a torch.Tensor, got {type(z_e).__name__}")
    if not isinstance(codebook, Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    for name, t in ((z_name, z_e), ("codebook", codebook)):
        # The kernels read strided memory: a sparse or nested tensor would fail deep inside.
        if t.is_nested:
            raise TypeError(f"{name} must be a dense tensor, got a nested tensor (quantize its "
                            f"components, or a padded tensor, instead)")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout} "
                            f"(call .to_dense() first)")
        if _functorch_wrapped(t):
            raise NotImplementedError(
                f"{name} is traced by a torch.func transform (grad, vmap, jacrev, ...), which "
                f"vqkernels' ops do not support; use torch.autograd.grad or .backward() instead")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one code (K = 0)")
    if codebook.shape[1] == 0:
        raise ValueError("codebook's codes have D = 0 elements: there is nothing to compare (a "
                         "code needs D >= 1)")
    if z_e.dtype not in _FLOATS:
        raise TypeError(f"{z_name} must be float32, float64, float16 or bfloat16, got {z_e.dtype}")
    if codebook.dtype != z_e.dtype:
        raise TypeError(f"codebook dtype {codebook.dtype} does not match {z_name} dtype {z_e.dtype}")
    if codebook.device != z_e.device:
        raise ValueError(f"codebook is on {codebook.device} but {z_name} is on {z_e.device}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if z_e.dim() == 0:
        raise ValueError(f"{z_name} must have at least one dimension (the code dimension)")
    if not -z_e.dim() <= dim < z_e.dim():
        raise ValueError(f"dim={dim} is out of range for {z_name} with {z_e.dim()} dimensions")
    dim = dim % z_e.dim()
    if z_e.shape[dim] != codebook.shape[1]:
        raise ValueError(f"{z_name} has {z_e.shape[dim]} channels along dim={dim} but the codebook's "
                         f"codes have D={codebook.shape[1]}")
    if backend not in backends.ALL_NAMES:
        raise ValueError(f"backend must be one of {backends.ALL_NAMES}, got {backend!r}")
    return dim


def _functorch_wrapped(t: Tensor) -> bool:
    if torch.compiler.is_compiling():  # dynamo can't trace the query, and traces no transform
        return False
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # a torch without functorch
        return False


def _check_finite(z_e, codebook, z_name):
    if not bool(torch.isfinite(z_e).all()):
        raise ValueError(f"{z_name} contains NaN or infinite values (check_finite=True)")
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError("codebook contains NaN or infinite values (check_finite=True)")


def nearest_code(x: Tensor, codebook: Tensor, *, dim: int = -1, backend: str = "auto",
                 check_finite: bool = False) -> tuple[Tensor, Tensor]:
    """Nearest code of every vector of `x` (..., D) in `codebook` (K, D), squared L2, ties to the
    lowest index. Returns (indices int64 of x's shape without `dim`, sqdist: the squared distance to
    the chosen code, float32 -- float64 for float64 input). No autograd."""
    dim = _check(x, codebook, dim, backend, "x")
    if check_finite:
        _check_finite(x, codebook, "x")
    if ops.use_triton_ops(backend, x.device):
        return torch.ops.vqkernels.triton_nearest_code(x.detach(), codebook.detach(), dim)
    return torch.ops.vqkernels.nearest_code(x.detach(), codebook.detach(), dim, backend)


def vq_quantize(z_e: Tensor, codebook: Tensor, *, beta: float = 0.25, dim: int = -1,
                backend: str = "auto", check_finite: bool = False) -> VQOutput:
    """Straight-through vector quantization of `z_e` along `dim` against `codebook` (K, D).

    One fused pass finds the nearest code, gathers it and computes each row's exact squared error;
    the two VQ losses come from that error. No N x K tensor is ever made.
    """
    return _vq_quantize(z_e, codebook, beta=beta, dim=dim, backend=backend,
                        check_finite=check_finite)[0]


def _check_beta(beta):
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
            or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")


def _vq_quantize(z_e, codebook, *, beta, dim, backend, check_finite=False):
    """vq_quantize, the kernel's per-code counts (int64, K) of this call's rows, and each row's
    exact squared error (no autograd; NaN or inf for a row that is not finite)."""
    dim = _check(z_e, codebook, dim, backend)
    _check_beta(beta)
    acc = torch.float64 if z_e.dtype == torch.float64 else torch.float32  # the losses' dtype
    if beta > torch.finfo(acc).max:
        raise ValueError(f"beta={beta!r} does not fit in the losses' dtype ({acc}, at most "
                         f"{torch.finfo(acc).max:.3g})")
    if check_finite:
        _check_finite(z_e, codebook, "z_e")
    if ops.use_triton_ops(backend, z_e.device):
        z_q, indices, err_cb, err_commit, counts = torch.ops.vqkernels.triton_vq_quantize(
            z_e, codebook, dim)
    else:
        z_q, indices, err_cb, err_commit, counts = torch.ops.vqkernels.vq_quantize(
            z_e, codebook, dim, backend)
    numel = max(z_e.numel(), 1)  # N = 0: the losses are 0 (an empty sum), not NaN
    codebook_loss = err_cb.sum() / numel
    commitment_loss = err_commit.sum() / numel
    # Few, small ops: at small N this bookkeeping is a visible part of the call.
    probs = counts.to(err_cb.dtype) / max(indices.numel(), 1)
    perplexity = torch.special.entr(probs).sum().exp()  # entr(p) = -p log p, 0 at p = 0
    return VQOutput(z_q, indices, codebook_loss, commitment_loss,
                    torch.add(codebook_loss, commitment_loss, alpha=beta), perplexity), counts, \
        err_commit.detach()


def __getattr__(name):
    # The old home of VectorQuantizer: resolved lazily, since vqkernels.quantizers imports this
    # module (a top-level import here would be circular).
    if name == "VectorQuantizer":
        from .quantizers.vector import VectorQuantizer
        return VectorQuantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
