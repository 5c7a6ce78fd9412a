"""Loads the compiled module vqkernels._C lazily, and says exactly why when it can't."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

BUILD_HINT = ("reinstall with `pip install -e .` on a machine with a C++17 compiler "
              "(and nvcc on PATH for the CUDA kernels); see README 'Build switches'")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], str]:
    try:
        return importlib.import_module("vqkernels._C"), ""
    except ImportError as exc:  # not built, or built for another Python
        return None, f"the native module vqkernels._C could not be imported ({exc}); {BUILD_HINT}"


def module() -> ModuleType:
    """The native module; raises RuntimeError saying why if it is missing."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    return mod


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
