// AVX2 + FMA (+ F16C) fp32 search for small D (vq_cpu.cpp, select_kernels: D <= kAvx2SmallMaxD),
// the same search as search_avx2.cpp on a tile of 2 x 8 rows (its 3 x 8 gives way). Built with the
// same flags.
//
// Why a second tile: at small D a panel's dots are a few FMAs per code and the best-two update
// after them (a compare, a min, a max, a min and a blend per row vector and code) weighs as much.
// With 3 row vectors the 12 accumulators, 3 rows and the broadcast take all 16 ymm registers and
// the 9 best-two vectors (b1, b2, k1 per row vector) go back and forth to the stack; with 2 the 8
// accumulators, 2 rows and the broadcast leave more room for the 6 (GCC 12 -O3: 12-22 ymm stack
// loads and stores in the 60 lines of assembly after each dots loop of the 3 x 8 build, 2-8 in
// this one's). Measured on a Zen 3 EPYC (family 25 model 1, 2 threads on torch's OpenMP pool,
// benchmarks/ab_native.py: both builds in one process, calls alternating, three pairs of runs
// with each build as the baseline in turn; benchmarks/results/avx2-small-tile-zen3-2026-12-04.md),
// this build's time over the 3 x 8 one's, median of the six runs' paired medians: nearest_code
// on rows near codes 0.93-0.94x at 16384 x {1024, 16384} x 8 and x 1024 x 4 (below 1 in every
// run), on randn rows 0.96x at 16384 x 16384 x 8 and 16384 x 1024 x 4 (every run) and 1.00x at
// 16384 x 1024 x 8 (0.94-1.01); a DAC-like residual_vq (12 stages x 1024 x 8, cosine) 0.92x
// (0.91-0.98, every run). At D = 16 0.99-1.00x: the rule stops at D = 8 (kAvx2SmallMaxD); the
// controls (D = 32 and 64, where both builds run the same code) 0.99-1.01x. The dots are the same
// FMAs in the same order per lane: the same answers.
#include "cpu_internal.h"
#include "simd_avx2.h"

namespace vqk {
namespace {

constexpr int MRV = 2;
constexpr int NR = 4;

}  // namespace
}  // namespace vqk

// Each panel's minimum first, then one best-two update per panel (search_impl.h, VQK_PANEL_MIN:
// the same k1, v1 and v2, so the same answers), on calls whose codes are all finite. At small D
// the update is a third of the tile (session 19's harness); this cuts it from NR updates of five
// operations to NR - 1 mins and one update, plus a per-lane recomputation of the best panel's NR
// values after the panels. Measured on the Zen 3 EPYC (family 25 model 1, 2 threads;
// benchmarks/ab_native.py, both builds in one process, calls alternating;
// benchmarks/results/avx2-panel-min-zen3-2026-12-04.md, two runs, each build the baseline once),
// its time over the per-code update's: nearest_code 16384 x 16384 x 8 0.84-0.88, 16384 x 1024 x 8
// 0.94-1.00, 16384 x 1024 x 4 0.91-0.97, a DAC-like residual_vq 0.96-0.98 (at K = 1024 the
// recomputation takes back most of the gain); D = 16 (the same code in both) 0.98-1.02.
#define VQK_PANEL_MIN 1

#include "search_impl.h"

namespace vqk {
namespace cpu {
const SearchKernels& kernels_avx2_small() {
  static const SearchKernels k{"avx2", MR, NR, pack_any, search_any, flush_exact,
                                  scratch_floats, false, false, residual_tiles,
                                  residual_scratch_floats};
  return k;
}
}  // namespace cpu
}  // namespace vqk
