"""Loads the compiled module vqkernels._C lazily, and says exactly why when it can't."""
from __future__ import annotations

import functools
import importlib
import os
import re
from types import ModuleType
from typing import Optional

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

BUILD_HINT = ("reinstall with `pip install -e .` on a machine with a C++17 compiler "
              "(and nvcc on PATH for the CUDA kernels); see README 'Build switches'")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], str]:
    try:
        mod = importlib.import_module("vqkernels._C")
    except ImportError as exc:  # not built, or built for another Python
        return None, f"the native module vqkernels._C could not be imported ({exc}); {BUILD_HINT}"
    set_cpu_pool(os.environ.get("VQK_CPU_POOL", ""), mod)
    return mod, ""


POOLS = ("auto", "openmp", "own")
_OPENMP_NAME = re.compile(r"lib(gomp|iomp5|omp)([-.][-\w.]*)?\.so([.\d]*)$")


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process (Linux, /proc/self/maps; [] elsewhere): the
    one torch's parallel ops run on, once torch is imported."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in maps:
        parts = line.split(None, 5)
        path = parts[5].strip() if len(parts) == 6 else ""
        if path.startswith("/") and _OPENMP_NAME.match(os.path.basename(path)) and \
                path not in found:
            found.append(path)
    return found


def set_cpu_pool(choice: str = "auto", mod: Optional[ModuleType] = None) -> str:
    """Which threads run the native CPU kernels (also set by VQK_CPU_POOL at import):
      auto   torch's OpenMP threads when torch runs its ops on OpenMP and exactly one OpenMP
             runtime is loaded (else the module's own pool), falling back to the own pool for a
             while after a call whose OpenMP team came late (other processes holding the cores:
             an OpenMP region waits for every thread of its team, the own pool does not) -- the
             default;
      openmp torch's OpenMP threads always, or a RuntimeError saying why not;
      own    the module's own thread pool.
    Why: after each parallel torch op, torch's OpenMP workers spin for milliseconds (libgomp's
    default wait policy) and hold the other cores, so a kernel that follows a torch op (every
    quantizer call in a training step) waits for them on its own pool, and runs on them at once
    on theirs (benchmarks/bench_after_torch_op.py). Returns the pool now in use: "own" or
    "openmp:<path>"."""
    raw = choice
    choice = (choice or "auto").strip().lower()
    if choice not in POOLS:
        raise ValueError(f"VQK_CPU_POOL must be one of {'/'.join(POOLS)}, got {raw!r}")
    mod = mod if mod is not None else module()
    if not hasattr(mod, "cpu_use_openmp"):
        if choice == "openmp":
            raise RuntimeError(f"VQK_CPU_POOL=openmp: this build of vqkernels._C cannot use "
                               f"OpenMP threads; {BUILD_HINT}")
        return "own"
    mod.cpu_use_openmp("")
    if choice == "own":
        return "own"
    why = None
    runtimes = openmp_runtimes()
    if "OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1][:40]:
        why = "torch's parallel backend is not OpenMP"
    elif len(runtimes) != 1:
        why = (f"{len(runtimes)} OpenMP runtimes are loaded ({', '.join(runtimes) or 'none'}); "
               f"which one torch uses is unknown")
    elif not mod.cpu_use_openmp(runtimes[0], choice == "auto"):
        why = f"{runtimes[0]} has no GOMP_parallel"
    if why and choice == "openmp":
        raise RuntimeError(f"VQK_CPU_POOL=openmp: {why}")
    return "own" if why else "openmp:" + runtimes[0]


def cpu_pool() -> str:
    """The threads the native CPU kernels run on now: "own", "own (falling back)" (auto, for a
    while after a late OpenMP team) or "openmp:<path>" (set_cpu_pool)."""
    p = module().cpu_pool() if hasattr(module(), "cpu_pool") else "own"
    return p if p.startswith("own") else "openmp:" + p


def module() -> ModuleType:
    """The native module; raises RuntimeError saying why if it is missing."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    return mod


# A fresh CPU output of at least this many bytes is advised onto transparent huge pages before a
# kernel writes it (see fresh_output).
HUGEPAGE_MIN_BYTES = 4 << 20


def _hugepages_on() -> bool:
    from ._env import flag
    return flag("VQK_HUGEPAGES", True)


def fresh_output(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`t`, a CPU tensor just allocated for a kernel to write in full, after asking Linux to back
    its memory with 2 MiB pages on first touch (csrc/bindings.cpp, advise_hugepages): 512 times
    fewer page faults for a large z_q or gradient. Measured on this project's 2-vCPU VM (THP mode
    "madvise"): allocating and writing 64 MiB 32 ms -> 6 ms. Small tensors, non-CPU tensors, a
    missing native module and VQK_HUGEPAGES=0 leave it as it is; the values are never touched."""
    if t is None or t.device.type != "cpu":
        return t
    st = t.untyped_storage()
    if st.nbytes() < HUGEPAGE_MIN_BYTES or not _hugepages_on():
        return t
    mod = _load()[0]
    if mod is not None and hasattr(mod, "advise_hugepages"):
        mod.advise_hugepages(st.data_ptr(), st.nbytes())
    return t


