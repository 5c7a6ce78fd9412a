// CPU entry points: instruction-set choice, threading, and the parts that are not the search.
//
// Forward (f32 / f16 / bf16): the fused search of search_impl.h, in the AVX-512, AVX2, NEON
// (aarch64) or portable build picked at run time. The codebook is packed once per call (panels plus
// squared norms); row tiles are then handed out dynamically to the threads, and each tile is
// searched, gathered and written while it is in cache. Extra memory: the packed codebook and one row tile per thread.
// Every row's result depends only on that row, so any thread count gives bitwise the same output.
//
// f64 uses a plain path (fp64 arithmetic, no packing): it is there for checking, not for speed.
//
// Backward: one pass over the rows grouped by code (a stable counting sort), writing grad_x and
// summing grad_codebook in a fixed order, so the result is bitwise the same for any thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_internal.h"
#include "vqk/common.h"
#include "vqk/vqk.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(VQK_HAVE_NEON) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#if defined(VQK_EMULATED_AVX512)
extern "C" const int vqk_avx512_emulated_by_simde;  // see avx512_emulated() below
#endif

namespace vqk {
namespace cpu {
int64_t g_exact_rows = 0;
int64_t g_set_aside_rows = 0;
int64_t g_rechecked_rows = 0;
int64_t g_int8_rows = 0;
}  // namespace cpu

int64_t cpu_exact_rows() { return __atomic_load_n(&cpu::g_exact_rows, __ATOMIC_RELAXED); }
int64_t cpu_set_aside_rows() { return __atomic_load_n(&cpu::g_set_aside_rows, __ATOMIC_RELAXED); }
int64_t cpu_rechecked_rows() { return __atomic_load_n(&cpu::g_rechecked_rows, __ATOMIC_RELAXED); }
int64_t cpu_int8_rows() { return __atomic_load_n(&cpu::g_int8_rows, __ATOMIC_RELAXED); }

namespace {

// ---------------------------------------------------------------------------------------------
// Threads

// Work below which one more thread costs more (waking it, sharing the tile queue) than it saves.
// ~4 MFLOP is some tens of microseconds of search on one core.
constexpr double kMinFlopsPerThread = 4.0e6;

// The number of threads parallel_chunks(n, grain, nthreads, ...) will use.
int chunk_threads(int64_t n, int64_t grain, int nthreads) {
  const int64_t chunks = (n + std::max<int64_t>(1, grain) - 1) / std::max<int64_t>(1, grain);
  return (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, chunks));
}

// f(lo, hi, tid) over [0, n) in chunks of `grain`, handed out dynamically to up to `nthreads`
// threads (tid < chunk_threads(n, grain, nthreads)). f must not throw: it runs on pool threads, so
// anything that allocates is allocated before.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, int nthreads, F&& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = chunk_threads(n, grain, nthreads);
  if (threads <= 1) {
    f(int64_t(0), n, 0);
    return;
  }
  struct Ctx {
    F* f;
    int64_t n, grain;
    std::atomic<int64_t> next{0};
  } ctx{&f, n, grain};
  cpu::run_parallel(threads, [](void* p, int tid) {
    Ctx& c = *static_cast<Ctx*>(p);
    for (;;) {
      const int64_t lo = c.next.fetch_add(c.grain, std::memory_order_relaxed);
      if (lo >= c.n) return;
      (*c.f)(lo, std::min(c.n, lo + c.grain), tid);
    }
  }, &ctx);
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
std::unique_ptr<T[], FreeDeleter> aligned_array(int64_t n) {
  const size_t bytes = ((size_t)std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

// ---------------------------------------------------------------------------------------------
// Instruction set

// The x86-emulated native check (.ci/native_checks.sh x86-emulated) builds the AVX-512 search
// files against SIMDe (portable code, csrc/cpu/simde_avx512.h) and this file with
// VQK_EMULATED_AVX512, so that its driver runs them on a CPU without AVX-512. Never defined for the
// module (CMakeLists.txt, setup.py): there the CPU check below stands. The symbol only the SIMDe
// objects define makes a binary built with this switch but real AVX-512 objects fail to link.
#if defined(VQK_EMULATED_AVX512)
bool avx512_emulated() { return vqk_avx512_emulated_by_simde == 1; }
#else
constexpr bool avx512_emulated() { return false; }
#endif

// Whether this CPU runs each build (and the build exists).
bool cpu_has_avx512() {
#if defined(VQK_HAVE_AVX512)
  if (avx512_emulated()) return true;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if defined(VQK_HAVE_AVX512BF16)
  if (avx512_emulated()) return true;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The int16 first pass on 512-bit registers needs AVX512F and BW (vpmaddwd on zmm); it is built
// with the avx512 build's flags and shares its fp32 search, so it asks for the same four.
bool cpu_has_avx512_i16() {
#if defined(VQK_HAVE_AVX512_I16)
  return cpu_has_avx512();
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni_i16() {
#if defined(VQK_HAVE_AVX512_VNNI_I16)
  return cpu_has_avx512() && (avx512_emulated() || __builtin_cpu_supports("avx512vnni"));
#else
  return false;
#endif
}

// The int8 tier in front of the VNNI int16 pass (vpdpbusd is AVX512_VNNI too): the same CPU
// requirement as avx512_vnni_i16.
bool cpu_has_avx512_vnni_i8() {
#if defined(VQK_HAVE_AVX512_VNNI_I8)
  return cpu_has_avx512() && (avx512_emulated() || __builtin_cpu_supports("avx512vnni"));
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(VQK_HAVE_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// AArch64's Advanced SIMD (with fp16 conversions) is part of the baseline, so the build is always
// made there; Linux still reports it, and a kernel that hides it gets the portable build.
bool cpu_has_neon() {
#if defined(VQK_HAVE_NEON) && defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#elif defined(VQK_HAVE_NEON)
  return true;
#else
  return false;
#endif
}

// FEAT_DotProd (SDOT/UDOT), optional from Armv8.2: Linux reports it as HWCAP_ASIMDDP.
#if defined(VQK_HAVE_NEON_DOT) && defined(__linux__) && !defined(HWCAP_ASIMDDP)
#define HWCAP_ASIMDDP (1 << 20)
#endif
bool cpu_has_neon_dot() {
#if defined(VQK_HAVE_NEON_DOT) && defined(__linux__)
  return cpu_has_neon() && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
  return false;  // no portable way to ask elsewhere (macOS would need sysctl): not offered
#endif
}

// An upper bound of max ||e_k|| over the finite codes from their fp32 squared norms (NaN marks a
// code with NaN or inf, which is never chosen; +inf, a finite code whose norm overflowed, makes the
// bound +inf): the norms' own rounding (gamma_{2D}) and underflow (D 2^-126) added, then sqrt.
// *all_finite: whether no norm is NaN (every code finite).
double code_norm_bound(const float* norms, int64_t K, int64_t D, bool* all_finite) {
  double m = 0.0;
  *all_finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const double v = norms[k];
    if (std::isnan(v)) {
      *all_finite = false;
      continue;
    }
    m = std::max(m, v);
  }
  const double u = 0x1p-24;
  return std::sqrt(m * (1.0 + (2.0 * (double)D + 2.0) * u) + (double)D * 0x1p-126) * (1.0 + 4.0 * u);
}

// search_impl.h's bound B(X) = c1 (E^2 + 2 X E) + c2 X^2 + c3 (1 + E + X), X the row's norm bound
// sqrt(xx + D 2^-126) (1 + (D + 2) u), without the square root: 2XE <= X^2 + E^2 and
// X <= (X^2 + 1) / 2 give B <= A0 + B0 xx, and the test 2B < v2 - v1 becomes
// fl(v2 - v1) > a + b fl(xx) with a = 2 A0, b = 2 B0, both enlarged by 2^-10 for the float
// roundings of the test itself (a few units of 2^-24). Never below `decide`'s 2B, so a row the
// quick test proves, `decide` would prove too; the rest go to `decide`.
void quick_bound(cpu::FwdJob& job) {
  const double E = job.max_code_norm, D = (double)job.D, u = 0x1p-24;
  if (!(E < 0x1p50) || job.approx_only) {
    job.quick_a = job.quick_b = std::numeric_limits<float>::infinity();
    return;
  }
  const double c1 = (2.0 * D + 8.0) * u * 1.01, c2 = (D + 2.0) * 0x1p-50,
               c3 = (4.0 * D + 8.0) * 0x1p-120;
  const double f = (1.0 + (D + 2.0) * u) * (1.0 + (D + 2.0) * u);
  const double B0 = (c1 + c2 + 0.5 * c3) * f;
  const double A0 = 2.0 * c1 * E * E + c3 * (1.5 + E) + B0 * D * 0x1p-126;
  const double up = 1.0 + 0x1p-10;
  job.quick_a = (float)(2.0 * A0 * up * up);  // the extra factor covers rounding to float
  job.quick_b = (float)(2.0 * B0 * up * up);
}

bool debug_approx_only() {
  const char* env = std::getenv("VQK_DEBUG_APPROX_ONLY");
  return env && env[0] == '1';
}

// Below these the bf16 search does not pay for its re-check (measured on Zen 5: at K = 64 it is
// ~10% slower than fp32, from K = 128 on 1.2-1.6x faster on rows that sit near one code).
constexpr int64_t kBf16MinK = 128, kBf16MinD = 16;

// The AVX2 int16 first pass (search_avx2_i16.cpp) is picked by itself only where it was measured
// faster than the fp32 AVX2 build: AMD family 25 (19h) without AVX-512, i.e. Zen 3 (Zen 4, the same
// family, has AVX-512 and takes that first). On a Zen 3 EPYC (family 25 model 1) its CPU time was
// 0.71-0.78x the fp32 build's from K = 256 on and ~0.9x at K = 64, D = 64 (2 threads; vpmaddwd
// shares the two FMA pipes but does 16 multiply-adds to FMA's 8; benchmarks/results/cpu-avx2-i16.md).
// Not measured below K = 64 or D = 16 (the per-row quantization and proof weigh more there), nor on
// any Intel core: those keep the fp32 build; VQK_CPU_ISA=avx2_i16 / avx2 force either.
// On that CPU auto takes the int8 tier in front of it (search_avx2_i8.cpp), whose CPU time there was
// 0.67-0.85x avx2_i16's for nearest_code at issue 16's five shapes (rows near codes; three
// interleaved runs, benchmarks/results/cpu-avx2-i8.md) and 0.72-0.99x on rows far from every code
// (where the int8 bound proves few rows and the threads go back to int16 tiles).
// The aarch64 int8 pass (search_neon_dot.cpp, VQK_CPU_ISA=neon_dot) is never picked by itself: its
// speed has never been measured (no ARM machine here, only qemu-user, which checks behaviour), and
// int8's coarse bound sends many rows on random data to an fp32 check of their candidates, so auto
// stays on `neon` until someone measures it on real cores.
// The AVX-512 int16 passes (search_avx512_i16.cpp: avx512_i16, and avx512_vnni_i16 with vpdpwssd)
// were first timed on a Zen 4 EPYC (AMD family 25 model 17, avx512_bf16 + avx512_vnni; 2 threads,
// interleaved medians; benchmarks/results/cpu-zen4-2026-12-02.md). avx512_vnni_i16's nearest_code
// took 0.71-0.88x the fp32 avx512 build's time from K = 32 (D = 64-256; ~1x at K = 16 and at
// D = 16-32, never slower). Against the bf16 build it tied on rows near codes (0.79-1.06x) and won
// on random rows against random codes (0.70-0.98x; there bf16's coarser bound leaves more
// candidates to its fp32 re-check and it ran no faster than fp32 avx512). So on AMD family 25 with
// AVX-512 VNNI (Zen 4) auto takes avx512_vnni_i16 from K = 32 and D = 8, in front of bf16. Zen 5
// (family 26: 512-bit FMA pipes) keeps the bf16 rule it was timed with; avx512_i16 (vpmaddwd +
// vpaddd) was slower than VNNI everywhere and is forced only.
// On an Intel Ice Lake Xeon (family 6 model 106: AVX-512 VNNI, no AVX-512 BF16; one core's fp32
// zmm FMA 91 GMAC/s, vpdpwssd zmm 170, benchmarks/fma_probe.cpp) avx512_vnni_i16's nearest_code
// took 0.60-0.73x the fp32 avx512 build's CPU time at issue 16's five shapes on rows near codes
// (0.56-0.64x in a first run) and 0.67-0.95x on random rows (K = 64-16384, D = 8-512; above 0.9x
// only at D = 8, where the epilogue dominates every path, and at D = 512, where the int16 bound
// proves fewer random rows), never slower beyond the noise of sub-millisecond calls
// (benchmarks/results/cpu-icelake-2026-12-02.md). So auto takes it, for the same K >= 32, D >= 8,
// on every CPU with AVX-512 VNNI and without AVX-512 BF16 (Cascade Lake to Ice Lake and Tiger
// Lake: the same 512-bit vpdpwssd, timed on Ice Lake only), as on Zen 4. Intel cores with BF16
// (Cooper Lake, Sapphire Rapids on) and Zen 5 keep the rules they have (bf16, untimed on Intel).
// The int8 tier in front of it (search_avx512_vnni_i8.cpp, VQK_CPU_ISA=avx512_vnni_i8: vpdpbusd,
// as avx2_i8 is in front of avx2_i16), timed on that Ice Lake (benchmarks/results/
// cpu-icelake-int8-2026-12-03.md, benchmarks/int8_tier.py): on rows near codes (noise 0.3-1.0 around
// randn codes) 0.61-0.73x avx512_vnni_i16's wall time at D = 64-512 (N = 8192-65536), 0.74-0.96x
// at D = 32-128 or N = 1024-2048; on random rows, where its bound proves nothing and the threads go
// back to int16 after their first tile, 0.97-1.06x (1.10x at N = 1024, K = 4096: packing the byte
// copy of the codes is the extra); at D = 16 a gain only very near codes (0.88x), at D = 8
// (LlamaGen's K = 16384) 1.01-1.07x. So on the Intel CPUs of the rule above (AVX-512 VNNI, no
// BF16; not Zen 4, where it is untimed) auto takes it from D = 32.
constexpr int64_t kVnniI8MinD = 32;
constexpr int64_t kI16MinK = 64, kI16MinD = 16;
// D from 8: at D = 8-12 it took 0.80-0.97x avx512's time (K = 1024-16384, 0.89x at LlamaGen's
// K = 16384, D = 8), at D = 4 1.13-1.17x (section 5 of the results page).
constexpr int64_t kVnniMinK = 32, kVnniMinD = 8;

[[maybe_unused]] bool cpu_is_amd_family25() {  // unused in a build without AVX2 (x86-emulated)
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  if (!(b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u)) return false;  // "AuthenticAMD"
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  unsigned family = (a >> 8) & 0xfu;
  if (family == 0xfu) family += (a >> 20) & 0xffu;
  return family == 0x19u;
#else
  return false;
#endif
}

// Where auto puts avx512_vnni_i16 first (above): Zen 4 (AMD family 25 with AVX-512), and CPUs with
// AVX-512 VNNI but without AVX-512 BF16 (Intel Cascade Lake to Ice Lake).
[[maybe_unused]] bool vnni_i16_measured_faster() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_is_amd_family25() || !__builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Where auto puts avx512_vnni_i8 in front of it (from D = 32): the Intel side of that rule only
// (timed on Ice Lake; Zen 4 untimed).
[[maybe_unused]] bool vnni_i8_measured_faster() {
#if defined(__x86_64__) || defined(__i386__)
  return !cpu_is_amd_family25() && !__builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

#if defined(VQK_HAVE_AVX2)
// The fp32 AVX2 build's tile by D: 2 x 8 rows up to kAvx2SmallMaxD (search_avx2_small.cpp, where
// the measurements are: faster at D = 4 and 8, level at 16), else 3 x 8. Both are `avx2` (auto
// and VQK_CPU_ISA=avx2 alike).
constexpr int64_t kAvx2SmallMaxD = 8;
const cpu::SearchKernels& avx2_fp32(int64_t D) {
  return D <= kAvx2SmallMaxD ? cpu::kernels_avx2_small() : cpu::kernels_avx2();
}
#endif

// The kernels to use for a K x D codebook: the best this CPU runs, or the one VQK_CPU_ISA names
// (read on every call so tests can force each path on one machine).
const cpu::SearchKernels& select_kernels([[maybe_unused]] int64_t K, [[maybe_unused]] int64_t D) {
  const char* env = std::getenv("VQK_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
#if defined(VQK_HAVE_AVX512_VNNI_I16) && defined(VQK_HAVE_AVX2)
    if (cpu_has_avx512_vnni_i16() && !avx512_emulated() && vnni_i16_measured_faster() &&
        K >= kVnniMinK && D >= kVnniMinD) {
#if defined(VQK_HAVE_AVX512_VNNI_I8)
      if (D >= kVnniI8MinD && vnni_i8_measured_faster()) return cpu::kernels_avx512_vnni_i8();
#endif
      return cpu::kernels_avx512_vnni_i16();
    }
#endif
#if defined(VQK_HAVE_AVX512BF16)
    if (cpu_has_avx512bf16() && K >= kBf16MinK && D >= kBf16MinD) return cpu::kernels_avx512bf16();
#endif
#if defined(VQK_HAVE_AVX512)
    if (cpu_has_avx512()) return cpu::kernels_avx512();
#endif
#if defined(VQK_HAVE_AVX2)
    if (cpu_has_avx2() && cpu_is_amd_family25() && K >= kI16MinK && D >= kI16MinD)
      return cpu::kernels_avx2_i8();
    if (cpu_has_avx2()) return avx2_fp32(D);
#endif
#if defined(VQK_HAVE_NEON)
    if (cpu_has_neon()) return cpu::kernels_neon();
#endif
    return cpu::kernels_scalar();
  }
  if (want == "scalar") return cpu::kernels_scalar();
  if (want == "avx512bf16") {
    if (!cpu_has_avx512bf16())
      throw std::runtime_error("VQK_CPU_ISA=avx512bf16, but this CPU (or this build) lacks AVX-512 BF16");
#if defined(VQK_HAVE_AVX512BF16)
    return cpu::kernels_avx512bf16();
#endif
  }
  if (want == "avx512") {
    if (!cpu_has_avx512())
      throw std::runtime_error("VQK_CPU_ISA=avx512, but this CPU (or this build) lacks AVX-512 F/BW/VL/DQ");
#if defined(VQK_HAVE_AVX512)
    return cpu::kernels_avx512();
#endif
  }
  if (want == "avx512_i16") {
    if (!cpu_has_avx512_i16())
      throw std::runtime_error("VQK_CPU_ISA=avx512_i16, but this CPU (or this build) lacks AVX-512 F/BW/VL/DQ");
#if defined(VQK_HAVE_AVX512_I16)
    return cpu::kernels_avx512_i16();
#endif
  }
  if (want == "avx512_vnni_i16") {
    if (!cpu_has_avx512_vnni_i16())
      throw std::runtime_error("VQK_CPU_ISA=avx512_vnni_i16, but this CPU (or this build) lacks AVX-512 "
                               "F/BW/VL/DQ with VNNI");
#if defined(VQK_HAVE_AVX512_VNNI_I16)
    return cpu::kernels_avx512_vnni_i16();
#endif
  }
  if (want == "avx512_vnni_i8") {
    if (!cpu_has_avx512_vnni_i8())
      throw std::runtime_error("VQK_CPU_ISA=avx512_vnni_i8, but this CPU (or this build) lacks AVX-512 "
                               "F/BW/VL/DQ with VNNI");
#if defined(VQK_HAVE_AVX512_VNNI_I8)
    return cpu::kernels_avx512_vnni_i8();
#endif
  }
  if (want == "avx2_i16") {
    if (!cpu_has_avx2())
      throw std::runtime_error("VQK_CPU_ISA=avx2_i16, but this CPU (or this build) lacks AVX2/FMA/F16C");
#if defined(VQK_HAVE_AVX2)
    return cpu::kernels_avx2_i16();
#endif
  }
  if (want == "avx2_i8") {
    if (!cpu_has_avx2())
      throw std::runtime_error("VQK_CPU_ISA=avx2_i8, but this CPU (or this build) lacks AVX2/FMA/F16C");
#if defined(VQK_HAVE_AVX2)
    return cpu::kernels_avx2_i8();
#endif
  }
  if (want == "avx2") {
    if (!cpu_has_avx2())
      throw std::runtime_error("VQK_CPU_ISA=avx2, but this CPU (or this build) lacks AVX2/FMA/F16C");
#if defined(VQK_HAVE_AVX2)
    return avx2_fp32(D);
#endif
  }
  if (want == "neon_dot") {
    if (!cpu_has_neon_dot())
      throw std::runtime_error("VQK_CPU_ISA=neon_dot, but this is not an aarch64 build on a CPU with the "
                               "dot-product extension (FEAT_DotProd, HWCAP_ASIMDDP)");
#if defined(VQK_HAVE_NEON_DOT)
    return cpu::kernels_neon_dot();
#endif
  }
  if (want == "neon") {
    if (!cpu_has_neon())
      throw std::runtime_error("VQK_CPU_ISA=neon, but this is not an aarch64 build with Advanced SIMD "
                               "(NEON is the aarch64 path; x86-64 has avx512bf16, avx512, avx512_i16, "
                               "avx512_vnni_i16, avx512_vnni_i8, avx2, avx2_i16, avx2_i8)");
#if defined(VQK_HAVE_NEON)
    return cpu::kernels_neon();
#endif
  }
  throw std::invalid_argument("VQK_CPU_ISA must be one of auto, avx512bf16, avx512, avx512_i16, "
                              "avx512_vnni_i16, avx512_vnni_i8, avx2, avx2_i16, avx2_i8, neon, neon_dot, "
                              "scalar; got '" +
                              want + "'");
}

// counts[k] = how many of the N indices (each in [0, K)) are k: the forward calls' usage counts.
void count_codes(const int64_t* indices, int64_t N, int64_t K, int64_t* counts) {
  std::fill(counts, counts + K, int64_t(0));
  for (int64_t n = 0; n < N; ++n) ++counts[indices[n]];
}

// ---------------------------------------------------------------------------------------------
// One codebook packed for a search job: forward_packed's, and each stage's of residual_forward and
// each group's of grouped_forward

// The arrays `ks.pack` fills for one codebook of K codes of D dimensions (cpu::FwdJob has the
// layouts): the fp32 panels and their norms; the bf16 pairs (ks.bf16) or the int16 pairs (ks.i16;
// neon_dot's int8 quads) in packed_bf16; with ks.i16 each code's scale and L1 bound in code_aux;
// and with `i8` (ks.i8, except for residual VQ, which never runs the int8 tier) the byte codes and
// a third code_aux row of int8 scales.
struct CodePack {
  int64_t K, D, panels;
  bool pairs, aux, i8;
  std::unique_ptr<float[], FreeDeleter> packed, norms;
  std::unique_ptr<uint32_t[], FreeDeleter> packed_bf16;
  std::unique_ptr<float[], FreeDeleter> code_aux;
  std::unique_ptr<uint32_t[], FreeDeleter> packed_i8;

  CodePack(const cpu::SearchKernels& ks, int64_t K_, int64_t D_, bool i8_)
      : K(K_), D(D_), panels((K + ks.nr - 1) / ks.nr), pairs(ks.bf16 || ks.i16), aux(ks.i16),
        i8(i8_), packed(aligned_array<float>(panels * D * ks.nr)),
        norms(aligned_array<float>(panels * ks.nr)),
        packed_bf16(aligned_array<uint32_t>(pairs ? panels * ((D + 1) / 2) * ks.nr : 0)),
        code_aux(aligned_array<float>(aux ? (i8 ? 3 : 2) * panels * ks.nr : 0)),
        packed_i8(aligned_array<uint32_t>(i8 ? panels * ((D + 7) / 8) * ks.nr * 2 : 0)) {}

  // A search job over `codebook` (K x D, in `dtype`) with these arrays as its packed codes; the
  // bounds are left for pack_codebook.
  cpu::FwdJob job(DType dtype, const Rows& x, const void* codebook, const RowsOut& zq,
                  int64_t* indices, float* sqerr, bool approx_only) const {
    cpu::FwdJob j{dtype, x, codebook, K, D, zq, indices, sqerr, packed.get(), norms.get(), panels,
                  pairs ? packed_bf16.get() : nullptr, 0.0, approx_only, 0.0f, 0.0f};
    if (aux) j.code_aux = code_aux.get();
    if (i8) j.packed_i8 = packed_i8.get();
    return j;
  }
};

// Packs a job's codebook (with up to `threads` threads) and sets the bounds its search needs.
void pack_codebook(const cpu::SearchKernels& ks, cpu::FwdJob& job, int threads) {
  const int64_t D = job.D;
  // Packing is K*D work against the search's N*K*D; share it only when it is worth a wake-up.
  const int64_t pack_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D * ks.nr, 1));
  parallel_chunks(job.panels, pack_grain, job.panels * D * ks.nr >= (1 << 16) ? threads : 1,
                  [&](int64_t lo, int64_t hi, int) { ks.pack(job, lo, hi); });
  job.max_code_norm = code_norm_bound(job.norms, job.K, D, &job.codes_finite);
  quick_bound(job);
  if (ks.i16) {
    // The int16 pass's bound needs the largest code scale and L1 norm (search_avx2_i16.cpp), the
    // int8 pass's (a job with byte codes: CodePack's `i8`) the largest int8 scale too; non-finite
    // codes carry zeros there.
    const int64_t np = job.panels * ks.nr;
    const float* aux = job.code_aux;
    for (int64_t k = 0; k < job.K; ++k) {
      job.max_code_scale = std::max(job.max_code_scale, (double)aux[k]);
      job.max_code_l1 = std::max(job.max_code_l1, (double)aux[np + k]);
      if (job.packed_i8)
        job.max_code_scale8 = std::max(job.max_code_scale8, (double)aux[2 * np + k]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, f32 / f16 / bf16: the fused search

void forward_packed(const ForwardArgs& a, int num_threads) {
  const cpu::SearchKernels& ks = select_kernels(a.K, a.x.D);
  const int64_t N = a.x.n(), D = a.x.D, K = a.K;
  if (K + ks.nr >= ((int64_t)1 << 31))
    throw std::invalid_argument("vqkernels: the CPU kernel supports K < 2^31 codes");
  if (N > 0) {
    const CodePack codes(ks, K, D, ks.i8);
    cpu::FwdJob job = codes.job(a.dtype, a.x, a.codebook, a.zq, a.indices,
                                static_cast<float*>(a.sqerr), debug_approx_only());

    const int64_t tiles = (N + ks.mr - 1) / ks.mr;
    const double flops = 2.0 * (double)N * (double)K * (double)std::max<int64_t>(D, 1);
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(
        {(int64_t)std::max(num_threads, 1), tiles, 1 + (int64_t)(flops / kMinFlopsPerThread)}));
    pack_codebook(ks, job, threads);

    const int64_t stride = (ks.scratch_floats(D) + 15) / 16 * 16;  // keep each 64-byte aligned
    auto scratch = aligned_array<float>(stride * threads);
    std::memset(scratch.get(), 0, sizeof(float) * stride * threads);
    struct Ctx {
      const cpu::FwdJob* job;
      const cpu::SearchKernels* ks;
      float* scratch;
      int64_t stride, tiles;
      std::atomic<int64_t> next{0};
    } ctx{&job, &ks, scratch.get(), stride, tiles};
    // One tile at a time: a tile is thousands of FMAs, and fine-grained hand-out keeps both cores
    // busy to the end even when a neighbour process steals one for a while.
    cpu::run_parallel(threads, [](void* p, int tid) {
      Ctx& c = *static_cast<Ctx*>(p);
      float* mine = c.scratch + tid * c.stride;
      for (;;) {
        const int64_t t = c.next.fetch_add(1, std::memory_order_relaxed);
        if (t >= c.tiles) break;
        c.ks->search(*c.job, t, t + 1, mine);
      }
      c.ks->flush(*c.job, mine);
    }, &ctx);
  }
  if (a.counts) count_codes(a.indices, N, K, a.counts);
}

// ---------------------------------------------------------------------------------------------
// Forward, f64: plain fp64 arithmetic, parallel over rows, with the same proof and exact
// re-search as the fp32 kernels (search_impl.h, `decide`), in float64: u = 2^-53, the range limits
// ||x||^2 < 2^900 and max||e|| < 2^450, and a (D + 2) 2^-51 (||x|| + E)^2 term for float64's own
// rounding of the exact distances. Input beyond 2^480 (or all of it below 2^-480) is searched on
// values scaled by one power of two, the reference's rule, so squares neither overflow nor vanish.

// The power of two that brings the largest finite magnitude of rows and codes inside
// [2^-480, 2^480] (1 when it already is): vqkernels.reference._search_scale.
double f64_search_scale(const ForwardArgs& a) {
  const int64_t N = a.x.n(), D = a.x.D, K = a.K;
  const double* xp = static_cast<const double*>(a.x.ptr);
  const double* cb = static_cast<const double*>(a.codebook);
  if (N == 0 || K == 0 || D == 0) return 1.0;
  double m = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t xo = a.x.offset(n, 0);
    for (int64_t d = 0; d < D; ++d) {
      const double v = std::fabs(xp[xo + d * a.x.sd]);
      if (v < std::numeric_limits<double>::infinity()) m = std::max(m, v);
    }
  }
  for (int64_t i = 0; i < K * D; ++i) {
    const double v = std::fabs(cb[i]);
    if (v < std::numeric_limits<double>::infinity()) m = std::max(m, v);
  }
  int e = 0;
  std::frexp(m, &e);
  if (m > 0x1p480) return std::ldexp(1.0, 480 - e);
  if (m > 0.0 && m < 0x1p-480) return std::ldexp(1.0, -480 - e);
  return 1.0;
}

void forward_f64(const ForwardArgs& a, int num_threads) {
  const int64_t N = a.x.n(), D = a.x.D, K = a.K;
  const double* xp = static_cast<const double*>(a.x.ptr);
  const double* cb = static_cast<const double*>(a.codebook);
  double* zq = static_cast<double*>(a.zq.ptr);
  double* sqerr = static_cast<double*>(a.sqerr);
  const double inf = std::numeric_limits<double>::infinity();
  const double scale = f64_search_scale(a);
  const bool approx_only = debug_approx_only();
  std::vector<double> cnorm(K);
  double emax = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double s = 0;
    bool finite = true;
    for (int64_t d = 0; d < D; ++d) {
      const double v = cb[k * D + d];
      s += v * v;
      finite &= std::isfinite(v);
    }
    // A code with NaN or inf is never chosen (NaN loses every compare); see search_impl.h.
    cnorm[k] = finite ? s : std::numeric_limits<double>::quiet_NaN();
    if (finite) emax = std::max(emax, s);
  }
  const double u = 0x1p-53, Dd = (double)D;
  const double E = std::sqrt(emax * (1.0 + (2.0 * Dd + 2.0) * u) + Dd * 0x1p-1022) * (1.0 + 4.0 * u);
  const double flops = 2.0 * (double)N * (double)K * (double)std::max<int64_t>(D, 1);
  const int threads = (int)std::min<int64_t>(num_threads, 1 + (int64_t)(flops / kMinFlopsPerThread));
  const int nt = chunk_threads(N, 16, threads);
  const int64_t Dm = std::max<int64_t>(D, 1);
  std::vector<double> rows(nt * Dm), dists(nt * std::max<int64_t>(K, 1));
  std::vector<int64_t> exact_rows(nt, 0);
  parallel_chunks(N, 16, threads, [&](int64_t lo, int64_t hi, int tid) {
    double* row = rows.data() + tid * Dm;
    double* dist = dists.data() + tid * std::max<int64_t>(K, 1);
    auto exact = [&](int64_t k) {
      const double* e = cb + k * D;
      double s = 0;
      for (int64_t d = 0; d < D; ++d) {
        const double t = row[d] * scale - e[d] * scale;
        s += t * t;
      }
      return s;
    };
    for (int64_t n = lo; n < hi; ++n) {
      const int64_t xo = a.x.offset(n, 0);
      double xx = 0;
      for (int64_t d = 0; d < D; ++d) {
        row[d] = xp[xo + d * a.x.sd];
        xx += row[d] * row[d];
      }
      double v1 = inf, v2 = inf;
      int64_t arg = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double* e = cb + k * D;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += row[d] * e[d];
        const double dk = cnorm[k] - 2 * dot;
        dist[k] = dk;
        // Strict compares: ties keep the lowest index, NaN loses; v2 is the runner-up's value.
        if (dk < v1) { v2 = v1; v1 = dk; arg = k; }
        else if (dk < v2) v2 = dk;
      }
      bool proven = approx_only;
      double thr = inf;
      if (!proven && scale == 1.0 && std::isfinite(v1) && xx < 0x1p900 && E < 0x1p450) {
        const double xn = std::sqrt(xx + Dd * 0x1p-1022) * (1.0 + (Dd + 2.0) * u);
        const double B = (2.0 * Dd + 8.0) * u * 1.01 * (E * E + 2.0 * xn * E) +
                         (Dd + 2.0) * 0x1p-51 * (xn + E) * (xn + E) +
                         (4.0 * Dd + 8.0) * 0x1p-1020 * (1.0 + E + xn);
        proven = v2 - v1 > 2.0 * B;
        thr = v1 + 2.0 * B * (1.0 + 0x1p-40);
      }
      if (!proven) {
        ++exact_rows[tid];
        double best = inf;
        arg = 0;
        for (int64_t k = 0; k < K; ++k) {
          if (!(dist[k] <= thr) && thr < inf) continue;
          const double dk = exact(k);
          if (dk < best) { best = dk; arg = k; }
        }
      }
      const double* e = cb + arg * D;
      double err = 0;
      for (int64_t d = 0; d < D; ++d) { const double t = row[d] - e[d]; err += t * t; }
      a.indices[n] = arg;
      sqerr[n] = err;
      if (zq) {
        // NaN where the row or the code is not finite (not where a finite error overflows).
        const bool finite = std::isfinite(exact(arg));
        const int64_t zo = a.zq.offset(n, 0);
        for (int64_t d = 0; d < D; ++d)
          zq[zo + d * a.zq.sd] = finite ? e[d] : std::numeric_limits<double>::quiet_NaN();
      }
    }
  });
  int64_t total = 0;
  for (int64_t c : exact_rows) total += c;
  __atomic_fetch_add(&cpu::g_exact_rows, total, __ATOMIC_RELAXED);
  if (a.counts) count_codes(a.indices, N, K, a.counts);
}

// ---------------------------------------------------------------------------------------------
// Backward

// Sorted rows are cut into fixed chunks of this many rows. The chunks (not the threads) fix the
// order of every sum, which is what makes grad_codebook independent of the thread count; a code
// whose rows span several chunks is finished from the chunks' partial sums, in chunk order. Fixed
// chunks also keep all threads busy when most rows chose one code (a collapsed codebook).
constexpr int64_t kBwdChunk = 256;

// The codebook gradient's summation order, shared by every CPU backward (single-stage, each
// residual stage, each group), so that they all sum bit for bit alike: the rows sorted by code
// (a stable counting sort), cut into fixed chunks of kBwdChunk sorted rows; in a chunk, each code's
// run of rows is summed from zero in ascending row order; a code whose rows span chunks is the sum
// of its chunk pieces, in chunk order. A is the accumulation type. Memory is set up by reserve()
// (on the calling thread); sort(), sum_chunk() and finish() allocate nothing, so they may run on
// pool threads.
template <class A>
struct CodeOrder {
  int64_t N = 0, K = 0, D = 0;
  std::vector<int64_t> start, order, fill;  // rows of code k: order[start[k] .. start[k + 1])
  // head[c]: the piece of the code at chunk c's first row when that code started earlier or goes
  // on later; tail[c]: the same for the chunk's last code when it differs from the first.
  std::vector<A> head, tail;

  void reserve(int64_t n, int64_t max_k, int64_t d) {
    N = n;
    D = d;
    start.resize(max_k + 1);
    fill.resize(max_k);
    order.resize(n);
    head.resize(chunks() * d);
    tail.resize(chunks() * d);
  }
  int64_t chunks() const { return (N + kBwdChunk - 1) / kBwdChunk; }

  // code(n) in [0, k) for every row n < N.
  template <class Code>
  void sort(int64_t k, Code&& code) {
    K = k;
    std::fill(start.begin(), start.begin() + K + 1, int64_t(0));
    for (int64_t n = 0; n < N; ++n) ++start[code(n) + 1];
    for (int64_t i = 0; i < K; ++i) start[i + 1] += start[i];
    std::copy(start.begin(), start.begin() + K, fill.begin());
    for (int64_t n = 0; n < N; ++n) order[fill[code(n)]++] = n;
  }

  // Chunk c's pieces: for each code run, acc (D values, scratch) from zero, row(n, acc) for its
  // rows in order, stored into grad (K x D: a code wholly in this chunk) or head/tail.
  template <class Code, class Row>
  void sum_chunk(int64_t c, A* acc, A* grad, Code&& code, Row&& row) {
    const int64_t lo = c * kBwdChunk, hi = std::min(N, lo + kBwdChunk);
    for (int64_t i = lo; i < hi;) {
      const int64_t k = code(order[i]);
      const int64_t end = std::min(hi, start[k + 1]);
      std::fill(acc, acc + D, A(0));
      for (int64_t j = i; j < end; ++j) row(order[j], acc);
      A* dst;
      if (start[k] >= lo && start[k + 1] <= hi) dst = grad + k * D;  // whole code here
      else if (i == lo) dst = head.data() + c * D;
      else dst = tail.data() + c * D;
      std::copy(acc, acc + D, dst);
      i = end;
    }
  }

  // The same sums in row order: piece[n] is where row n's term goes (the code's slot in grad, or
  // the head or tail piece of its chunk, as sum_chunk stores them). A stable sort keeps a code's
  // rows in ascending row order, so adding every row's term into its piece, rows ascending, into
  // pieces zeroed first (zero_pieces), adds each piece's terms in sum_chunk's order, from zero:
  // the same bits, but x and the other row arrays are walked in order instead of by code.
  void pieces(A* grad, A** piece) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t s = start[k], e = start[k + 1];
      if (s == e) continue;
      const int64_t c0 = s / kBwdChunk, c1 = (e - 1) / kBwdChunk;
      A* const first = c0 == c1 ? grad + k * D
                                : (s == c0 * kBwdChunk ? head.data() : tail.data()) + c0 * D;
      for (int64_t j = s; j < e; ++j) {
        const int64_t c = j / kBwdChunk;
        piece[order[j]] = c == c0 ? first : head.data() + c * D;
      }
    }
  }
  void zero_pieces(A* grad) {
    std::fill(grad, grad + K * D, A(0));
    std::fill(head.begin(), head.end(), A(0));
    std::fill(tail.begin(), tail.end(), A(0));
  }

  // After every chunk: codes with no rows get zero; codes split across chunks are summed in chunk
  // order.
  void finish(A* grad) const {
    for (int64_t k = 0; k < K; ++k) {
      A* g = grad + k * D;
      if (start[k] == start[k + 1]) {
        std::fill(g, g + D, A(0));
        continue;
      }
      const int64_t c0 = start[k] / kBwdChunk, c1 = (start[k + 1] - 1) / kBwdChunk;
      if (c0 == c1) continue;
      const A* first = (start[k] == c0 * kBwdChunk ? head.data() : tail.data()) + c0 * D;
      std::copy(first, first + D, g);
      for (int64_t c = c0 + 1; c <= c1; ++c)
        for (int64_t d = 0; d < D; ++d) g[d] += head[c * D + d];
    }
  }
};

// One codebook's backward over rows given as views: grad_x = grad_zq + 2 g_commit (x - e) and the
// terms 2 g_codebook (e - x) of the codebook gradient. The weights of row n are g_codebook[n *
// gcb_s] and g_commit[n * gcm_s] (a group's column of an (N, G) array, or a plain vector).
template <class T>
struct BackwardRun {
  using S = typename T::store;
  using A = typename T::acc;
  Rows x, grad_zq;
  RowsOut grad_x;
  int64_t N, D, K;
  const S* xp;
  const S* cb;
  const int64_t* indices;
  const S* gzq;
  const A* gcb;
  const A* gcm;
  int64_t gcb_s, gcm_s;
  S* gx;
  bool contig;

  BackwardRun(const Rows& x_, const void* codebook, int64_t K_, const int64_t* indices_,
              const Rows& grad_zq_, const void* g_codebook, int64_t gcb_stride,
              const void* g_commit, int64_t gcm_stride, const RowsOut& grad_x_)
      : x(x_), grad_zq(grad_zq_), grad_x(grad_x_), N(x_.n()), D(x_.D), K(K_),
        xp(static_cast<const S*>(x_.ptr)), cb(static_cast<const S*>(codebook)), indices(indices_),
        gzq(static_cast<const S*>(grad_zq_.ptr)), gcb(static_cast<const A*>(g_codebook)),
        gcm(static_cast<const A*>(g_commit)), gcb_s(gcb_stride), gcm_s(gcm_stride),
        gx(static_cast<S*>(grad_x_.ptr)),
        contig(x_.sd == 1 && (!gx || grad_x_.sd == 1) && (!gzq || grad_zq_.sd == 1)) {}

  explicit BackwardRun(const BackwardArgs& a)
      : BackwardRun(a.x, a.codebook, a.K, a.indices, a.grad_zq, a.g_codebook, 1, a.g_commit, 1,
                    a.grad_x) {}

  // One row: writes grad_x[n] (if wanted) and, if `acc` is given, adds 2 g_cb (e - x) into it.
  // C: every view is contiguous along D, so the loops have unit strides and vectorise.
  template <bool C>
  void row_t(int64_t n, A* __restrict acc) const {
    const S* __restrict e = cb + indices[n] * D;
    const S* __restrict xr = xp + x.offset(n, 0);
    const int64_t xs = C ? 1 : x.sd;
    if (gx) {
      S* __restrict gr = gx + grad_x.offset(n, 0);
      const int64_t gs = C ? 1 : grad_x.sd, qs = C ? 1 : grad_zq.sd;
      const A wc = gcm ? 2 * gcm[n * gcm_s] : A(0);
      if (gzq) {
        const S* __restrict q = gzq + grad_zq.offset(n, 0);
        if (wc != 0) {
          for (int64_t d = 0; d < D; ++d)
            T::put(gr + d * gs, T::load(q + d * qs) + wc * (T::load(xr + d * xs) - T::load(e + d)));
        } else {
          for (int64_t d = 0; d < D; ++d) T::put(gr + d * gs, T::load(q + d * qs));
        }
      } else if (wc != 0) {
        for (int64_t d = 0; d < D; ++d) T::put(gr + d * gs, wc * (T::load(xr + d * xs) - T::load(e + d)));
      } else {
        for (int64_t d = 0; d < D; ++d) T::put(gr + d * gs, A(0));
      }
    }
    if (acc) {
      const A wb = 2 * gcb[n * gcb_s];
      for (int64_t d = 0; d < D; ++d) acc[d] += wb * (T::load(e + d) - T::load(xr + d * xs));
    }
  }

  void row(int64_t n, A* acc) const {
    if (contig) row_t<true>(n, acc);
    else row_t<false>(n, acc);
  }

  // Whether the codebook gradient is summed (else grad_cb, if given, is zero).
  bool sums(const void* grad_cb) const { return grad_cb && gcb; }

  void run(int num_threads, void* grad_cb) {
    const int threads = (int)std::min<int64_t>(
        num_threads, 1 + (int64_t)((double)N * (double)std::max<int64_t>(D, 1) / 2.0e5));
    A* gcbo = static_cast<A*>(grad_cb);
    if (!sums(grad_cb)) {
      if (gcbo) std::fill(gcbo, gcbo + K * D, A(0));
      if (gx) parallel_chunks(N, 64, threads, [&](int64_t lo, int64_t hi, int) {
        for (int64_t n = lo; n < hi; ++n) row(n, nullptr);
      });
      return;
    }
    CodeOrder<A> co;
    co.reserve(N, K, D);
    auto code = [&](int64_t n) { return indices[n]; };
    co.sort(K, code);
    const int64_t nchunks = co.chunks(), Dp = std::max<int64_t>(D, 1);
    std::vector<A> accs(chunk_threads(nchunks, 1, threads) * Dp);
    parallel_chunks(nchunks, 1, threads, [&](int64_t c0, int64_t c1, int tid) {
      A* acc = accs.data() + tid * Dp;
      for (int64_t c = c0; c < c1; ++c)
        co.sum_chunk(c, acc, gcbo, code, [&](int64_t n, A* s) { row(n, s); });
    });
    co.finish(gcbo);
  }
};

// ---------------------------------------------------------------------------------------------
// Grouped VQ backward: every group's BackwardRun in one call. The codebook sums of each group
// keep CodeOrder's chunks, and grad_x is elementwise, so the result is bitwise G separate
// cpu_backward calls on the groups' column views (the per-group loop), for any thread count. What
// one call saves: the per-group call overhead, and G parallel regions become one, over (group,
// chunk) items, so the threads stay busy across group boundaries.

template <class T>
void grouped_backward_t(const GroupedBackwardArgs& a, int num_threads) {
  using A = typename T::acc;
  const int64_t N = a.x.n(), G = a.G;
  if (G <= 0 || a.x.D % G)
    throw std::invalid_argument("vqkernels: grouped VQ needs G >= 1 groups dividing D");
  const int64_t d = a.x.D / G;
  for (int64_t g = 0; g < G; ++g)
    if (a.Ks[g] <= 0) throw std::invalid_argument("vqkernels: every group needs K >= 1 codes");
  auto column = [&](auto v, int64_t g) {  // group g's columns of an N x (G d) view
    if (v.ptr) v.ptr = static_cast<const char*>(v.ptr) + g * d * v.sd * (int64_t)sizeof(typename T::store);
    v.D = d;
    return v;
  };
  std::vector<BackwardRun<T>> runs;
  runs.reserve(G);
  for (int64_t g = 0; g < G; ++g) {
    RowsOut gx = a.grad_x;
    if (gx.ptr) gx.ptr = static_cast<char*>(gx.ptr) + g * d * gx.sd * (int64_t)sizeof(typename T::store);
    gx.D = d;
    runs.emplace_back(column(a.x, g), a.codebooks[g], a.Ks[g], a.indices + g * N,
                      column(a.grad_zq, g),
                      a.g_codebook ? static_cast<const A*>(a.g_codebook) + g * a.gcb_sg : nullptr,
                      a.gcb_sn,
                      a.g_commit ? static_cast<const A*>(a.g_commit) + g * a.gcm_sg : nullptr,
                      a.gcm_sn, gx);
  }
  std::vector<char> sums(G);
  for (int64_t g = 0; g < G; ++g) {
    sums[g] = runs[g].sums(a.grad_cb[g]);
    if (a.grad_cb[g] && !sums[g]) {
      A* p = static_cast<A*>(a.grad_cb[g]);
      std::fill(p, p + a.Ks[g] * d, A(0));
    }
  }
  if (N == 0) {
    for (int64_t g = 0; g < G; ++g)
      if (sums[g]) {
        A* p = static_cast<A*>(a.grad_cb[g]);
        std::fill(p, p + a.Ks[g] * d, A(0));
      }
    return;
  }
  const int threads = (int)std::min<int64_t>(
      num_threads, 1 + (int64_t)((double)N * (double)std::max<int64_t>(G * d, 1) / 2.0e5));
  std::vector<CodeOrder<A>> orders(G);
  int64_t summed = 0;
  for (int64_t g = 0; g < G; ++g)
    if (sums[g]) {
      orders[g].reserve(N, a.Ks[g], d);
      ++summed;
    }
  // Two ways to the same bits. With a group for every thread, each summed group is one item that
  // sorts its rows and then walks them in row order (CodeOrder::pieces): x, grad_zq and grad_x
  // streamed, and one parallel region for the whole call. With fewer groups than threads, the
  // groups' chunks of sorted rows are shared out instead (CodeOrder::sum_chunk), as
  // BackwardRun::run does, which keeps the threads busy but visits the rows by code.
  const bool by_row = summed >= threads;
  std::vector<std::vector<A*>> piece(by_row ? G : 0);
  for (int64_t g = 0; g < (by_row ? G : 0); ++g)
    if (sums[g]) piece[g].resize(N);
  if (!by_row)
    parallel_chunks(G, 1, threads, [&](int64_t g0, int64_t g1, int) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t* idx = runs[g].indices;
        if (sums[g]) orders[g].sort(a.Ks[g], [idx](int64_t n) { return idx[n]; });
      }
    });
  // Items, group after group: a summed group (by_row) or a chunk of its sorted rows, else a
  // block of 64 rows for grad_x alone (BackwardRun::run's grain), none where neither is wanted.
  constexpr int64_t kRowBlock = 64;
  std::vector<int64_t> first(G + 1, 0);
  for (int64_t g = 0; g < G; ++g)
    first[g + 1] = first[g] + (sums[g] ? (by_row ? 1 : orders[g].chunks())
                               : runs[g].gx ? (N + kRowBlock - 1) / kRowBlock : 0);
  const int64_t items = first[G], Dp = std::max<int64_t>(d, 1);
  std::vector<A> accs(by_row ? 0 : chunk_threads(items, 1, threads) * Dp);
  parallel_chunks(items, 1, threads, [&](int64_t i0, int64_t i1, int tid) {
    int64_t g = 0;
    for (int64_t i = i0; i < i1; ++i) {
      while (i >= first[g + 1]) ++g;
      const BackwardRun<T>& run = runs[g];
      const int64_t* idx = run.indices;
      const int64_t c = i - first[g];
      A* grad = static_cast<A*>(a.grad_cb[g]);
      if (sums[g] && by_row) {
        CodeOrder<A>& co = orders[g];
        A** p = piece[g].data();
        co.sort(a.Ks[g], [idx](int64_t n) { return idx[n]; });
        co.pieces(grad, p);
        co.zero_pieces(grad);
        for (int64_t n = 0; n < N; ++n) run.row(n, p[n]);
        co.finish(grad);
      } else if (sums[g]) {
        orders[g].sum_chunk(c, accs.data() + tid * Dp, grad, [idx](int64_t n) { return idx[n]; },
                            [&run](int64_t n, A* s) { run.row(n, s); });
      } else {
        for (int64_t n = c * kRowBlock, hi = std::min(N, n + kRowBlock); n < hi; ++n)
          run.row(n, nullptr);
      }
    }
  });
  if (!by_row)
    parallel_chunks(G, 1, threads, [&](int64_t g0, int64_t g1, int) {
      for (int64_t g = g0; g < g1; ++g)
        if (sums[g]) orders[g].finish(static_cast<A*>(a.grad_cb[g]));
    });
}


// ---------------------------------------------------------------------------------------------
// Residual VQ forward (fp32): every stage's codebook packed once per call, then row tiles handed
// out to the threads; each tile runs through all stages with its residual in cache
// (search_impl.h, residual_tiles).

void residual_forward(const ResidualArgs& a, int num_threads) {
  const int64_t N = a.x.n(), D = a.x.D, S = a.S;
  if (S <= 0) throw std::invalid_argument("vqkernels: residual VQ needs at least one stage");
  int64_t maxK = 0, sumK = 0;
  for (int64_t s = 0; s < S; ++s) {
    if (a.Ks[s] <= 0) throw std::invalid_argument("vqkernels: every stage needs K >= 1 codes");
    maxK = std::max(maxK, a.Ks[s]);
    sumK += a.Ks[s];
  }
  const cpu::SearchKernels* ks = &select_kernels(maxK, D);
  // The int8 tiers (avx2_i8, avx512_vnni_i8) are for single-stage and grouped calls: residual VQ
  // takes the int16 build each stands in front of, under the same per-stage rule below
  // (select_kernels(K_s, D).i16 is set for both). By identity, not by `i8`, so that each goes to
  // its own int16 build (and avx512_vnni_i8 does so whatever its flags).
#if defined(VQK_HAVE_AVX512_VNNI_I8) && defined(VQK_HAVE_AVX512_VNNI_I16)
  if (ks == &cpu::kernels_avx512_vnni_i8()) ks = &cpu::kernels_avx512_vnni_i16();
#endif
#if defined(VQK_HAVE_AVX2)
  if (ks == &cpu::kernels_avx2_i8()) ks = &cpu::kernels_avx2_i16();
#endif
  // avx512bf16 has no residual path (its proof is set up per call, not per stage): the fp32 build
  // of the same instruction set runs on any CPU it does. The x86 int16 builds (avx2_i16,
  // avx512_i16, avx512_vnni_i16) have one (search_i16_residual.h, residual_tiles_i16), which takes
  // its int16 pass per stage exactly where the single-stage search of that stage's (K_s, D) would
  // (below: the other stages get no int16 copy and run that build's fp32 search); neon_dot's runs
  // the fp32 search.
#if defined(VQK_HAVE_AVX512)
  if (!ks->residual && ks->bf16) ks = &cpu::kernels_avx512();
#endif
  if (!ks->residual) ks = &cpu::kernels_scalar();
  if (maxK + ks->nr >= ((int64_t)1 << 31))
    throw std::invalid_argument("vqkernels: the CPU kernel supports K < 2^31 codes");
  if (N == 0) return;
  // Each stage's codes as forward_packed's, less the int8 tier's (no byte codes, two code_aux
  // rows); ks->bf16 is never set here (no bf16 build has a residual path), so packed_bf16 holds the
  // int16 (int8: neon_dot) copy exactly where ks->i16 is.
  std::vector<CodePack> codes;
  std::vector<cpu::FwdJob> jobs;
  codes.reserve(S);
  jobs.reserve(S);
  const bool approx_only = debug_approx_only();
  for (int64_t s = 0; s < S; ++s) {
    codes.emplace_back(*ks, a.Ks[s], D, false);
    RowsOut none{nullptr, 0, 0, 0, 0, 0, 0};
    jobs.push_back(codes.back().job(DType::f32, a.x, a.codebooks[s], none, a.indices + s * N,
                                    a.sqerr + s * N, approx_only));
  }
  const int64_t tiles = (N + ks->mr - 1) / ks->mr;
  const double flops = 2.0 * (double)N * (double)sumK * (double)std::max<int64_t>(D, 1);
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(
      {(int64_t)std::max(num_threads, 1), tiles, 1 + (int64_t)(flops / kMinFlopsPerThread)}));
  for (int64_t s = 0; s < S; ++s) {
    cpu::FwdJob& job = jobs[s];
    pack_codebook(*ks, job, threads);
    // A stage the single-stage rule would search in fp32 (auto: K_s < 64) keeps only the fp32
    // panels: residual_tiles_i16 runs the fp32 search where packed_bf16 is null.
    if (ks->i16 && !select_kernels(job.K, D).i16) job.packed_bf16 = nullptr;
  }
  const cpu::ResidualJob rj{S, jobs.data(), a.active, a.zq, a.cosine != 0};
  const int64_t stride = (ks->residual_scratch_floats(D) + 15) / 16 * 16;
  auto scratch = aligned_array<float>(stride * threads);
  std::memset(scratch.get(), 0, sizeof(float) * stride * threads);  // per-thread counters
  struct Ctx {
    const cpu::ResidualJob* rj;
    const cpu::SearchKernels* ks;
    float* scratch;
    int64_t stride, tiles;
    std::atomic<int64_t> next{0};
  } ctx{&rj, ks, scratch.get(), stride, tiles};
  cpu::run_parallel(threads, [](void* p, int tid) {
    Ctx& c = *static_cast<Ctx*>(p);
    float* mine = c.scratch + tid * c.stride;
    for (;;) {
      const int64_t t = c.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= c.tiles) break;
      c.ks->residual(*c.rj, t, t + 1, mine);
    }
  }, &ctx);
}

