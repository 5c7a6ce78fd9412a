"""Build vqkernels._C with CMake (Ninja) and pybind11.

The native module includes no torch header and links no libtorch, so the build needs no torch and
works in pip's isolated build environment. Switches (environment variables, read at build time):

  VQK_NO_NATIVE=1           skip the native module entirely (pure Python: reference + triton)
  VQK_CUDA=AUTO|ON|OFF      CUDA kernels when nvcc is found (AUTO, default), required, or never
  VQK_CUDA_ARCHS="80;86;89;90"   compute capabilities to build real code for (PTX for the last)
  VQK_BUILD_TYPE=Release    CMake build type
  CMAKE_BUILD_PARALLEL_LEVEL     parallel compile jobs (default: all cores)
"""
import os
import shutil
import subprocess
import sys
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
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir)], check=True, env=env)


ext_modules = [] if os.environ.get("VQK_NO_NATIVE") == "1" else [CMakeExtension("vqkernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
