"""One registry of backends: name -> implementation, whether it runs here, and the "auto" choice.

Every backend implements the same two calls on a tensor `z` quantized along `dim`:

  forward(z, dim, codebook, plan, want_zq=True) -> (z_q, indices, sqerr, counts)
      (z_q may be None when not want_zq: the native kernels then never write it)
  backward(z, dim, codebook, indices, grad_zq, g_codebook, g_commit, plan) -> (grad_z, grad_codebook)

with the semantics of `vqkernels.reference` (the oracle they are all tested against).
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import torch

from . import _env, native, reference
from ._layout import NULL_VIEW, RowPlan

BACKEND_NAMES = ("triton", "cuda", "cpu", "reference")
ALL_NAMES = BACKEND_NAMES + ("auto",)


class BackendStatus(NamedTuple):
    available: bool
    devices: tuple[str, ...]  # the tensor devices it serves when available
    detail: str  # where it runs when available, else why it does not run here


class Backend(NamedTuple):
    name: str
    devices: tuple[str, ...]
    status: Callable[[], Optional[str]]  # None when usable, else the reason
    forward: Callable
    backward: Callable


# --------------------------------------------------------------------------------------------
# reference: plain torch, any device
def _ref_forward(z, dim, codebook, plan, want_zq=True):
    return reference.forward(z, codebook, dim)


def _ref_backward(z, dim, codebook, indices, grad_zq, g_codebook, g_commit, plan):
    return reference.backward(z, codebook, indices, dim, grad_zq, g_codebook, g_commit)


# --------------------------------------------------------------------------------------------
# native CPU and CUDA: vqkernels._C, fed with pointers, sizes, strides (and the stream)
def _native_forward(run):
    def forward(z, dim, codebook, plan: RowPlan, want_zq=True):
        K = codebook.shape[0]
        cb = codebook.contiguous()
        xv = plan.view(z)
        # The kernel contract makes z_q optional (a null pointer): a search alone allocates and
        # writes none (nearest_code would otherwise need a z-sized buffer it throws away).
        z_q, zqv = plan.empty_like(z) if want_zq else (None, None)
        native.fresh_output(z_q)
        indices = torch.empty(plan.lead, dtype=torch.long, device=z.device)
        sqerr = torch.empty(plan.lead, dtype=reference.acc_dtype(z.dtype), device=z.device)
        counts = torch.empty(K, dtype=torch.long, device=z.device)
        run(native.dtype_code(z.dtype), xv.as_args(), cb.data_ptr(), K,
            zqv.as_args() if zqv is not None else NULL_VIEW,
            indices.data_ptr(), sqerr.data_ptr(), counts.data_ptr(), z.device)
        return z_q, indices, sqerr, counts
    return forward


def _native_backward(run):
    def backward(z, dim, codebook, indices, grad_zq, g_codebook, g_commit, plan: RowPlan):
        acc = reference.acc_dtype(z.dtype)
        cb = codebook.contiguous()
        xv = plan.view(z)
        # Views and copies stay bound to locals until the kernel returns: they own the memory.
        gzqv = plan.view(grad_zq) if grad_zq is not None else None
        idx = indices.contiguous()
        g_cb = g_codebook.to(acc).contiguous() if g_codebook is not None else None
        g_cm = g_commit.to(acc).contiguous() if g_commit is not None else None
        grad_z, gzv = plan.empty_like(z)
        native.fresh_output(grad_z)
        grad_cb = torch.empty(cb.shape, dtype=acc, device=z.device)
        run(native.dtype_code(z.dtype), xv.as_args(), cb.data_ptr(), cb.shape[0],
            idx.data_ptr(), gzqv.as_args() if gzqv is not None else NULL_VIEW,
            g_cb.data_ptr() if g_cb is not None else 0,
            g_cm.data_ptr() if g_cm is not None else 0,
            gzv.as_args(), grad_cb.data_ptr(), z.device)
        return grad_z, grad_cb.to(codebook.dtype)
    return backward


def _cpu_threads() -> int:
    # torch's own setting, so the native kernels never oversubscribe against torch's pool.
    return max(1, torch.get_num_threads())


def _cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _cuda_device(device: torch.device):
    """The context that makes `device` current for the native CUDA calls (a seam tests replace)."""
    return torch.cuda.device(device)


def deterministic() -> bool:
    """Whether backward passes must be bitwise repeatable: VQK_DETERMINISTIC=1 in the environment,
    or torch.use_deterministic_algorithms(True). The CUDA kernels then sum the codebook gradient
    in a fixed order instead of by atomics."""
    return (_env.flag("VQK_DETERMINISTIC", False)
            or torch.are_deterministic_algorithms_enabled())


def _workspace(nbytes: int, device) -> torch.Tensor:
    # Temporary device memory for one native call, from torch's caching allocator on the current
    # stream: freeing it right after the (asynchronous) launch is safe, since the next user of the
    # block is ordered after the kernel on the same stream.
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _cpu_fwd(*a):
    native.module().cpu_forward(*a[:-1], _cpu_threads())


def _cpu_bwd(*a):
    native.module().cpu_backward(*a[:-1], _cpu_threads())


def _cuda_fwd(dtype, xv, cb_ptr, K, *rest):
    device = rest[-1]
    N, D = xv[1] * xv[2], xv[3]
    with _cuda_device(device):
        mod = native.module()
        nbytes = mod.cuda_forward_workspace_bytes(dtype, N, K, D, cb_ptr)
        ws = _workspace(nbytes, device)
        mod.cuda_forward(dtype, xv, cb_ptr, K, *rest[:-1], ws.data_ptr() if nbytes else 0, nbytes,
                         _cuda_stream(device))


def _cuda_bwd(dtype, xv, cb_ptr, K, idx_ptr, gzqv, g_cb_ptr, *rest):
    device = rest[-1]
    N, D = xv[1] * xv[2], xv[3]
    det = bool(g_cb_ptr) and deterministic()  # no codebook term: nothing to sum
    with _cuda_device(device):
        mod = native.module()
        nbytes = mod.cuda_backward_workspace_bytes(dtype, N, K, D, det)
        ws = _workspace(nbytes, device)
        mod.cuda_backward(dtype, xv, cb_ptr, K, idx_ptr, gzqv, g_cb_ptr, *rest[:-1],
                          ws.data_ptr() if nbytes else 0, nbytes, det, _cuda_stream(device))


# --------------------------------------------------------------------------------------------
# triton: vqkernels.triton, imported only when asked for
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton` (Linux)"
    try:
        from .triton import launch  # noqa: F401
    except ImportError as exc:
        return f"vqkernels' Triton kernels could not be loaded ({exc})"
    if not torch.cuda.is_available() and not _triton_interpret():
        return ("no CUDA device here; set TRITON_INTERPRET=1 to run the Triton kernels on CPU "
                "tensors through Triton's interpreter (slow: small shapes only)")
    return None


def _triton_forward(z, dim, codebook, plan, want_zq=True):
    from .triton import launch
    return launch.forward(z, dim, codebook, plan)


def _triton_backward(z, dim, codebook, indices, grad_zq, g_codebook, g_commit, plan):
    from .triton import launch
    return launch.backward(z, dim, codebook, indices, grad_zq, g_codebook, g_commit, plan)


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if _triton_interpret() else ("cuda",)


REGISTRY: dict[str, Backend] = {
    "triton": Backend("triton", ("cuda",), _triton_status, _triton_forward, _triton_backward),
    "cuda": Backend("cuda", ("cuda",), native.cuda_status,
                    _native_forward(_cuda_fwd), _native_backward(_cuda_bwd)),
    "cpu": Backend("cpu", ("cpu",), native.cpu_status,
                   _native_forward(_cpu_fwd), _native_backward(_cpu_bwd)),
    "reference": Backend("reference", ("cpu", "cuda"), lambda: None, _ref_forward, _ref_backward),
}


def _devices(b: Backend) -> tuple[str, ...]:
    return _triton_devices() if b.name == "triton" else b.devices


def available_backends() -> dict[str, BackendStatus]:
    """Which backends run here (and on which devices), and why the others don't."""
    out = {}
    for name, b in REGISTRY.items():
        why = b.status()
        devs = _devices(b)
        out[name] = (BackendStatus(False, (), why) if why else
                     BackendStatus(True, devs, "runs on " + " and ".join(devs) + " tensors"))
    return out


def resolve(name: str, device: torch.device) -> Backend:
    """The backend that runs `name` for tensors on `device`; raises saying why it can't."""
    if name == "auto":
        order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
        for candidate in order:
            b = REGISTRY[candidate]
            if device.type in _devices(b) and b.status() is None:
                return b
        return REGISTRY["reference"]
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {name!r}")
    b = REGISTRY[name]
    why = b.status()
    if why:
        raise RuntimeError(f"backend={name!r} is not available: {why}")
    if device.type not in _devices(b):
        raise ValueError(f"backend={name!r} runs on {' and '.join(_devices(b))} tensors, "
                         f"but the input is on {device}")
    return b