// ---------------------------------------------------------------------------------------------
// Residual VQ backward (fp32): vqkernels.residual._ResidualFn.backward's stage loop (a gather of
// each stage's codes, the residual update and one cpu_backward per stage, each pass a fresh N x D
// tensor) as one pass over the rows per stage. The pass visits the rows in BackwardRun's order
// (sorted by code, cut into the same fixed chunks) and computes, per row, BackwardRun's own
// expressions -- grad_x = g + wc (r - e) (a copy where wc = 0), acc += wb (e - r) -- then the
// residual update r = r - e in place, so grad_x and every codebook sum are bitwise the loop's for
// any thread count. Rows that sit a stage out are the loop's `clamp(min=0)` rows: code 0 with
// weight 0, residual unchanged.

// One row's unit row u = x / den, as the forward's unit_tile (search_impl.h) and _unit_rows build
// it: den = the float64 sum of squares in d order, its square root rounded once to fp32, clamped
// at 1e-12 (clamp_min keeps NaN as NaN); each element one fp32 division. Returns den.
inline float unit_row(const float* __restrict x, int64_t D, float* __restrict u) {
  double ss = 0.0;
  for (int64_t d = 0; d < D; ++d) ss += (double)x[d] * (double)x[d];
  float den = (float)std::sqrt(ss);
  if (!(den >= 1e-12f) && den == den) den = 1e-12f;
  for (int64_t d = 0; d < D; ++d) u[d] = x[d] / den;
  return den;
}

