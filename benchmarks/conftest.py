"""Shared machinery for the benchmarks: timing on the right device, work rates, peak memory,
and what each case records next to its time (pytest-benchmark's extra_info)."""
from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

import vqkernels


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def versions() -> dict:
    out = {"torch": torch.__version__, "vqkernels": vqkernels.__version__}
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("triton", "faiss-cpu", "vector-quantize-pytorch", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(fn, device: str):
    """Peak memory allocated by `fn` beyond what existed before it (bytes). On CUDA from the
    caching allocator's statistics; on CPU by replaying torch's allocation events from the profiler
    (memory allocated outside torch, e.g. inside FAISS, is not seen)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0),
                    key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


@pytest.fixture
def run_case(benchmark):
    """run_case(fn, device=..., N=, K=, D=, dtype=, impl=, mode=, measure_memory=True): times fn
    with warm-up and device synchronisation, and records the work rate and peak memory."""

    def go(fn, *, device, N, K, D, dtype, impl, mode, measure_memory=True, rounds=None):
        def timed():
            out = fn()
            sync(device)
            return out

        timed()  # warm-up: compilation, autotuning, caches
        flop = 2.0 * N * K * D
        expected_s = None
        if rounds is None:
            import time
            t0 = time.perf_counter()
            timed()
            expected_s = time.perf_counter() - t0
            rounds = max(3, min(50, int(1.0 / max(expected_s, 1e-6))))
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        med = benchmark.stats.stats.median
        info = benchmark.extra_info
        info.update(impl=impl, mode=mode, device=device, machine=device_name(device),
                    dtype=str(dtype).replace("torch.", ""), N=N, K=K, D=D,
                    search_gflop=flop / 1e9, gflops=flop / med / 1e9,
                    date=datetime.date.today().isoformat(), versions=versions())
        # None: not measured (memory allocated outside torch's allocators is invisible here).
        info["peak_extra_mb"] = (peak_extra_bytes(fn, device) / 2**20) if measure_memory else None
        return info

    return go