def cpu_status() -> Optional[str]:
    """None if the native CPU kernels can run, else the reason they can't."""
    return _load()[1] or None


def cuda_status() -> Optional[str]:
    """None if the native CUDA kernels can run here, else the reason they can't."""
    mod, why = _load()
    if mod is None:
        return why
    if not getattr(mod, "has_cuda", False):
        return ("vqkernels._C was built without CUDA (no nvcc found at build time, or VQK_CUDA=OFF); "
                "rebuild with nvcc on PATH")
    if not torch.cuda.is_available():
        return "built with CUDA, but torch sees no CUDA device here"
    return None


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


# The CPU kernel's instruction-set paths, in the order `auto` tries them (csrc/cpu/vq_cpu.cpp,
# select_kernels); avx2_i8 (an int8 tier in front of the int16 pass avx2_i16) is picked by itself
# only on AMD family 25 without AVX-512 (Zen 3), where it was measured faster than avx2_i16 and
# avx2 (benchmarks/results/cpu-avx2-i8.md); avx512_vnni_i8 (an int8 vpdpbusd tier in front of
# avx512_vnni_i16; residual calls run avx512_vnni_i16) from D = 32 on Intel AVX-512 VNNI CPUs
# without BF16, where it was measured faster on Ice Lake (benchmarks/results/
# cpu-icelake-int8-2026-12-03.md); avx2_i16, avx512_i16 and neon_dot (aarch64 int8 SDOT pass,
# never timed on a CPU that runs it) only when forced.
CPU_PATHS = ("avx512bf16", "avx512", "avx512_i16", "avx512_vnni_i16", "avx512_vnni_i8", "avx2",
             "avx2_i16", "avx2_i8", "neon", "neon_dot", "scalar")
AUTO_RULE = ("auto takes the first of avx512_vnni_i8 (AVX-512 VNNI without AVX-512 BF16 and not "
             "AMD = Intel Cascade Lake to Ice Lake; for K >= 32 and D >= 32), avx512_vnni_i16 "
             "(Zen 4 = AMD family 25 with AVX-512, or those Intel CPUs; for K >= 32 and D >= 8), "
             "avx512bf16 (for K >= 128 and D >= 16), avx512, avx2_i8 (AMD family 25 without "
             "AVX-512 = Zen 3 only, for K >= 64 and D >= 16), avx2, neon, scalar that this CPU and "
             "build run; avx2_i16, avx512_i16 and neon_dot only when forced")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((l.split(":", 1)[1].strip() for l in lines
                  if l.startswith(("model name", "Model", "CPU part"))), platform.machine())
    # x86: the family and model numbers too (auto's rules name AMD family 25; a VM's model name is
    # often just "AMD EPYC").
    field = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in lines[:30] if ":" in l}
    if field.get("cpu family") and field.get("model"):
        model = f"{model} (family {field['cpu family']} model {field['model']})"
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith(("flags", "Features"))), [])
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
            "avx512_vnni", "avx_vnni", "asimd", "asimddp", "bf16", "sve")
    return model, [f for f in flags if f in keep]


def cpu_path_report() -> list[str]:
    """Which CPU kernel path calls get here and why, and which forced paths this machine runs."""
    why = cpu_status()
    if why is not None:
        return [f"CPU kernel: not available ({why})"]
    import os
    mod = module()
    model, flags = _cpu_model_and_flags()
    env = os.environ.get("VQK_CPU_ISA", "")
    chosen = mod.cpu_isa()
    if env and env != "auto":
        reason = f"forced by VQK_CPU_ISA={env}"
    else:
        reason = AUTO_RULE + " (VQK_CPU_ISA=<path> forces one)"
    runs = []
    for isa in CPU_PATHS:
        os.environ["VQK_CPU_ISA"] = isa
        try:
            if mod.cpu_isa() == isa:
                runs.append(isa)
        except (RuntimeError, ValueError):
            pass
        finally:
            if env:
                os.environ["VQK_CPU_ISA"] = env
            else:
                del os.environ["VQK_CPU_ISA"]
    return [f"CPU: {model} (flags: {' '.join(flags) or 'none of the SIMD ones'})",
            f"CPU kernel path: {chosen} -- {reason}",
            f"CPU kernel paths this machine can run: {', '.join(runs)}"]
