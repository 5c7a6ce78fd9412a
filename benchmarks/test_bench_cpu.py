"""The CPU kernel issue's comparison: forward, float32, peers in one run.

    pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-json=cpu.json
    python benchmarks/cpu_table.py cpu.json > benchmarks/results/cpu.md
    VQK_BENCH_THREADS=1 pytest benchmarks/test_bench_cpu.py --benchmark-only ...   # one thread each

Every implementation runs with torch's thread count (VQK_BENCH_THREADS sets it for the run): FAISS
gets as many OpenMP threads, vqk-cpu uses torch.get_num_threads(). On a busy machine, compare the
one-thread run: spin-waiting thread teams (OpenMP in FAISS and torch) collapse when another process
holds a core, which says more about the neighbour than about the kernels.

At each N x K x D of the issue, beside each other:
  faiss          faiss.IndexFlatL2(D).search(z, 1) with as many OpenMP threads as torch has
                 (indices and distances only: no gather, no losses)
  torch-eager    ||e||^2 - 2 z.e^T, argmin, gather (an N x K matrix)
  vqk-cpu        vqkernels.vq_quantize(backend="cpu"): search, gather, exact errors, both losses,
                 perplexity, straight-through output (the whole job)
  vqk-cpu-search vqkernels.nearest_code(backend="cpu"): indices and exact squared distances, the
                 same outputs as FAISS
  matmul         torch.mm of the same (N x D) @ (D x K) in fp32: this machine's sgemm rate at the
                 size of the search, its practical ceiling
Each records GFLOP/s (2 N K D / median time) and peak memory: torch's allocations during one call
(`peak_extra_mb`, from the profiler) and the growth of the process's resident set during one call
(`peak_rss_extra_mb`, which also sees what FAISS and the native kernel allocate outside torch).
"""
from __future__ import annotations

import os

import pytest
import torch

import vqkernels
from vqkernels import native
from peers import Unavailable, make_eager, make_faiss

if os.environ.get("VQK_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["VQK_BENCH_THREADS"]))

CPU_SHAPES = [(8192, 512, 256), (8192, 256, 256), (8192, 64, 64), (32768, 512, 512),
              (65536, 4096, 64)]


def _inputs(N, K, D):
    g = torch.Generator().manual_seed(N * 31 + K * 7 + D)
    cb = torch.randn(K, D, generator=g)
    z = cb[torch.randint(0, K, (N,), generator=g)] + 0.3 * torch.randn(N, D, generator=g)
    return z, cb


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field))


def peak_rss_extra_mb(fn):
    """Growth of the resident set's high-water mark during one call of fn (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM). Memory that the allocator reuses without new pages is not
    seen, so this is a lower bound; None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - base) / 1024
    except (OSError, StopIteration):
        return None


def _vqk(kind):
    def make(z, cb, mode):
        st = vqkernels.available_backends()["cpu"]
        if not st.available:
            raise Unavailable(st.detail)
        if kind == "search":
            return lambda: vqkernels.nearest_code(z, cb, backend="cpu")
        return lambda: vqkernels.vq_quantize(z, cb, backend="cpu")
    return make


IMPLS = {
    "faiss": make_faiss,
    "torch-eager": make_eager,
    "vqk-cpu": _vqk("quantize"),
    "vqk-cpu-search": _vqk("search"),
    "matmul": lambda z, cb, mode: (lambda: torch.mm(z, cb.t())),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=[f"{n}x{k}x{d}" for n, k, d in CPU_SHAPES])
def test_cpu_forward(run_case, shape, impl):
    N, K, D = shape
    z, cb = _inputs(N, K, D)
    try:
        fn = IMPLS[impl](z, cb, "fwd")
    except Unavailable as exc:
        pytest.skip(f"{impl}: {exc}")
    info = run_case(fn, device="cpu", N=N, K=K, D=D, dtype=torch.float32, impl=impl, mode="fwd",
                    measure_memory=impl != "faiss")
    info["peak_rss_extra_mb"] = peak_rss_extra_mb(fn)
    info["torch_threads"] = torch.get_num_threads()
    if impl.startswith("vqk"):
        info["cpu_isa"] = native.module().cpu_isa()
        # The fraction of rows the fast pass could not prove and the exact re-search measured.
        before = native.module().cpu_exact_rows()
        fn()
        info["exact_research_fraction"] = (native.module().cpu_exact_rows() - before) / N
