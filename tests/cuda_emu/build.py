"""Build vqkernels' CUDA sources against the CPU emulator (cuda_emu.h) into a Python module.

The module is csrc/bindings.cpp compiled with VQK_WITH_CUDA, so it has the very entry points of
vqkernels._C (cuda_forward, cuda_backward, cuda_*_workspace_bytes) and the same argument
handling; only the kernels run on the CPU. Builds are cached by a hash of the sources and flags.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CUDA_SOURCES = ["vq_cuda.cu", "forward_simt.cu", "forward_mma.cu", "backward.cu"]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _flags() -> list[str]:
    import pybind11
    return ["-std=c++17", "-O1", "-fPIC", "-g0", f"-I{ROOT / 'csrc' / 'include'}",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            "-DVQK_WITH_CUDA", '-DVQK_CUDA_ARCHS_STR="emulated"']


def _units():
    emu = ["-x", "c++", "-DVQK_CUDA_EMULATE", "-include", str(HERE / "cuda_emu.h")]
    units = [(ROOT / "csrc" / "cuda" / f, emu) for f in CUDA_SOURCES]
    units += [(ROOT / "csrc" / "bindings.cpp", []), (HERE / "cpu_stubs.cpp", [])]
    return units


def _key(cxx: str) -> str:
    h = hashlib.sha256(cxx.encode())
    deps = sorted((ROOT / "csrc" / "cuda").glob("*")) + sorted((ROOT / "csrc" / "include").rglob("*"))
    deps += [ROOT / "csrc" / "bindings.cpp", HERE / "cuda_emu.h", HERE / "cpu_stubs.cpp"]
    for path in deps:
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(" ".join(_flags()).encode())
    return h.hexdigest()[:16]


def build() -> Path:
    """Path of the built module (vqk_cuda_emu/_C*.so); raises RuntimeError if it cannot build."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    out = Path(tempfile.gettempdir()) / "vqk-cuda-emu" / _key(cxx)
    lib = out / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent if out.parent.exists() else None))
    flags = _flags()

    def compile_one(unit):
        src, extra = unit
        obj = work / (src.name + ".o")
        r = subprocess.run([cxx, *flags, *extra, "-c", str(src), "-o", str(obj)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"emulator build failed on {src.name}:\n{r.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        objs = list(pool.map(compile_one, _units()))
    tmp = work / lib.name
    r = subprocess.run([cxx, "-shared", "-o", str(tmp), *map(str, objs)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"emulator link failed:\n{r.stderr[-6000:]}")
    out.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, lib)  # atomic: a concurrent build never sees half a file
    shutil.rmtree(work, ignore_errors=True)
    return lib


def load():
    """Build (or reuse) and import the emulated module."""
    lib = build()
    spec = importlib.util.spec_from_file_location("vqk_cuda_emu._C", lib)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    print(build())