// Cosine residual backward, one row's commitment term through the normalisation (see vqk.h,
// ResidualBackwardArgs::cosine): g += (g_u - u p) / den with g_u = wc (u - e) and p the float64
// dot of u and g_u in d order (0 where the norm was clamped), every product, difference and
// quotient rounded to fp32 on its own, as the stage loop in _ResidualFn.backward computes them
// with separate torch ops. GCC contracts a * b + c across statements by default where the target
// has fused multiply-add (aarch64), hence the attribute; clang contracts only within one
// expression, and each rounding below is its own statement.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void cosine_commit_row(const float* __restrict u, const float* __restrict e, float wc, float den,
                       int64_t D, float* __restrict g) {
  double p = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const float gu = wc * (u[d] - e[d]);
    p += (double)u[d] * (double)gu;  // exact product: fl32 x fl32 fits a double
  }
  const float pf = den > 1e-12f ? (float)p : 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float gu = wc * (u[d] - e[d]);
    const float up = u[d] * pf;
    const float v = gu - up;
    const float w = v / den;
    g[d] = g[d] + w;
  }
}

void residual_backward(const ResidualBackwardArgs& a, int num_threads) {
  const int64_t N = a.N, D = a.D, S = a.S;
  if (S <= 0) throw std::invalid_argument("vqkernels: residual VQ needs at least one stage");
  float* gx = a.grad_x;
  // The last stage whose gradient anything needs: later stages' residuals are never built.
  int64_t last = -1;
  for (int64_t s = 0; s < S; ++s) {
    if (a.Ks[s] <= 0) throw std::invalid_argument("vqkernels: every stage needs K >= 1 codes");
    if ((a.g_commit && gx) || (a.g_codebook && a.grad_cb[s])) last = s;
  }
  for (int64_t s = 0; s < S; ++s)
    if (a.grad_cb[s] && (!a.g_codebook || N == 0))
      std::fill(a.grad_cb[s], a.grad_cb[s] + a.Ks[s] * D, 0.0f);
  // ~2e5 values per thread; a cosine row costs ~3x a plain one (a norm, two divisions and a dot
  // per value: 13.9 against 5.2 ms for N 16384 x 12 stages x D 8 on one Ice Lake thread).
  const double work = (double)N * (double)std::max<int64_t>(D, 1) * (a.cosine ? 3.0 : 1.0);
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(
      num_threads, 1 + (int64_t)(work / 2.0e5)));
  if (N == 0) return;
  if (last < 0) {
    if (gx) {
      if (a.grad_zq) std::copy(a.grad_zq, a.grad_zq + N * D, gx);
      else std::fill(gx, gx + N * D, 0.0f);
    }
    return;
  }
  auto rbuf = aligned_array<float>(N * D);
  float* r = rbuf.get();
  // Cosine: each stage's unit rows (the forward's unit_tile, bit for bit: the float64 sum of
  // squares in d order, rounded once, clamped, one division).
  auto ubuf = a.cosine ? aligned_array<float>(N * D) : decltype(rbuf)();
  float* U = ubuf.get();
  parallel_chunks(N, 256, threads, [&](int64_t lo, int64_t hi, int) {
    std::copy(a.x + lo * D, a.x + hi * D, r + lo * D);
    if (gx) {
      if (a.grad_zq) std::copy(a.grad_zq + lo * D, a.grad_zq + hi * D, gx + lo * D);
      else std::fill(gx + lo * D, gx + hi * D, 0.0f);
    }
  });
  int64_t maxK = 0;
  for (int64_t s = 0; s <= last; ++s) maxK = std::max(maxK, a.Ks[s]);
  const int64_t Dp = std::max<int64_t>(D, 1);
  CodeOrder<float> co;  // BackwardRun::run's order, one stage at a time
  co.reserve(N, maxK, D);
  std::vector<float> accs(chunk_threads(co.chunks(), 1, threads) * Dp);
  for (int64_t s = 0; s <= last; ++s) {
    const float* cb = a.codebooks[s];
    const int64_t K = a.Ks[s];
    const int64_t* idx = a.indices + s * N;
    const float* gcm = a.g_commit && gx ? a.g_commit + s * N : nullptr;
    const float* gcb = a.g_codebook && a.grad_cb[s] ? a.g_codebook + s * N : nullptr;
    const bool update = s < last;
    // Cosine: first a pass over the rows in order (shared out to the threads) that writes each
    // row's unit row into U (every row where the codebook gradient is wanted, since the sums below
    // read U for weight-0 rows too) and adds its commitment term to gx; the rows' codebook sums
    // then read U. A stage with no codebook gradient updates the residual in this pass.
    auto unit_pass = [&](int64_t n) {
      const int64_t i = idx[n];
      const bool on = i >= 0;
      const float wc = gcm && on ? 2 * gcm[n] : 0.0f;
      if (wc == 0 && !gcb && !(update && on)) return;
      const float* __restrict e = cb + (on ? i : 0) * D;
      float* xr = r + n * D;
      if (wc != 0 || gcb) {
        float* u = U + n * D;
        const float den = unit_row(xr, D, u);
        if (wc != 0) cosine_commit_row(u, e, wc, den, D, gx + n * D);
      }
      if (!gcb && update && on)
        for (int64_t d = 0; d < D; ++d) xr[d] = xr[d] - e[d];
    };
    auto row = [&](int64_t n, float* acc) {
      const int64_t i = idx[n];
      const bool on = i >= 0;
      const float* __restrict e = cb + (on ? i : 0) * D;
      float* xr = r + n * D;
      const float* sr = a.cosine ? U + n * D : xr;  // the row the stage searched
      if (!a.cosine && gcm) {
        const float wc = on ? 2 * gcm[n] : 0.0f;
        if (wc != 0) {
          float* g = gx + n * D;
          for (int64_t d = 0; d < D; ++d) g[d] = g[d] + wc * (xr[d] - e[d]);
        }
      }
      if (acc) {
        const float wb = on ? 2 * gcb[n] : 0.0f;
        for (int64_t d = 0; d < D; ++d) acc[d] += wb * (e[d] - sr[d]);
      }
      if (update && on)
        for (int64_t d = 0; d < D; ++d) xr[d] = xr[d] - e[d];
    };
    if (a.cosine && (gcm || gcb || update))
      parallel_chunks(N, 64, threads, [&](int64_t lo, int64_t hi, int) {
        for (int64_t n = lo; n < hi; ++n) unit_pass(n);
      });
    if (!gcb) {
      if (!a.cosine && (gcm || update))
        parallel_chunks(N, 64, threads, [&](int64_t lo, int64_t hi, int) {
          for (int64_t n = lo; n < hi; ++n) row(n, nullptr);
        });
      continue;
    }
    // Rows that sit the stage out are the loop's clamp(min=0) rows: code 0, weight 0.
    auto code = [idx](int64_t n) { return idx[n] >= 0 ? idx[n] : int64_t(0); };
    co.sort(K, code);
    parallel_chunks(co.chunks(), 1, threads, [&](int64_t c0, int64_t c1, int tid) {
      float* acc = accs.data() + tid * Dp;
      for (int64_t c = c0; c < c1; ++c) co.sum_chunk(c, acc, a.grad_cb[s], code, row);
    });
    co.finish(a.grad_cb[s]);
  }
  for (int64_t s = last + 1; s < S; ++s)
    if (a.grad_cb[s]) std::fill(a.grad_cb[s], a.grad_cb[s] + a.Ks[s] * D, 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Residual VQ codebook statistics (see vqk.h, ResidualStatsArgs): one residual buffer updated in
// place, stage by stage. The sums are shared out by blocks of columns (each block adds every row
// in ascending n, so each (k, d) sum has index_add_'s order whatever the thread count); a cosine
// stage first writes the unit rows (rows shared out, the residual updated behind them).
// Measured (Ice Lake Xeon, 2 threads; N 16384 x 8 stages x K 1024 x D 128): 11 ms, where the
// module's stage loop of index_select / sub_ / bincount / index_add_ took ~33 ms. Tried first:
// blocks of 16 columns (one line per row: 17-20 ms, perf puts 43% of the samples on the load of
// a code's sums line; each stage's lines of a block are spread over a page per 8 codes), and
// every stage per block of rows with no residual buffer (slower still, in the backward's
// prototype of the same idea: the codes of all stages do not stay in cache).

// How many rows ahead residual_stats asks for the lines of a row's code and sums (plain rows).
// On a Zen 3 EPYC (family 25 model 1, 2 threads), ResidualVectorQuantizer's statistics for an
// EnCodec-like step (16384 x 8 stages x 1024 x 128), both builds in one process alternating, 30
// calls each way round: 0.87-0.90x the time without (16-18 against 18.5-19 ms). The cosine path
// has no such loop (its sums, K x 8 floats at DAC's shape, stay in L1); there the same pair of
// builds measured 1.03-1.04x, with that code unchanged.
constexpr int64_t kStatsAhead = 8;

void residual_stats(const ResidualStatsArgs& a, int num_threads) {
  const int64_t N = a.N, D = a.D, S = a.S;
  if (S <= 0) throw std::invalid_argument("vqkernels: residual VQ needs at least one stage");
  if (a.grouped && a.cosine)
    throw std::invalid_argument("vqkernels: residual stats: grouped rows are not cosine");
  // Stage s's restart candidates wanted: cand_n[s] rows into cand[s].
  const auto cands = [&a](int64_t s) {
    return a.cand_rows && a.cand_rows[s] && a.cand && a.cand[s] && a.cand_n && a.cand_n[s] > 0;
  };
  int64_t last = -1;
  for (int64_t s = 0; s < S; ++s) {
    if (a.Ks[s] <= 0) throw std::invalid_argument("vqkernels: every stage needs K >= 1 codes");
    if (cands(s))
      for (int64_t j = 0; j < a.cand_n[s]; ++j)
        if (a.cand_rows[s][j] < 0 || a.cand_rows[s][j] >= N)
          throw std::invalid_argument("vqkernels: residual stats: a candidate row out of range");
    if (a.sums[s]) std::fill(a.sums[s], a.sums[s] + a.Ks[s] * D, 0.0f);
    if (a.counts[s]) std::fill(a.counts[s], a.counts[s] + a.Ks[s], int64_t(0));
    if (a.sums[s] || a.counts[s] || cands(s)) last = s;
  }
  if (N == 0 || last < 0) return;
  for (int64_t s = 0; s <= last; ++s) {
    const int64_t* idx = a.indices + s * N;
    const bool* take = a.take + s * N;
    for (int64_t n = 0; n < N; ++n)
      if (take[n] && (idx[n] < 0 || idx[n] >= a.Ks[s]))
        throw std::invalid_argument("vqkernels: residual stats: a row taken with no code");
    if (a.counts[s])
      for (int64_t n = 0; n < N; ++n)
        if (take[n]) ++a.counts[s][idx[n]];
  }
  if (D == 0) return;
  // The last stage whose rows are wanted (sums or candidates): the residual is kept up to it.
  int64_t last_sum = -1;
  for (int64_t s = 0; s <= last; ++s)
    if (a.sums[s] || cands(s)) last_sum = s;
  if (last_sum < 0) return;
  // Stage s's candidates from its input rows (row(n): r_s of row n), before the stage's update:
  // the row itself, or its unit row when cosine (unit_row: the sums' bits), 0 where not taken.
  const auto take_cands = [&](int64_t s, const auto& row) {
    if (!cands(s)) return;
    const bool* take = a.take + s * N;
    for (int64_t j = 0; j < a.cand_n[s]; ++j) {
      const int64_t n = a.cand_rows[s][j];
      float* out = a.cand[s] + j * D;
      const float* xr = row(n);
      if (!take[n])
        std::fill(out, out + D, 0.0f);
      else if (a.cosine)
        unit_row(xr, D, out);
      else
        std::copy(xr, xr + D, out);
    }
  };
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(
      num_threads, 1 + (int64_t)((double)N * (double)D * (a.cosine ? 3.0 : 1.0) / 2.0e5)));
  // Columns are shared out in one block per thread (whole 64-byte lines): each block adds every
  // row in ascending n, so each (k, d) sum has index_add_'s order whatever the thread count.
  const int64_t lines = (D + 15) / 16;
  const int64_t kCols = 16 * std::max<int64_t>(1, (lines + threads - 1) / threads);
  const int64_t blocks = (D + kCols - 1) / kCols;
  if (!a.cosine) {
    // Stage by stage over one residual buffer, updated in place (grouped: straight from x's
    // columns); each stage's sums and codes (K x D each) stay in cache while the rows stream past.
    auto rbuf = aligned_array<float>(a.grouped ? 0 : N * D);
    float* r = rbuf.get();
    if (!a.grouped)
      parallel_chunks(N, 256, threads, [&](int64_t lo, int64_t hi, int) {
        std::copy(a.x + lo * D, a.x + hi * D, r + lo * D);
      });
    const int64_t rs = a.grouped ? S * D : D;  // row stride of the rows read
    for (int64_t s = 0; s <= last_sum; ++s) {
      const float* cb = a.codebooks[s];
      const int64_t* idx = a.indices + s * N;
      const bool* take = a.take + s * N;
      float* sums = a.sums[s];
      const bool update = !a.grouped && s < last_sum;
      float* rows = a.grouped ? const_cast<float*>(a.x) + s * D : r;  // grouped: only read
      take_cands(s, [&](int64_t n) { return rows + n * rs; });
      if (!sums && !update) continue;
      parallel_chunks(blocks, 1, (int)blocks, [&](int64_t b0, int64_t b1, int) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t c0 = b * kCols, w = std::min(D, c0 + kCols) - c0;
          for (int64_t n = 0; n < N; ++n) {
            const int64_t k = idx[n];
            float* __restrict xr = rows + n * rs + c0;
            if (n + kStatsAhead < N) {
              // The lines row n + kStatsAhead will add into and subtract, asked for now: they are
              // at random places (its code's), and the stage's sums and codes (2 K D floats) do
              // not stay in L2 at EnCodec's K = 1024, D = 128.
              const int64_t m = n + kStatsAhead, km = idx[m];
              if (sums && take[m])
                for (int64_t d = 0; d < w; d += 16) __builtin_prefetch(sums + km * D + c0 + d, 1);
              if (update && km >= 0)
                for (int64_t d = 0; d < w; d += 16) __builtin_prefetch(cb + km * D + c0 + d, 0);
            }
            if (sums && take[n]) {
              float* __restrict sk = sums + k * D + c0;
              for (int64_t d = 0; d < w; ++d) sk[d] = sk[d] + xr[d];
            }
            if (update && k >= 0) {
              const float* __restrict e = cb + k * D + c0;
              for (int64_t d = 0; d < w; ++d) xr[d] = xr[d] - e[d];
            }
          }
        }
      });
    }
    return;
  }
  // Cosine: a stage's unit rows need whole rows: one residual buffer, and per stage the unit rows
  // (rows shared out, the residual updated behind them), then the sums by blocks of columns.
  auto rbuf = aligned_array<float>(N * D);
  float* r = rbuf.get();
  auto ubuf = aligned_array<float>(N * D);
  float* U = ubuf.get();
  parallel_chunks(N, 256, threads, [&](int64_t lo, int64_t hi, int) {
    std::copy(a.x + lo * D, a.x + hi * D, r + lo * D);
  });
  for (int64_t s = 0; s <= last_sum; ++s) {
    const float* cb = a.codebooks[s];
    const int64_t* idx = a.indices + s * N;
    const bool* take = a.take + s * N;
    float* sums = a.sums[s];
    const bool update = s < last_sum;
    take_cands(s, [&](int64_t n) { return r + n * D; });
    parallel_chunks(N, 64, threads, [&](int64_t lo, int64_t hi, int) {
      for (int64_t n = lo; n < hi; ++n) {
        float* xr = r + n * D;
        if (sums && take[n]) {
          unit_row(xr, D, U + n * D);
        }
        if (update && idx[n] >= 0) {
          const float* e = cb + idx[n] * D;
          for (int64_t d = 0; d < D; ++d) xr[d] = xr[d] - e[d];
        }
      }
    });
    if (!sums) continue;
    parallel_chunks(blocks, 1, (int)std::min<int64_t>(threads, blocks),
                    [&](int64_t b0, int64_t b1, int) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * kCols, c1 = std::min(D, c0 + kCols);
        for (int64_t n = 0; n < N; ++n) {
          if (!take[n]) continue;
          float* __restrict sk = sums + idx[n] * D;
          const float* __restrict u = U + n * D;
          for (int64_t d = c0; d < c1; ++d) sk[d] = sk[d] + u[d];
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Grouped VQ forward (fp32): G independent single-stage searches over column slices of one N x
// (G d) input, one call. Every group's codebook is packed first; then (row tile, group) pairs are
// handed out tile-major to the threads, each searched by the single-stage kernels the search of
// the largest group would pick (the same proof and exact re-search). Each thread keeps one
// scratch per group and finishes each group's set-aside rows (flush) against that group's
// codebook at the end, so set-aside rows never meet the wrong codebook.

void grouped_forward(const GroupedArgs& a, int num_threads) {
  const int64_t N = a.x.n(), G = a.G;
  if (G <= 0 || a.x.D % G)
    throw std::invalid_argument("vqkernels: grouped VQ needs G >= 1 groups dividing D");
  const int64_t d = a.x.D / G;
  int64_t maxK = 0, sumK = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (a.Ks[g] <= 0) throw std::invalid_argument("vqkernels: every group needs K >= 1 codes");
    maxK = std::max(maxK, a.Ks[g]);
    sumK += a.Ks[g];
  }
  // The kernels the single-stage search picks for the largest group (reduced-precision first
  // passes included: each group's job gets their packed copies and bounds, as forward_packed's).
  // The int8 tiers (avx2_i8, avx512_vnni_i8) included: each group's job gets its byte codes and
  // int8 scales as forward_packed's does.
  const cpu::SearchKernels* ks = &select_kernels(maxK, d);
  if (maxK + ks->nr >= ((int64_t)1 << 31))
    throw std::invalid_argument("vqkernels: the CPU kernel supports K < 2^31 codes");
  if (N == 0) {
    if (a.counts) std::fill(a.counts, a.counts + sumK, int64_t(0));
    return;
  }
  std::vector<CodePack> codes;
  std::vector<cpu::FwdJob> jobs;
  codes.reserve(G);
  jobs.reserve(G);
  const bool approx_only = debug_approx_only();
  for (int64_t g = 0; g < G; ++g) {
    codes.emplace_back(*ks, a.Ks[g], d, ks->i8);
    Rows x = a.x;
    x.ptr = static_cast<const float*>(a.x.ptr) + g * d * a.x.sd;
    x.D = d;
    RowsOut zq = a.zq;
    if (zq.ptr) zq.ptr = static_cast<float*>(a.zq.ptr) + g * d * a.zq.sd;
    zq.D = d;
    jobs.push_back(codes.back().job(DType::f32, x, a.codebooks[g], zq, a.indices + g * N,
                                    a.sqerr + g * N, approx_only));
  }
  const int64_t tiles = (N + ks->mr - 1) / ks->mr, items = G * tiles;
  const double flops = 2.0 * (double)N * (double)sumK * (double)std::max<int64_t>(d, 1);
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(
      {(int64_t)std::max(num_threads, 1), items, 1 + (int64_t)(flops / kMinFlopsPerThread)}));
  for (int64_t g = 0; g < G; ++g) pack_codebook(*ks, jobs[g], threads);
  // Row-tile-major hand-out: a thread searches one tile of rows against every group in turn,
  // so the tile's full input rows and output rows are used while in cache (group-major order
  // read 1/G of every row and came back for the rest). Each (thread, group) pair has its own
  // scratch, so set-aside rows wait for their own group's batch and meet only its codebook.
  const int64_t stride = (ks->scratch_floats(d) + 15) / 16 * 16;
  auto scratch = aligned_array<float>(stride * threads * G);
  std::memset(scratch.get(), 0, sizeof(float) * stride * threads * G);
  struct Ctx {
    const cpu::FwdJob* jobs;
    const cpu::SearchKernels* ks;
    float* scratch;
    int64_t stride, G, items;
    std::atomic<int64_t> next{0};
  } ctx{jobs.data(), ks, scratch.get(), stride, G, items};
  cpu::run_parallel(threads, [](void* p, int tid) {
    Ctx& c = *static_cast<Ctx*>(p);
    float* mine = c.scratch + tid * c.G * c.stride;
    for (;;) {
      const int64_t i = c.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= c.items) break;
      const int64_t t = i / c.G, g = i - t * c.G;
      c.ks->search(c.jobs[g], t, t + 1, mine + g * c.stride);
    }
    for (int64_t g = 0; g < c.G; ++g) c.ks->flush(c.jobs[g], mine + g * c.stride);
  }, &ctx);
  if (a.counts)
    for (int64_t g = 0, lo = 0; g < G; lo += a.Ks[g++])
      count_codes(a.indices + g * N, N, a.Ks[g], a.counts + lo);
}

}  // namespace

