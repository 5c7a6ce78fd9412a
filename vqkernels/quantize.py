"""vq_quantize, nearest_code, VQOutput and the VectorQuantizer module."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import backends, ops  # noqa: F401  (ops registers the torch.library ops)

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
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one code (K = 0)")
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
    return torch.ops.vqkernels.nearest_code(x.detach(), codebook.detach(), dim, backend)


def vq_quantize(z_e: Tensor, codebook: Tensor, *, beta: float = 0.25, dim: int = -1,
                backend: str = "auto", check_finite: bool = False) -> VQOutput:
    """Straight-through vector quantization of `z_e` along `dim` against `codebook` (K, D).

    One fused pass finds the nearest code, gathers it and computes each row's exact squared error;
    the two VQ losses come from that error. No N x K tensor is ever made.
    """
    dim = _check(z_e, codebook, dim, backend)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if check_finite:
        _check_finite(z_e, codebook, "z_e")
    z_q, indices, err_cb, err_commit, counts = torch.ops.vqkernels.vq_quantize(
        z_e, codebook, dim, backend)
    numel = max(z_e.numel(), 1)  # N = 0: the losses are 0 (an empty sum), not NaN
    codebook_loss = err_cb.sum() / numel
    commitment_loss = err_commit.sum() / numel
    probs = counts.to(err_cb.dtype) / max(indices.numel(), 1)
    perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
    return VQOutput(z_q, indices, codebook_loss, commitment_loss,
                    codebook_loss + beta * commitment_loss, perplexity)


class VectorQuantizer(nn.Module):
    """A codebook of `num_codes` vectors of size `dim`, quantizing with `vq_quantize`.

    The codebook starts uniform in +-1/num_codes, as in the VQ-VAE paper's reference code. Under
    mixed precision the codebook is cast to the input's dtype for the search, and its gradient flows
    back to the full-precision parameter.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, *, channel_dim: int = -1,
                 backend: str = "auto"):
        super().__init__()
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if backend not in backends.ALL_NAMES:
            raise ValueError(f"backend must be one of {backends.ALL_NAMES}, got {backend!r}")
        self.num_codes, self.dim, self.beta = num_codes, dim, float(beta)
        self.channel_dim, self.backend = channel_dim, backend
        self.codebook = nn.Parameter(torch.empty(num_codes, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.codebook.uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)

    def forward(self, z_e: Tensor, *, dim: int | None = None) -> VQOutput:
        cb = self.codebook if self.codebook.dtype == z_e.dtype else self.codebook.to(z_e.dtype)
        return vq_quantize(z_e, cb, beta=self.beta,
                           dim=self.channel_dim if dim is None else dim, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, "
                f"channel_dim={self.channel_dim}, backend={self.backend!r}")
