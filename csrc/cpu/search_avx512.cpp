// AVX-512 (F, BW, VL, DQ) instantiation of the fused search. Built with per-file -mavx512* flags
// (CMakeLists.txt) and only called after a run-time CPU check (vq_cpu.cpp). The tile (3 x 16 rows
// against panels of 8 codes) and why: search_avx512_tile.h, shared with the other AVX-512 builds.
#include "search_avx512_tile.h"

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
