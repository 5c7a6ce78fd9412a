#!/usr/bin/env bash
# The one-command GPU check, for a machine with a CUDA GPU and no network:
#   bash benchmarks/gpu_check.sh OUTDIR
# Builds the package (--no-build-isolation: torch, triton, nvcc, cmake, ninja, pybind11, pytest and
# pytest-benchmark must already be installed), runs the whole test suite on cuda for every backend,
# compute-sanitizer memcheck and racecheck on the CUDA and Triton kernels, and the benchmarks; writes
# logs, a results table (results.md, results.png) and an environment summary into OUTDIR.
# Wheels placed in .whl/ beside the checkout (e.g. vector-quantize-pytorch and its pure-Python
# dependencies) are installed first into a private target directory. Budget: about 10 minutes.
# VQK_GPU_STEPS="build tests" (any of: build backends tests sanitizer bench report static) runs a
# subset, so a machine that limits each command's time can take the check in pieces into one
# OUTDIR. "static" (not in the default set: CPU only, minutes) writes the static report of the
# kernels (registers, CTAs/SM, hot-loop SASS facts; docs/gpu-performance-model.md) beside the
# measurements. Tuned autotune configs are kept in OUTDIR/autotune (vqkernels/triton/tuning.py):
# the tests and benchmarks warm them up, and the file records what this GPU picked.
set -uo pipefail
steps=" ${VQK_GPU_STEPS:-build backends tests sanitizer bench report} "
want() { [[ "$steps" == *" $1 "* ]]; }
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
status=0
step() {  # step NAME TIMEOUT_S CMD...: run, log to OUTDIR/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/steps.txt"
  tail -3 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vqk-site .whl/*.whl
  export PYTHONPATH=/tmp/vqk-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1
} >"$out/env.txt"
cat "$out/env.txt"

export VQK_CUDA=ON VQK_CUDA_ARCHS="${VQK_CUDA_ARCHS:-80;90}"
export VQK_AUTOTUNE_CACHE="${VQK_AUTOTUNE_CACHE:-$out/autotune}"
want build && step build 300 python3 setup.py build_ext --inplace
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
want backends && step backends 60 python3 -c "import vqkernels, pprint; pprint.pprint(vqkernels.available_backends())"
# No -x: on a GPU lent now and then, every failure is worth seeing at once.
want tests && step tests 420 python3 -m pytest tests -q -p no:cacheprovider -rfEs \
  --junitxml="$out/tests.xml"
if ! want sanitizer; then
  :
elif command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" 240 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      python3 benchmarks/sanitize_workload.py
  done
else
  echo "compute-sanitizer not found" | tee -a "$out/steps.txt"; status=1
fi
want bench && step bench 600 python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$out/bench.json"
want static && step static-triton 900 python3 -m vqkernels.triton.aot
want static && step static-cuda 600 python3 -m vqkernels.triton.aot --cuda
want report && step report 60 python3 benchmarks/report.py "$out/bench.json" --out "$out/results" \
  --cmd "bash benchmarks/gpu_check.sh OUTDIR"
echo "overall status: $status" | tee -a "$out/steps.txt"
exit $status
