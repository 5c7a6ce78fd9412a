"""Build vqkernels._C with CMake (Ninja) and pybind11.

The native module includes no torch header and links no libtorch, so the build needs no torch and
works in pip's isolated build environment. Switches (environment variables, read at build time):

  VQK_NO_NATIVE=1           skip the native module entirely (pure Python: reference + triton)
  VQK_CUDA=AUTO|ON|OFF      CUDA kernels when nvcc is found (AUTO, default), required, or never
  VQK_CUDA_ARCHS="80;86;89;90"   compute capabilities to build real code for (PTX for the last)
  VQK_BUILD_TYPE=Release    CMake build type
  CMAKE_BUILD_PARALLEL_LEVEL     parallel compile jobs (default: all cores)
  VQK_BUILD_HEARTBEAT_S=30  seconds between "still compiling" lines (0: none)

The build says what it is doing, with elapsed times: configuring, whether the CUDA kernels are
included (they take minutes more; VQK_CUDA=OFF leaves them out), each compile step, a line every
VQK_BUILD_HEARTBEAT_S seconds while one runs, and the total. pip hides a build's output unless
asked: `pip install -v -e .` shows these lines.
"""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('VQK_BUILD_TYPE', 'Release')}",
            f"-DVQK_CUDA={os.environ.get('VQK_CUDA', 'AUTO')}",
        ]
        if os.environ.get("VQK_CUDA_ARCHS"):
            args.append(f"-DVQK_CUDA_ARCHS={os.environ['VQK_CUDA_ARCHS']}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        t0 = time.monotonic()
        say(f"configuring with CMake (VQK_CUDA={os.environ.get('VQK_CUDA', 'AUTO')}) in {build_dir}")
        run_with_heartbeat([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], env, t0,
                           "configuring")
        cuda = _cache_value(build_dir, "VQK_WITH_CUDA_BUILT")
        if cuda == "ON":
            # The slow part, and the one a machine without a GPU may not want: say so up front.
            say("compiling the CPU and CUDA kernels (nvcc found; the CUDA files take a few minutes "
                "on a small machine; VQK_CUDA=OFF builds the CPU kernels only)")
        else:
            off = os.environ.get("VQK_CUDA", "AUTO").upper() == "OFF"
            say(f"compiling the CPU kernels only ({'VQK_CUDA=OFF' if off else 'no nvcc found'})")
        run_with_heartbeat([cmake, "--build", str(build_dir)], env, t0, "compiling")
        say(f"built {ext.name} in {time.monotonic() - t0:.0f} s")


def say(msg: str) -> None:
    print(f"vqkernels build: {msg}", flush=True)


def _cache_value(build_dir: Path, name: str) -> str | None:
    try:
        for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
            if line.startswith(name + ":"):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def run_with_heartbeat(cmd, env, t0: float, what: str) -> None:
    """Run `cmd`, its output passed through, and print a line every VQK_BUILD_HEARTBEAT_S seconds
    while it runs: one CUDA file can take minutes with no output of its own."""
    every = float(os.environ.get("VQK_BUILD_HEARTBEAT_S", "30"))
    done = threading.Event()

    def beat():
        while not done.wait(every):
            say(f"still {what} ({time.monotonic() - t0:.0f} s so far)")

    ticker = threading.Thread(target=beat, daemon=True) if every > 0 else None
    if ticker:
        ticker.start()
    try:
        subprocess.run(cmd, check=True, env=env)
    finally:
        done.set()
        if ticker:
            ticker.join()


ext_modules = [] if os.environ.get("VQK_NO_NATIVE") == "1" else [CMakeExtension("vqkernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
