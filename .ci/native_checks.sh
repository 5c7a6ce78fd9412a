#!/usr/bin/env bash
# The native CPU kernels checked through their C++ API (tests/native/kernel_check.cpp), without
# Python or torch:
#   host     built natively; runs every search build this CPU can execute (x86-64: avx512bf16,
#            avx512, avx512_i16, avx512_vnni_i16, avx512_vnni_i8, avx2, avx2_i16, avx2_i8, scalar;
#            the driver names each one it cannot run, and why);
#   aarch64  cross-compiled with Debian's g++-aarch64-linux-gnu and run under qemu-user: the NEON
#            build (the default there), the int8 dot-product first pass (neon_dot, on qemu's `max`
#            CPU, which has FEAT_DotProd) and the portable one, all required; then once more on a
#            Cortex-A72 model (Armv8.0, no dot product), where auto must stay on neon and neon_dot
#            must be refused by the run-time check. qemu checks behaviour only: NEON speed is not
#            measured by this script.
#   tsan     the host build again with ThreadSanitizer (-fsanitize=thread, -O1 -g; x86-64: only the
#            builds this CPU runs), its driver run quick: the worker pool (revocation of late
#            workers), the 2-thread searches and backward; any report fails. A planted race
#            (tests/native/tsan_canary.cpp) must be reported first, so an inert sanitizer cannot pass.
#   x86-emulated  the AVX-512 builds (EMULATED below) compiled against SIMD Everywhere (Debian's
#            libsimde-dev: the intrinsics in portable C, plus csrc/cpu/simde_avx512.h's shims for
#            those SIMDe 0.7.4 lacks, themselves checked first by tests/native/simde_check.cpp)
#            instead of the CPU's instructions, with no -mavx512 flags, and run on this CPU, which
#            need not have AVX-512: every forward check the driver makes on a real AVX-512 (bf16)
#            CPU. Only this binary's vq_cpu.cpp is built with
#            VQK_EMULATED_AVX512, which lets those builds past the run-time CPU check; the module
#            never is. Emulation checks behaviour (the answers bit for bit), not speed, and it
#            cannot catch a bug in SIMDe itself (or the shims) or in the compiler's real AVX-512
#            code generation: that still needs an AVX-512 machine (the host target there).
# Installs the cross toolchain, qemu and SIMDe with apt-get when they are missing and it can
# (root, or VQK_NO_APT=1 to forbid it).
# Usage: .ci/native_checks.sh [host|aarch64|x86-emulated|tsan|all] (default all).
# Objects go to build/native_checks/<arch>/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
CXXFLAGS=(-std=c++17 -O3 -Wall -Wextra -pthread -Icsrc/include)
COMMON=(csrc/cpu/vq_cpu.cpp csrc/cpu/thread_pool.cpp csrc/cpu/search_scalar.cpp)

# Whether $1 (an object or program) is missing or older than $2, a header, or this script: a
# rerun (the pytest wrapper after CI's own run) recompiles only what changed.
stale() {
  [[ ! -e "$1" || "$2" -nt "$1" || "$0" -nt "$1" ]] && return 0
  local h
  for h in csrc/cpu/*.h csrc/include/vqk/*.h; do [[ "$h" -nt "$1" ]] && return 0; done
  return 1
}

# build <compiler> <outdir> <defines for vq_cpu.cpp> <file>:<flags,comma-separated> ...
# The stale objects compile VQK_NATIVE_JOBS at a time (default: the CPUs there are), then link.
build() {
  local cxx="$1" out="$2" defs="$3"
  shift 3
  mkdir -p "$out"
  local objs=() pids=() failed=0 jobs="${VQK_NATIVE_JOBS:-$(nproc 2>/dev/null || echo 1)}"
  # Runs "$@" in the background, waiting for the oldest job once `jobs` are running.
  spawn() {
    "$@" &
    pids+=($!)
    if ((${#pids[@]} >= jobs)); then
      wait "${pids[0]}" || failed=1
      pids=("${pids[@]:1}")
    fi
  }
  local f
  for f in "${COMMON[@]}"; do
    local extra=()
    [[ "$f" == */vq_cpu.cpp ]] && for d in $defs; do extra+=("-D$d"); done
    local o="$out/$(basename "$f" .cpp).o"
    if stale "$o" "$f"; then spawn "$cxx" "${CXXFLAGS[@]}" "${extra[@]}" -c "$f" -o "$o"; fi
    objs+=("$o")
  done
  local spec
  for spec in "$@"; do
    local file="${spec%%:*}" flags="${spec#*:}"
    local o="$out/$(basename "$file" .cpp).o"
    # shellcheck disable=SC2086
    if stale "$o" "$file"; then spawn "$cxx" "${CXXFLAGS[@]}" ${flags//,/ } -c "$file" -o "$o"; fi
    objs+=("$o")
  done
  local p
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  if ((failed)); then
    echo "native_checks: a compilation for $out failed (above)" >&2
    return 1
  fi
  # Linked again only when something changed (the pytest wrapper reruns this after CI's own run).
  local relink=0 o
  stale "$out/kernel_check" tests/native/kernel_check.cpp && relink=1
  for o in "${objs[@]}"; do [[ "$o" -nt "$out/kernel_check" ]] && relink=1; done
  if ((relink)); then
    "$cxx" "${CXXFLAGS[@]}" -O2 tests/native/kernel_check.cpp "${objs[@]}" -o "$out/kernel_check"
  fi
}

