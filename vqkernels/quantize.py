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


def nearest_code(x: Tensor, codebook: Tensor, *, k: int = 1, metric: str = "l2",
                 channel_dim: int | None = None, dim: int | None = None, backend: str = "auto",
                 check_finite: bool = False) -> tuple[Tensor, Tensor]:
    """Nearest code of every vector of `x` (..., D) in `codebook` (K, D). No autograd.

    Returns (indices int64, distances): with k = 1 both have x's shape without `dim`; with k > 1 a
    last axis of k, nearest first. Distances are float32 (float64 for float64 input).
    metric: "l2" (the default): squared Euclidean distance, the fused kernels' exact search for
    k = 1; "cosine": 1 - cos(x, e); "ip": maximum inner product, distance -x.e. Ties go to the
    lowest index, judged on float64 values (see vqkernels/search.py): k > 1 and the cosine and
    ip metrics run a chunked float64 search (O(rows-per-chunk x K) memory, never N x K), not the
    fused kernels. channel_dim: the axis of x holding each vector's D values (default -1); `dim`
    is its deprecated former name, as in vq_quantize.
    Rows with NaN or inf: every path picks index 0 (NaN ranks as +inf); k = 1 L2 reports that
    code's exact error (NaN for a NaN row, as vq_quantize does), the other paths the value they
    ranked by (+inf).
    """
    from . import search  # on use: plain k = 1 L2 searches never need it
    dim = _check(x, codebook, _channel_axis(channel_dim, dim), backend, "x")
    if metric not in search.METRICS:
        raise ValueError(f"metric must be one of {search.METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= codebook.shape[0]:
        raise ValueError(f"k must be an int in [1, K={codebook.shape[0]}], got {k!r}")
    if check_finite:
        _check_finite(x, codebook, "x")
    if k == 1 and metric == "l2":
        if ops.use_triton_ops(backend, x.device):
            return torch.ops.vqkernels.triton_nearest_code(x.detach(), codebook.detach(), dim)
        return torch.ops.vqkernels.nearest_code(x.detach(), codebook.detach(), dim, backend)
    moved = x.movedim(dim, -1)
    idx, val = search.topk_rows(moved.reshape(-1, codebook.shape[1]), codebook, k, metric)
    lead = moved.shape[:-1]
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if k == 1:
        return idx.reshape(lead), val.to(out_dtype).reshape(lead)
    return idx.reshape(*lead, k), val.to(out_dtype).reshape(*lead, k)


def vq_quantize(z_e: Tensor, codebook: Tensor, *, beta: float = 0.25,
                channel_dim: int | None = None, dim: int | None = None, backend: str = "auto", check_finite: bool = False,
                rotation_trick: bool = False) -> VQOutput:
    """Straight-through vector quantization of `z_e` along `channel_dim` against `codebook` (K, D).

    One fused pass finds the nearest code, gathers it and computes each row's exact squared error;
    the two VQ losses come from that error. No N x K tensor is ever made.

    beta: the commitment loss's weight in `loss`, a number >= 0 or a one-element tensor that needs
    no gradient (e.g. a schedule's buffer; its value is read once per call).

    channel_dim: the axis of z_e that holds the D values of each vector (default -1), the name
    `VectorQuantizer` uses for it. `dim` is its former name, still accepted (deprecated: in
    `VectorQuantizer(num_codes, dim)` `dim` means the code size D, not an axis).

    rotation_trick: z_q's gradient reaches z_e through the rotation and rescaling that maps z_e
    onto its code (Fifty et al. 2024; vqkernels/rotation.py: O(N D), no D x D matrix) instead of
    the straight-through identity. The losses and their gradients are unchanged.
    """
    if not isinstance(rotation_trick, bool):
        raise TypeError(f"rotation_trick must be a bool, got {rotation_trick!r}")
    axis = _channel_axis(channel_dim, dim)
    out = _vq_quantize(z_e, codebook, beta=beta, dim=axis, backend=backend,
                       check_finite=check_finite)[0]
    if rotation_trick and z_e.requires_grad:
        from .rotation import rotate_to
        out = out._replace(z_q=rotate_to(z_e, out.z_q.detach(), axis))
    return out


def _channel_axis_override(channel_dim, dim) -> int | None:
    """A module forward's override of its channel axis (channel_dim=, or the former name dim=), or
    None when neither is given (the module's own channel_dim)."""
    return None if channel_dim is None and dim is None else _channel_axis(channel_dim, dim)


def _channel_axis(channel_dim, dim) -> int:
    """The channel axis from `channel_dim` or its deprecated alias `dim` (not both)."""
    if channel_dim is not None and dim is not None:
        raise TypeError(f"pass the channel axis as channel_dim= (or its former name dim=), not "
                        f"both (got channel_dim={channel_dim!r}, dim={dim!r})")
    if channel_dim is None:
        return -1 if dim is None else dim
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    return channel_dim


def _check_beta(beta) -> float:
    """beta as a Python float: a number, or a one-element real tensor that needs no gradient (a
    schedule's current value; read once, so a CUDA tensor costs one synchronisation)."""
    if isinstance(beta, Tensor):
        if beta.numel() != 1 or beta.dtype == torch.bool or beta.is_complex():
            raise ValueError(f"beta must be a number or a one-element real tensor, got a "
                             f"{beta.dtype} tensor of shape {tuple(beta.shape)}")
        if beta.requires_grad:
            raise ValueError("beta must not require grad: it weights the commitment loss and "
                             "gets no gradient here (pass beta.detach())")
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
            or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return float(beta)


def _vq_quantize(z_e, codebook, *, beta, dim, backend, check_finite=False):
    """vq_quantize, the kernel's per-code counts (int64, K) of this call's rows, and each row's
    exact squared error (no autograd; NaN or inf for a row that is not finite)."""
    dim = _check(z_e, codebook, dim, backend)
    beta = _check_beta(beta)
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
