// AVX2 + FMA (+ F16C) instantiation of the fused search. Built with per-file -mavx2 -mfma -mf16c
// (CMakeLists.txt) and only called after a run-time CPU check (vq_cpu.cpp).
//
// Tile: 3 x 8 rows against panels of 4 codes = 12 ymm accumulators, plus 3 row vectors and one
// broadcast register: all 16 ymm registers, no spills in the inner loop. Twelve independent FMA
// chains cover the FMA latency (4-5 cycles) times two pipes.
#include "cpu_internal.h"
#include "simd_avx2.h"

namespace vqk {
namespace {

constexpr int MRV = 3;
constexpr int NR = 4;

}  // namespace
}  // namespace vqk

#include "search_impl.h"

namespace vqk {
namespace cpu {
const SearchKernels& kernels_avx2() {
  static const SearchKernels k{"avx2", MR, NR, pack_any, search_any, flush_exact,
                                  scratch_floats, false, false, residual_tiles,
                                  residual_scratch_floats};
  return k;
}
}  // namespace cpu
}  // namespace vqk