apt_install() {
  if [[ "${VQK_NO_APT:-0}" == 1 ]] || ! command -v apt-get >/dev/null || [[ "$(id -u)" != 0 ]]; then
    echo "missing: $* (install them, e.g. apt-get install -y $*)" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

host() {
  local arch out_dir="${VQK_HOST_OUT:-}"
  arch="$(uname -m)"
  out_dir="${out_dir:-build/native_checks/$arch}"
  echo "== host ($arch): build"
  local t0=$SECONDS
  case "$arch" in
    x86_64|amd64)
      # As CMakeLists.txt: an instruction set the compiler has no flags for is left out (and the
      # driver then reports it as not run).
      local defs="" specs=() def spec def_spec flags
      for def_spec in \
          "VQK_HAVE_AVX2=csrc/cpu/search_avx2.cpp:-mavx2,-mfma,-mf16c" \
          "VQK_HAVE_AVX2=csrc/cpu/search_avx2_small.cpp:-mavx2,-mfma,-mf16c" \
          "VQK_HAVE_AVX2=csrc/cpu/search_avx2_i16.cpp:-mavx2,-mfma,-mf16c" \
          "VQK_HAVE_AVX2=csrc/cpu/search_avx2_i8.cpp:-mavx2,-mfma,-mf16c" \
          "VQK_HAVE_AVX512=csrc/cpu/search_avx512.cpp:-mavx512f,-mavx512bw,-mavx512vl,-mavx512dq,-mfma,-mf16c,-Wno-maybe-uninitialized" \
          "VQK_HAVE_AVX512_I16=csrc/cpu/search_avx512_i16.cpp:-mavx512f,-mavx512bw,-mavx512vl,-mavx512dq,-mfma,-mf16c,-Wno-maybe-uninitialized" \
          "VQK_HAVE_AVX512_VNNI_I16=csrc/cpu/search_avx512_vnni_i16.cpp:-mavx512f,-mavx512bw,-mavx512vl,-mavx512dq,-mavx512vnni,-mfma,-mf16c,-Wno-maybe-uninitialized" \
          "VQK_HAVE_AVX512_VNNI_I8=csrc/cpu/search_avx512_vnni_i8.cpp:-mavx512f,-mavx512bw,-mavx512vl,-mavx512dq,-mavx512vnni,-mfma,-mf16c,-Wno-maybe-uninitialized" \
          "VQK_HAVE_AVX512BF16=csrc/cpu/search_avx512bf16.cpp:-mavx512f,-mavx512bw,-mavx512vl,-mavx512dq,-mavx512bf16,-mfma,-mf16c,-Wno-maybe-uninitialized"; do
        def="${def_spec%%=*}" spec="${def_spec#*=}" flags="${def_spec#*:}"
        # shellcheck disable=SC2086
        if echo "int main(){}" | "${CXX:-g++}" ${flags//,/ } -x c++ -fsyntax-only - 2>/dev/null; then
          defs="$defs $def" specs+=("$spec")
        else
          echo "   ${CXX:-g++} lacks the flags of ${spec%%:*}: left out"
        fi
      done
      build "${CXX:-g++}" "$out_dir" "$defs" "${specs[@]}"
      # What this CPU reports must run (a build the compiler could make but the driver skips is
      # a failure, not a quiet skip).
      local req=scalar flagsline
      flagsline="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
      has() { local f; for f in "$@"; do [[ " $flagsline " == *" $f "* ]] || return 1; done; }
      has avx2 fma f16c && [[ "$defs" == *VQK_HAVE_AVX2* ]] && req="$req,avx2,avx2_i16,avx2_i8"
      has avx512f avx512bw avx512vl avx512dq && [[ "$defs" == *VQK_HAVE_AVX512\ * || "$defs" == *VQK_HAVE_AVX512 ]] && req="$req,avx512"
      has avx512f avx512bw avx512vl avx512dq && [[ "$defs" == *VQK_HAVE_AVX512_I16* ]] && req="$req,avx512_i16"
      has avx512f avx512bw avx512vl avx512dq avx512_vnni && [[ "$defs" == *VQK_HAVE_AVX512_VNNI_I16* ]] && req="$req,avx512_vnni_i16"
      has avx512f avx512bw avx512vl avx512dq avx512_vnni && [[ "$defs" == *VQK_HAVE_AVX512_VNNI_I8* ]] && req="$req,avx512_vnni_i8"
      has avx512f avx512bw avx512vl avx512dq avx512_bf16 && [[ "$defs" == *VQK_HAVE_AVX512BF16* ]] && req="$req,avx512bf16"
      echo "== host: run (built in $((SECONDS - t0)) s; required here: $req)"
      "$out_dir/kernel_check" --require="$req" "${HOST_CHECK_ARGS[@]}" ;;
    aarch64|arm64)
      build "${CXX:-g++}" "$out_dir" "VQK_HAVE_NEON VQK_HAVE_NEON_DOT" \
        "csrc/cpu/search_neon.cpp:" "csrc/cpu/search_neon_dot.cpp:-march=armv8.2-a+dotprod"
      echo "== host: run (built in $((SECONDS - t0)) s)"
      local req=neon,scalar
      grep -qw asimddp /proc/cpuinfo 2>/dev/null && req="$req,neon_dot"
      "$out_dir/kernel_check" --require="$req" --expect-auto=neon "${HOST_CHECK_ARGS[@]}" ;;
    *)
      build "${CXX:-g++}" "$out_dir" ""
      "$out_dir/kernel_check" --require=scalar --expect-auto=scalar "${HOST_CHECK_ARGS[@]}" ;;
  esac
}

