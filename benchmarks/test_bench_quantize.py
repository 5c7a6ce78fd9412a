"""Forward and forward+backward of every backend that runs here, beside the peers, in one run.

    pytest benchmarks/ --benchmark-only                      # default shape set for this device
    VQK_BENCH_SHAPES=full pytest benchmarks/ --benchmark-only  # the seed's whole 4x4 K x D grid
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json && python benchmarks/report.py out.json

Each case records GFLOP/s of the search (2 N K D per forward), peak extra memory, dtype, backend
and machine in pytest-benchmark's extra_info.
"""
from __future__ import annotations

import os

import pytest
import torch

from peers import PEERS, Unavailable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("VQK_BENCH_SHAPES") == "full"

# The seed's shapes: a batch of 128 8x8 latents (N = 8192) against K, D in {64..512}.
SEED = [(8192, k, d) for k in (64, 128, 256, 512) for d in (64, 128, 256, 512)]
if not FULL:
    SEED = [(8192, 64, 64), (8192, 256, 256), (8192, 512, 64), (8192, 512, 512)]
# The GPU kernel issue's large shapes (bf16): a big codebook, and one where eager runs out of memory.
GPU_SHAPES = [(65536, 16384, 256), (16384, 1 << 18, 64)]

if DEVICE == "cuda":
    CASES = [(s, torch.float32) for s in SEED] + [(s, torch.bfloat16) for s in SEED + GPU_SHAPES]
else:
    # The CPU issue's shapes, with FAISS, are test_bench_cpu.py's; here the seed's shapes.
    CASES = [(s, torch.float32) for s in SEED]

# The float64 reference and eager cdist are far off the pace on big shapes: keep them to small ones.
SLOW_PEERS = {"vqk-reference": 2**31, "torch-cdist": 2**33}


def _inputs(N, K, D, dtype, mode):
    g = torch.Generator(device="cpu").manual_seed(N * 31 + K * 7 + D)
    cb = torch.randn(K, D, generator=g).to(DEVICE, dtype)
    z = (cb[torch.randint(0, K, (N,), generator=g).to(DEVICE)]
         + 0.3 * torch.randn(N, D, generator=g).to(DEVICE, dtype))
    if mode == "fwd+bwd":
        z.requires_grad_(True)
        cb.requires_grad_(True)
    return z, cb


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(PEERS))
@pytest.mark.parametrize("shape,dtype", CASES,
                         ids=[f"{n}x{k}x{d}-{str(t)[6:]}" for (n, k, d), t in CASES])
def test_quantize(run_case, shape, dtype, impl, mode):
    N, K, D = shape
    if N * K * D > SLOW_PEERS.get(impl, float("inf")):
        pytest.skip(f"{impl} is kept to N*K*D <= {SLOW_PEERS[impl]}")
    z, cb = _inputs(N, K, D, dtype, mode)
    try:
        fn = PEERS[impl](z, cb, mode)
    except Unavailable as exc:
        pytest.skip(f"{impl}: {exc}")
    try:
        run_case(fn, device=DEVICE, N=N, K=K, D=D, dtype=dtype, impl=impl, mode=mode,
                 measure_memory=impl != "faiss")  # FAISS allocates outside torch: not measured
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} ran out of memory at {N}x{K}x{D}")


@pytest.mark.parametrize("shape", [(8192, 4096, 256)] if DEVICE == "cpu" else [(16384, 16384, 256)])
def test_bare_matmul(run_case, shape):
    """The machine's GEMM rate at a comparable size: the ceiling the search is compared with."""
    N, K, D = shape
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    a = torch.randn(N, D, device=DEVICE, dtype=dtype)
    b = torch.randn(D, K, device=DEVICE, dtype=dtype)
    run_case(lambda: a @ b, device=DEVICE, N=N, K=K, D=D, dtype=dtype, impl="matmul", mode="fwd",
             measure_memory=False)