const char* cpu_isa() { return select_kernels(kBf16MinK, kBf16MinD).name; }

void cpu_forward(const ForwardArgs& a, int num_threads) {
  cpu::IeeeDenormals ieee;  // the caller's flush-to-zero mode is off until return
  if (a.dtype == DType::f64) return forward_f64(a, std::max(num_threads, 1));
  forward_packed(a, std::max(num_threads, 1));
}

void cpu_residual_forward(const ResidualArgs& a, int num_threads) {
  cpu::IeeeDenormals ieee;  // the caller's flush-to-zero mode is off until return
  residual_forward(a, std::max(num_threads, 1));
}

void cpu_residual_backward(const ResidualBackwardArgs& a, int num_threads) {
  cpu::IeeeDenormals ieee;  // the caller's flush-to-zero mode is off until return
  residual_backward(a, std::max(num_threads, 1));
}

void cpu_residual_stats(const ResidualStatsArgs& a, int num_threads) {
  cpu::IeeeDenormals ieee;  // the caller's flush-to-zero mode is off until return
  residual_stats(a, std::max(num_threads, 1));
}

void cpu_grouped_forward(const GroupedArgs& a, int num_threads) {
  cpu::IeeeDenormals ieee;  // the caller's flush-to-zero mode is off until return
  grouped_forward(a, std::max(num_threads, 1));
}

void cpu_backward(const BackwardArgs& a, int num_threads) {
  cpu::IeeeDenormals ieee;  // the caller's flush-to-zero mode is off until return
  num_threads = std::max(num_threads, 1);
  switch (a.dtype) {
    case DType::f32: return BackwardRun<F32>(a).run(num_threads, a.grad_cb);
    case DType::f64: return BackwardRun<F64>(a).run(num_threads, a.grad_cb);
    case DType::f16: return BackwardRun<F16>(a).run(num_threads, a.grad_cb);
    case DType::bf16: return BackwardRun<BF16>(a).run(num_threads, a.grad_cb);
  }
}

void cpu_grouped_backward(const GroupedBackwardArgs& a, int num_threads) {
  cpu::IeeeDenormals ieee;  // the caller's flush-to-zero mode is off until return
  num_threads = std::max(num_threads, 1);
  switch (a.dtype) {
    case DType::f32: return grouped_backward_t<F32>(a, num_threads);
    case DType::f64: return grouped_backward_t<F64>(a, num_threads);
    case DType::f16: return grouped_backward_t<F16>(a, num_threads);
    case DType::bf16: return grouped_backward_t<BF16>(a, num_threads);
  }
}

}  // namespace vqk
