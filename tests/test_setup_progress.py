"""setup.py says what the build is doing (issue 15): the CUDA compile can take minutes, and pip's
"still running" was all a user saw. The build runs against a stand-in `cmake` on PATH (a script
that writes the cache entry CMakeLists.txt sets and sleeps in place of compiling), so the test
costs a second, not a build."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("pybind11")  # setup.py imports it to find pybind11's CMake files

FAKE_CMAKE = textwrap.dedent("""\
    #!{python}
    import os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    if args[0] == "-S":  # configure: leave the cache entry the real CMakeLists.txt leaves
        build = Path(args[args.index("-B") + 1])
        build.mkdir(parents=True, exist_ok=True)
        cuda = "OFF" if "-DVQK_CUDA=OFF" in args else os.environ["FAKE_CUDA"]
        (build / "CMakeCache.txt").write_text(
            f"VQK_WITH_CUDA_BUILT:INTERNAL={{cuda}}\\n")
        print("-- configured", flush=True)
    else:  # --build: one long, silent compile step
        print("[1/1] Building CUDA object forward_mma.cu.o", flush=True)
        time.sleep(float(os.environ["FAKE_COMPILE_S"]))
    """)


def _build(tmp_path, cuda_env: str, found: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    cmake = bin_dir / "cmake"
    cmake.write_text(FAKE_CMAKE.format(python=sys.executable))
    cmake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VQK_CUDA=cuda_env,
               FAKE_CUDA=found, FAKE_COMPILE_S="1.6", VQK_BUILD_HEARTBEAT_S="0.5")
    env.pop("VQK_NO_NATIVE", None)
    r = subprocess.run([sys.executable, str(ROOT / "setup.py"), "-q", "build_ext",
                        "--build-temp", str(tmp_path / "tmp"), "--build-lib", str(tmp_path / "lib")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return [line for line in r.stdout.splitlines() if line.startswith("vqkernels build:")]


def test_build_says_each_stage_and_that_cuda_is_slow(tmp_path):
    lines = _build(tmp_path, "AUTO", "ON")
    assert lines[0].startswith("vqkernels build: configuring with CMake (VQK_CUDA=AUTO)")
    assert "CUDA kernels" in lines[1] and "VQK_CUDA=OFF" in lines[1], lines
    # A 1.6 s silent compile with a 0.5 s heartbeat: at least two "still compiling" lines.
    beats = [line for line in lines if "still compiling" in line]
    assert len(beats) >= 2, lines
    assert lines[-1].startswith("vqkernels build: built vqkernels._C in "), lines


def test_build_says_why_cuda_is_left_out(tmp_path):
    lines = _build(tmp_path, "OFF", "ON")
    assert lines[1] == "vqkernels build: compiling the CPU kernels only (VQK_CUDA=OFF)", lines
    lines = _build(tmp_path / "no-nvcc", "AUTO", "OFF")
    assert lines[1] == "vqkernels build: compiling the CPU kernels only (no nvcc found)", lines
