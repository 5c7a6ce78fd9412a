// AArch64 NEON (Advanced SIMD) instantiation of the fused search. NEON, fp32 FMA and the fp16 <->
// fp32 conversions are part of the AArch64 baseline, so this file needs no extra compiler flags and
// is the default on aarch64 (vq_cpu.cpp still checks HWCAP_ASIMD at run time, for the odd kernel
// that hides it); VQK_CPU_ISA=scalar keeps the portable build reachable.
//
// Tile: 5 x 4 rows against panels of 4 codes = 20 accumulators, plus 5 row vectors and the
// panel's 4 floats (GCC loads them as scalars and multiplies by element, FMLA v.4s, v.s[0]):
// 29 of the 32 vector registers, no spills in the inner loop (checked in the
// generated code: 20 FMLA and 6 loads per step of d). 20 independent FMA chains cover a 4-cycle
// FMA latency on 4 pipes (Neoverse V1/V2, Apple cores). 6 x 4 (24 + 6 + 4 registers) spills under
// GCC 12, because the panel's floats take a register each; 4 x 5 also fits, but NR = 4 leaves no
// padded codes for the usual power-of-two K, and 4 codes per panel match the AVX2 build.
//
// The SIMD traits (simd_neon.h) are shared with the int8 dot-product first pass (search_neon_dot.cpp).
// Speed on real ARM hardware has not been measured: this project tests it under qemu-user only.
#include "cpu_internal.h"
#include "simd_neon.h"

namespace vqk {
namespace {

constexpr int MRV = 5;
constexpr int NR = 4;

}  // namespace
}  // namespace vqk

#include "search_impl.h"

namespace vqk {
namespace cpu {
const SearchKernels& kernels_neon() {
  static const SearchKernels k{"neon", MR, NR, pack_any, search_any, flush_exact,
                                  scratch_floats, false, false, residual_tiles,
                                  residual_scratch_floats};
  return k;
}
}  // namespace cpu
}  // namespace vqk
