#!/usr/bin/env bash
# The native CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: builds
# vqkernels._C with -fsanitize=address,undefined (CPU only, VQK_CUDA=OFF) into its own directory,
# next to a copy of the Python package, and runs a sample of the kernel tests against it with the
# ASan runtime preloaded (python itself is not instrumented). Any report fails the run. The
# regular build in vqkernels/ is not touched.
#
#   bash .ci/sanitize.sh [pytest args...]     (default: the CPU kernel, exactness, fuzz, thread-pool and
#                                              residual/grouped tests;
#                                              paths relative to the package copy: use $PWD/...)
#
# Needs a C++ compiler with the sanitizer runtimes (gcc or clang), cmake, ninja or make, and the
# test extras installed in the active Python (pip install -e ".[test]"). About 3-4 minutes on 2
# cores. VQK_SAN_BUILD sets the build directory (default build/sanitize).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
B=${VQK_SAN_BUILD:-$ROOT/build/sanitize}
PKG=$B/pkg
CXX=${CXX:-c++}
PY=${PYTHON:-python}

libasan=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
  echo "sanitize: $CXX has no ASan runtime (libasan.so); install it (gcc: libasan) or set CXX" >&2
  exit 2
fi

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
# Search builds this CPU cannot run are left out: their tests would be skipped anyway, and
# sanitized AVX-512 files take minutes to compile.
isa=()
grep -qw avx512f /proc/cpuinfo 2>/dev/null || isa+=(-DVQK_CXX_AVX512=OFF -DVQK_CXX_AVX512BF16=OFF)
grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null || isa+=(-DVQK_CXX_AVX512BF16=OFF)
echo "sanitize: building _C with -fsanitize=address,undefined in $B (log: $B/build.log)"
mkdir -p "$B"
if ! { cmake -S "$ROOT" -B "$B/cmake" "${gen[@]}" "${isa[@]}" \
  -DCMAKE_BUILD_TYPE=Debug -DVQK_CXX_OPT=-O1 -DVQK_CUDA=OFF \
  -DCMAKE_CXX_COMPILER="$CXX" \
  -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PKG/vqkernels" \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" &&
  cmake --build "$B/cmake" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"; } >"$B/build.log" 2>&1
then
  tail -40 "$B/build.log" >&2
  echo "sanitize: the build failed (see $B/build.log)" >&2
  exit 2
fi

# The Python sources beside the sanitized module (never the regular build's _C).
mkdir -p "$PKG/vqkernels"
(cd vqkernels && find . -name '*.py' -print0 | xargs -0 -I{} cp --parents {} "$PKG/vqkernels/")

export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
# libstdc++ with it: python does not link it, and ASan must find __cxa_throw at start-up to
# intercept the exceptions the module throws (else "CHECK failed ... real___cxa_throw").
libstdcxx=$("$CXX" -print-file-name=libstdc++.so)
export LD_PRELOAD="$libasan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}"
# Python and torch keep memory until exit by design: leak reports would be noise. Errors abort.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# Run from the package copy: the working directory comes first on sys.path, so `vqkernels` is
# the copy beside the sanitized module, not the checkout's. The tests must import this module,
# or the run proves nothing.
cd "$PKG"
"$PY" - "$PKG" <<'PY'
import sys
import vqkernels._C as C
assert C.__file__.startswith(sys.argv[1]), f"imported {C.__file__}, not the sanitized build"
print("sanitize: testing", C.__file__)
PY

if [ $# -eq 0 ]; then
  set -- "$ROOT/tests/test_cpu_kernel.py" "$ROOT/tests/test_exact.py" "$ROOT/tests/test_fuzz.py" \
    "$ROOT/tests/test_cpu_pool.py" "$ROOT/tests/test_residual.py" \
    "$ROOT/tests/test_multi_quantizers.py::test_native_residual_stats_are_index_add_on_each_residual" \
    "$ROOT/tests/test_multi_quantizers.py::test_native_residual_stats_restart_candidates_are_each_stages_rows" \
    "$ROOT/tests/test_multi_quantizers.py::test_native_grouped_stats_are_index_add_on_each_groups_columns" \
    "$ROOT/tests/test_multi_quantizers.py::test_native_training_statistics_are_the_stage_loops" \
    "$ROOT/tests/test_multi_quantizers.py::test_native_grouped_training_statistics_are_the_group_loops" \
    -q -x -p no:cacheprovider
fi
# --capture=sys: pytest captures at the Python level only, so a sanitizer report, written by the
# runtime to file descriptor 2 just before it ends the process, reaches the log. (With pytest's
# default descriptor-level capture it died unprinted: a UBSan report in CI left only "rc=1".)
"$PY" -m pytest --capture=sys "$@"
