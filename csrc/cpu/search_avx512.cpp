// AVX-512 (F, BW, VL, DQ) instantiation of the fused search. Built with per-file -mavx512* flags
// (CMakeLists.txt) and only called after a run-time CPU check (vq_cpu.cpp).
//
// Tile: 3 x 16 rows against panels of 8 codes = 24 zmm accumulators; with the 3 row vectors that is
// 27 of the 32 zmm registers, the code broadcasts are folded into the FMAs ({1to16} memory operands),
// and each step of D does 24 FMAs for 3 vector loads and 8 broadcasts, well under the load ports'
// rate, so the two FMA pipes stay busy. Eight codes per panel also divide every power-of-two K.
#include "cpu_internal.h"

#include "simd_avx512.h"

namespace vqk {
namespace {

constexpr int MRV = 3;
constexpr int NR = 8;

}  // namespace
}  // namespace vqk

#include "search_impl.h"

namespace vqk {
namespace cpu {
const SearchKernels& kernels_avx512() {
  static const SearchKernels k{"avx512", MR, NR, pack_any, search_any, flush_exact,
                                  scratch_floats, false, false, residual_tiles,
                                  residual_scratch_floats};
  return k;
}
}  // namespace cpu
}  // namespace vqk