aarch64() {
  local need=()
  command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
  command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
  if ((${#need[@]})); then apt_install "${need[@]}"; fi
  echo "== aarch64 (cross-compiled, run under qemu-user): build"
  local t0=$SECONDS
  build aarch64-linux-gnu-g++ build/native_checks/aarch64-cross "VQK_HAVE_NEON VQK_HAVE_NEON_DOT" \
    "csrc/cpu/search_neon.cpp:" "csrc/cpu/search_neon_dot.cpp:-march=armv8.2-a+dotprod"
  echo "== aarch64: run under $(qemu-aarch64 --version | head -1) -cpu max (built in $((SECONDS - t0)) s)"
  echo "   (behaviour only: NEON speed is not measured under qemu)"
  qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu build/native_checks/aarch64-cross/kernel_check \
    --require=neon,neon_dot,scalar --expect-auto=neon "${VQK_NATIVE_CHECK_ARGS[@]}"
  echo "== aarch64: run-time detection on a CPU without the dot product (-cpu cortex-a72)"
  qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu build/native_checks/aarch64-cross/kernel_check \
    --isa=neon_dot,neon --require=neon --expect-skip=neon_dot --expect-auto=neon --detect-only
}

# The builds the x86-emulated target compiles against SIMDe, as <define>=<isa>=<file>: one line
# per build (a new AVX-512 build joins here, and its run-time check in vq_cpu.cpp honours
# avx512_emulated()). The driver runs them in this order, then scalar.
EMULATED=(
  "VQK_HAVE_AVX512BF16=avx512bf16=csrc/cpu/search_avx512bf16.cpp"
  "VQK_HAVE_AVX512=avx512=csrc/cpu/search_avx512.cpp"
  "VQK_HAVE_AVX512_I16=avx512_i16=csrc/cpu/search_avx512_i16.cpp"
  "VQK_HAVE_AVX512_VNNI_I16=avx512_vnni_i16=csrc/cpu/search_avx512_vnni_i16.cpp"
  "VQK_HAVE_AVX512_VNNI_I8=avx512_vnni_i8=csrc/cpu/search_avx512_vnni_i8.cpp"
)

x86_emulated() {
  case "$(uname -m)" in
    x86_64|amd64) ;;
    *) echo "x86-emulated: an x86-64 host only (vq_cpu.cpp's CPU checks are x86 builtins)" >&2; return 1 ;;
  esac
  if [[ ! -f /usr/include/simde/x86/avx512.h ]]; then apt_install libsimde-dev; fi
  echo "== x86-emulated (AVX-512 builds through SIMDe $(simde_version), on $(uname -m)): build"
  local t0=$SECONDS defs="VQK_EMULATED_AVX512" specs=() isas="" line def rest
  # -O1 (not -O3): these files take 5x longer to compile through SIMDe (half of it at -O2), and
  # the driver runs them in seconds even so. -Wno-psabi: GCC notes that 64-byte vectors are
  # passed differently since GCC 4.6, once per file.
  # With the host's AVX2/FMA/F16C, SIMDe does each 512-bit operation as two native 256-bit ones
  # (and fused multiply-adds stay fused); without them (or with VQK_EMULATED_PORTABLE=1), portable
  # code (the shims keep FMA fused), in its own folder.
  local flags="-O1,-Wno-psabi,-DVQK_SIMDE" flagsline out=build/native_checks/x86-emulated
  flagsline="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
  if [[ "${VQK_EMULATED_PORTABLE:-0}" != 1 && " $flagsline " == *" avx2 "* && " $flagsline " == *" fma "* &&
        " $flagsline " == *" f16c "* ]]; then
    flags="$flags,-mavx2,-mfma,-mf16c"
  else
    out="$out-portable"
  fi
  echo "   SIMDe objects built with: ${flags//,/ }"
  for line in "${EMULATED[@]}"; do
    def="${line%%=*}" rest="${line#*=}"
    defs="$defs $def" isas="$isas${isas:+,}${rest%%=*}" specs+=("${rest#*=}:$flags")
  done
  build "${CXX:-g++}" "$out" "$defs" "${specs[@]}"
  # First the shims this target adds to SIMDe (csrc/cpu/simde_avx512.h), against Intel's semantics.
  local sc="$out/simde_check"
  # shellcheck disable=SC2086
  stale "$sc" tests/native/simde_check.cpp &&
    "${CXX:-g++}" "${CXXFLAGS[@]}" ${flags//,/ } -Icsrc/cpu tests/native/simde_check.cpp -o "$sc"
  echo "== x86-emulated: run (built in $((SECONDS - t0)) s; behaviour only, emulated AVX-512 speed means nothing)"
  local t1=$SECONDS
  "$sc"
  "$out/kernel_check" --isa="$isas,scalar" --require="$isas,scalar" \
    --expect-auto="${isas%%,*}" "${VQK_NATIVE_CHECK_ARGS[@]}"
  echo "== x86-emulated: ran in $((SECONDS - t1)) s"
}

# The host target once more under ThreadSanitizer, in its own folder.
tsan() {
  local out="build/native_checks/tsan-$(uname -m)"
  mkdir -p "$out"
  echo "== tsan: the canary (a planted race must be reported)"
  stale "$out/tsan_canary" tests/native/tsan_canary.cpp &&
    "${CXX:-g++}" -std=c++17 -O1 -g -fsanitize=thread -pthread tests/native/tsan_canary.cpp -o "$out/tsan_canary"
  if TSAN_OPTIONS="halt_on_error=1 exitcode=66" "$out/tsan_canary" >"$out/canary.log" 2>&1; then
    echo "tsan: the planted race went unreported: ThreadSanitizer is not working here" >&2
    cat "$out/canary.log" >&2
    return 1
  fi
  grep -q "WARNING: ThreadSanitizer: data race" "$out/canary.log" || {
    echo "tsan: the canary failed without a race report" >&2; cat "$out/canary.log" >&2; return 1; }
  echo "   reported, as it must be"
  # -Wno-uninitialized: at -O1 GCC 12 flags its own _mm512_undefined_ps (`__m512 __Y = __Y;`).
  local CXXFLAGS=(-std=c++17 -O1 -g -fsanitize=thread -Wall -Wextra -Wno-uninitialized -pthread
                  -Icsrc/include)
  local HOST_CHECK_ARGS=(--quick)
  TSAN_OPTIONS="halt_on_error=1 exitcode=66 ${TSAN_OPTIONS:-}" VQK_HOST_OUT="$out" host
}

simde_version() {
  local h=/usr/include/simde/simde-common.h
  [[ -f "$h" ]] || { echo "?"; return; }
  awk '/define SIMDE_VERSION_(MAJOR|MINOR|MICRO)/ {printf "%s%s", sep, $3; sep="."}' "$h"
}

VQK_NATIVE_CHECK_ARGS=()
HOST_CHECK_ARGS=()
[[ -n "${VQK_NATIVE_QUICK:-}" ]] && VQK_NATIVE_CHECK_ARGS+=(--quick)
case "$what" in
  host) host ;;
  aarch64) aarch64 ;;
  x86-emulated) x86_emulated ;;
  tsan) tsan ;;
  all) host; aarch64; x86_emulated; tsan ;;
  *) echo "usage: $0 [host|aarch64|x86-emulated|tsan|all]" >&2; exit 2 ;;
esac
