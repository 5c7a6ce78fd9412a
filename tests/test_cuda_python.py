"""The Python side of the CUDA backend, on a machine without a GPU: why it is unavailable, the
"auto" fallback, the workspace-size bindings and argument checks of vqkernels._C, the CUDA error
path, and how pointers, strides, the stream and the workspace reach the native calls."""
from __future__ import annotations

import contextlib

import pytest
import torch

import vqkernels
from vqkernels import backends, native, reference
from helpers import make_inputs

HAS_CUDA_BUILD = native.cuda_status() is None or (
    native.cpu_status() is None and getattr(native.module(), "has_cuda", False))
needs_cuda_build = pytest.mark.skipif(not HAS_CUDA_BUILD,
                                      reason="vqkernels._C was built without the CUDA kernels")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


# ---------------------------------------------------------------------------- availability
@no_gpu
def test_unavailable_cuda_backend_says_why_and_refuses():
    st = vqkernels.available_backends()["cuda"]
    assert not st.available and st.devices == ()
    z, cb = make_inputs(5, 3, 4)
    with pytest.raises(RuntimeError) as err:
        vqkernels.vq_quantize(z, cb, backend="cuda")
    assert st.detail in str(err.value)  # the same reason, word for word


@pytest.mark.parametrize("load,want", [
    ((None, "the native module vqkernels._C could not be imported (boom)"), "could not be imported"),
    ((type("M", (), {"has_cuda": False})(), ""), "built without CUDA"),
    ((type("M", (), {"has_cuda": True})(), ""), None),
])
def test_cuda_status_reasons(monkeypatch, load, want):
    monkeypatch.setattr(native, "_load", lambda: load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    why = native.cuda_status()
    if want is None:  # built with CUDA, but no device
        assert "no CUDA device" in why
    else:
        assert want in why


def _with_status(monkeypatch, **available):
    for name, ok in available.items():
        b = backends.REGISTRY[name]
        monkeypatch.setitem(backends.REGISTRY, name,
                            b._replace(status=(lambda: None) if ok else (lambda: "switched off")))


@pytest.mark.parametrize("triton,cuda,want", [
    (True, True, "triton"), (False, True, "cuda"), (False, False, "reference")])
def test_auto_order_on_cuda_tensors(monkeypatch, triton, cuda, want):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _with_status(monkeypatch, triton=triton, cuda=cuda)
    assert backends.resolve("auto", torch.device("cuda")).name == want


def test_auto_on_cpu_tensors_never_picks_cuda(monkeypatch):
    _with_status(monkeypatch, cuda=True)
    z, cb = make_inputs(40, 9, 5)
    b = backends.resolve("auto", z.device)
    assert b.name in ("cpu", "reference")
    out = vqkernels.vq_quantize(z, cb, backend="auto")
    assert torch.equal(out.indices, reference.forward(z, cb)[1])
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        backends.resolve("cuda", z.device)


def test_deterministic_switches(monkeypatch):
    monkeypatch.delenv("VQK_DETERMINISTIC", raising=False)
    assert not backends.deterministic()
    monkeypatch.setenv("VQK_DETERMINISTIC", "0")
    assert not backends.deterministic()
    monkeypatch.setenv("VQK_DETERMINISTIC", "1")
    assert backends.deterministic()
    monkeypatch.delenv("VQK_DETERMINISTIC")
    torch.use_deterministic_algorithms(True)
    try:
        assert backends.deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------- the bindings
F32, F64, F16, BF16 = (native.dtype_code(t) for t in
                       (torch.float32, torch.float64, torch.float16, torch.bfloat16))


@needs_cuda_build
def test_forward_workspace_sizes():
    ws = native.module().cuda_forward_workspace_bytes
    for code, acc, size in ((F32, 4, 4), (F64, 8, 8), (F16, 4, 2), (BF16, 4, 2)):
        K, D = 3000, 64
        big = ws(code, 1 << 22, K, D, 0)
        assert big >= K * acc  # the codebook norms, once per call
        assert ws(code, 1 << 23, K, D, 0) == big  # many rows: nothing per row
        assert ws(code, 1 << 20, 2 * K, D, 0) > big  # grows with K
        assert ws(code, 100, K, D, 0) > big  # few rows: the codebook is split, candidates kept
        assert ws(code, 0, K, D, 0) == 0
        # rows that are not whole 16-byte vectors, or a codebook off a 16-byte boundary: a padded copy
        odd = 16 // size + 1
        assert ws(code, 1 << 22, K, odd, 0) - ws(code, 1 << 22, K, odd - 1, 0) >= K * odd * size
        assert ws(code, 1 << 22, K, D, 8) - big >= K * D * size


@needs_cuda_build
@pytest.mark.parametrize("args,match", [
    ((F32, 10, 0, 4, 0), "K must be positive"),
    ((F32, 10, -3, 4, 0), "K must be positive"),
    ((F32, 10, (1 << 30) + 1, 4, 0), "2\\^30"),
    ((F32, -1, 5, 4, 0), "N must be non-negative"),
    ((F32, 10, 5, 0, 0), "D must be positive"),
    ((9, 10, 5, 4, 0), "unknown dtype"),
])
def test_forward_workspace_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        native.module().cuda_forward_workspace_bytes(*args)


@needs_cuda_build
def test_backward_workspace_sizes():
    ws = native.module().cuda_backward_workspace_bytes
    assert ws(F32, 1000, 10, 8, False) == 0  # atomics need no workspace
    assert ws(F32, 0, 10, 8, True) == 0
    with pytest.raises(ValueError, match="K must be positive"):
        ws(F32, 10, 0, 8, True)
    if not torch.cuda.is_available():
        # The sort's storage is asked of the device: without one, CUDA's own message comes back.
        with pytest.raises(RuntimeError, match="vqkernels CUDA error in cub::DeviceRadixSort"):
            ws(F32, 1000, 10, 8, True)


@needs_cuda_build
@no_gpu
def test_cuda_errors_reach_python_with_cudas_message():
    mod = native.module()
    x = (1 << 20, 1, 10, 4, 0, 4, 1)  # device pointers are never touched on the host
    with pytest.raises(RuntimeError, match="vqkernels CUDA error in cudaMemsetAsync\\(counts\\): cuda"):
        mod.cuda_forward(F32, x, 1 << 21, 5, (0,) * 7, 1 << 22, 1 << 23, 1 << 24, 1 << 25,
                         1 << 20, 0)
    with pytest.raises(RuntimeError, match="vqkernels CUDA error in .*: cuda"):
        mod.cuda_backward(F32, x, 1 << 21, 5, 1 << 22, (0,) * 7, 0, 0, (0,) * 7, 1 << 23, 0, 0,
                          False, 0)
    with pytest.raises(ValueError, match="workspace"):  # checked before any CUDA call is made
        mod.cuda_forward(F32, x, 1 << 21, 5, (0,) * 7, 1 << 22, 1 << 23, 0, 0, 0, 0)


# ---------------------------------------------------------------------------- the plumbing
class _ToCpu:
    """A stand-in for vqkernels._C whose CUDA entry points check what they are handed, then run
    the CPU kernel on it (CPU tensors): wrong pointers or strides would give wrong results."""

    def __init__(self, real, stream):
        self.real, self.stream, self.calls = real, stream, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def cuda_forward_workspace_bytes(self, *a):
        return 4096 + a[2]  # any size: the test checks it is the size allocated and passed

    def cuda_backward_workspace_bytes(self, dtype, N, K, D, det):
        return 1000 + N if det else 0

    def cuda_forward(self, *a):
        *args, ws, nbytes, stream = a
        assert stream == self.stream and nbytes == 4096 + args[3] and ws != 0
        self.calls.append(("forward", nbytes))
        backends._cpu_fwd(*args, "cpu")

    def cuda_backward(self, *a):
        *args, ws, nbytes, det, stream = a
        N = args[1][1] * args[1][2]
        assert stream == self.stream and nbytes == (1000 + N if det else 0)
        assert (ws != 0) == (nbytes > 0)
        self.calls.append(("backward", det))
        backends._cpu_bwd(*args, "cpu")


@pytest.mark.skipif(native.cpu_status() is not None, reason="needs the native CPU kernels")
@pytest.mark.parametrize("det", [False, True])
def test_pointers_strides_stream_and_workspace_reach_the_native_calls(monkeypatch, det):
    fake = _ToCpu(native.module(), stream=0xC0FFEE)
    monkeypatch.setattr(native, "module", lambda: fake)
    monkeypatch.setattr(backends, "_cuda_device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(backends, "_cuda_stream", lambda d: 0xC0FFEE)
    monkeypatch.setitem(backends.REGISTRY, "cuda", backends.REGISTRY["cuda"]._replace(
        devices=("cpu",), status=lambda: None))
    monkeypatch.setenv("VQK_DETERMINISTIC", "1" if det else "0")
    B, D, H, W, K = 2, 5, 3, 4, 9
    z = torch.randn(B, D, H, W, requires_grad=True)  # channel-first: strided rows, no copy
    cb = torch.randn(K, D, requires_grad=True)
    out = vqkernels.vq_quantize(z, cb, dim=1, backend="cuda")
    g = torch.randn(B, H, W, D).permute(0, 3, 1, 2)  # an upstream grad in another layout
    ((out.z_q * g).sum() + out.loss).backward()
    zr, cbr = z.detach().clone().requires_grad_(), cb.detach().clone().requires_grad_()
    ref = vqkernels.vq_quantize(zr, cbr, dim=1, backend="reference")
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.z_q, ref.z_q)
    ((ref.z_q * g).sum() + ref.loss).backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.grad, cbr.grad, rtol=1e-5, atol=1e-6)
    assert [c[0] for c in fake.calls] == ["forward", "backward"]
    assert fake.calls[1][1] is det
