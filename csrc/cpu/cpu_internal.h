// Internal interface between the CPU orchestration (vq_cpu.cpp, built with the baseline flags) and
// the ISA-specific search kernels (search_avx512.cpp, search_avx2.cpp, search_neon.cpp,
// search_scalar.cpp, each built with its own -m flags).
//
// This header must stay free of inline functions and templates: it is included by translation units
// compiled for different instruction sets, and an inline function instantiated in an AVX-512 unit
// could be the copy the linker keeps for everybody (a SIGILL on a machine without AVX-512). Only
// plain structs and function declarations cross the boundary.
#pragma once
#include <cstdint>

#include "vqk/vqk.h"

namespace vqk {
namespace cpu {

// One forward call, as the search kernels see it. The codebook is packed once per call into panels
// of `nr` codes: panel p holds codes p*nr .. p*nr+nr-1 as [D][nr] floats (d-major, so the micro-kernel
// reads one float per code per step), and `norms` holds ||e_k||^2 for every padded code (+inf for
// the padding, so a padded code can never win).
struct FwdJob {
  DType dtype;             // f32, f16 or bf16 (f64 takes the plain path)
  Rows x;
  const void* codebook;    // K x D, row-major, in `dtype`
  int64_t K, D;
  RowsOut zq;              // ptr may be null
  int64_t* indices;
  float* sqerr;
  float* packed;           // panels * D * nr floats, 64-byte aligned
  float* norms;            // panels * nr floats
  int64_t panels;
  // Only for kernels with `bf16` set: the panels again as bf16 pairs (panels * ceil(D/2) * nr
  // 32-bit words, element d of code k in the low half of word (d/2), d+1 in the high half).
  uint32_t* packed_bf16;
  // An upper bound of max ||e_k|| over the finite codes (+inf if a finite code's fp32 norm
  // overflows), for the proofs' error bounds; and the debug switch VQK_DEBUG_APPROX_ONLY=1, which
  // skips the proof and the exact re-search (tests use it to show the re-search is needed).
  double max_code_norm;
  bool approx_only;
  // The proof's quick form, per call (search_impl.h, `search_block`): a row is proven when
  // fl(v2 - v1) > quick_a + quick_b * fl(||x||^2), a bound linear in ||x||^2 that never undercuts
  // `decide`'s; +inf when E is out of range (then only `decide` runs).
  float quick_a, quick_b;
  // Only for kernels with `i16` set (search_avx2_i16.cpp, search_avx512_i16.cpp; search_neon_dot.cpp, whose int8 quads
  // take packed_bf16 as [panel][ceil(D/4)][nr] words): packed_bf16 then holds int16 pairs
  // (the same layout), and code_aux 2 * panels * nr floats: each code's power-of-two scale, then an
  // upper bound of its L1 norm (both 0 for padding). vq_cpu.cpp fills the two maxima over the
  // finite codes after packing.
  float* code_aux = nullptr;
  double max_code_scale = 0.0, max_code_l1 = 0.0;
  // Only for kernels with `i8` set (the int8 tiers, search_i8_common.h; they also set `i16`): the
  // codes as bytes (panels * ceil(D/8) * nr * 2 words), code_aux then 3 * panels * nr floats (the
  // int8 scales last) and max_code_scale8 their maximum over the finite codes.
  uint32_t* packed_i8 = nullptr;
  double max_code_scale8 = 0.0;
  // Every code finite (no NaN norm; vq_cpu.cpp, pack_codebook): the AVX2 small-D tile then takes
  // each panel's minimum first (search_impl.h, VQK_PANEL_MIN).
  bool codes_finite = false;
};

// What one instruction set provides. `search` handles row tiles [tile_lo, tile_hi) of `mr` rows
// each, using `scratch` (scratch_floats(D) floats, 64-byte aligned, private to the calling thread).
struct SearchKernels {
  const char* name;
  int mr;  // rows per tile
  int nr;  // codes per panel
  void (*pack)(const FwdJob& job, int64_t panel_lo, int64_t panel_hi);
  void (*search)(const FwdJob& job, int64_t tile_lo, int64_t tile_hi, float* scratch);
  // Called once by every thread after its last tile: finishes rows a kernel set aside (the bf16
  // search defers rows it cannot decide to an exact fp32 pass). scratch starts zeroed.
  void (*flush)(const FwdJob& job, float* scratch);
  int64_t (*scratch_floats)(int64_t D);
  bool bf16;  // wants packed_bf16 and max_code_norm
  bool i16 = false;  // wants packed_bf16 (as int16 pairs or int8 quads), code_aux and its maxima
  // Residual VQ (issue 17), fp32 rows: row tiles [tile_lo, tile_hi) through every stage, with
  // residual_scratch_floats(D) floats of 64-byte aligned scratch private to the thread (zeroed
  // at the start of a call). Null in a build that has none (avx512bf16, avx512_i16,
  // avx512_vnni_i16: the caller takes the plain avx512 build's). avx2_i16's (residual_tiles_i16) runs its int16 pass on the stages whose
  // packed_bf16 is set and the fp32 search on the others.
  void (*residual)(const struct ResidualJob& job, int64_t tile_lo, int64_t tile_hi, float* scratch);
  int64_t (*residual_scratch_floats)(int64_t D);
  bool i8 = false;  // wants packed_i8 and the int8 scales too (see FwdJob)
};

// One residual-VQ forward (fp32): S stages, each a FwdJob holding that stage's packed codebook,
// proof constants and outputs (indices and sqerr: the stage's N-row slices; its x is the input,
// its zq unused). Stage s searches the fp32 residual r_s = fl(r_{s-1} - e_{s-1}), r_0 = x.
struct ResidualJob {
  int64_t S;
  const FwdJob* stages;
  // Stages row n takes part in (s < active[n]); later stages write index -1 and error 0 and leave
  // the residual and the sum alone. Null: every stage.
  const int64_t* active;
  // N x D row-major: the sum of the chosen codes, fl(((0 + e_0) + e_1) + ...), NaN from the first
  // stage whose exact error is not finite. May be null.
  float* zq;
  // Cosine: stage s searches r_s / ||r_s|| (search_impl.h, unit_tile) against unit codes.
  bool cosine = false;
};

// Each exists when CMake built it (VQK_HAVE_*: the AVX builds when the compiler had the flags,
// x86-64 only; the NEON build on aarch64, where it needs no flags).
const SearchKernels& kernels_scalar();
const SearchKernels& kernels_avx2();
const SearchKernels& kernels_avx2_small();  // the same on 2 x 8-row tiles, for small D (vq_cpu.cpp)
const SearchKernels& kernels_avx2_i16();
const SearchKernels& kernels_avx2_i8();   // int8 tier in front of avx2_i16 (single-stage forward)
const SearchKernels& kernels_avx512();
const SearchKernels& kernels_avx512bf16();
const SearchKernels& kernels_avx512_i16();       // int16 first pass on 512-bit registers
const SearchKernels& kernels_avx512_vnni_i16();  // the same with AVX512_VNNI's vpdpwssd
const SearchKernels& kernels_avx512_vnni_i8();   // int8 tier (vpdpbusd) in front of avx512_vnni_i16
const SearchKernels& kernels_neon();
const SearchKernels& kernels_neon_dot();  // VQK_HAVE_NEON_DOT: built with +dotprod

// Rows the exact re-search has measured since the module loaded (all threads; tests and
// benchmarks read it around a call).
extern int64_t g_exact_rows;
// Rows a reduced-precision first pass set aside for the fp32 search (same use).
extern int64_t g_set_aside_rows;
// Rows the neon_dot pass settled by an fp32 check of its candidate codes (same use).
extern int64_t g_rechecked_rows;
// Rows the int8 tiers (avx2_i8, avx512_vnni_i8) settled themselves (proven from int8 dot products;
// same use).
extern int64_t g_int8_rows;

// Persistent worker pool. Runs fn(ctx, tid) for the caller as tid 0 and for each worker tid in
// [1, nthreads) that starts before the caller's own fn returns (a worker still waiting for a core
// then is not waited for), and returns when all those are done. So fn must hand out its work
// dynamically: tid 0 alone must be able to finish it. One call at a time; a concurrent caller
// waits for the pool. Under cpu_use_openmp (vqk.h) the region runs on that OpenMP runtime's team
// instead (tids 0 .. team size - 1; concurrent callers get teams of their own).
void run_parallel(int nthreads, void (*fn)(void* ctx, int tid), void* ctx);

// Gradual underflow for the life of the object on this thread, the caller's mode restored after.
// Flush-to-zero and denormals-are-zero (x86 MXCSR FTZ and DAZ; aarch64 FPCR FZ, FZ16 and FIZ)
// are per thread: torch.set_flush_denormal(True) sets them on the calling thread only, so a
// search split over threads would read subnormal values as 0 on some tiles and not on others
// (the answer would depend on the thread count), and the exact re-search, which compares float64
// distances of the values themselves, would see ties where there are none (every exact distance
// of rows and codes near 1e-40 flushed to 0: index 0 for nearly every row). Every entry point
// (vq_cpu.cpp) and every thread of run_parallel holds one.
class IeeeDenormals {
 public:
  IeeeDenormals();
  ~IeeeDenormals();
  IeeeDenormals(const IeeeDenormals&) = delete;
  IeeeDenormals& operator=(const IeeeDenormals&) = delete;

 private:
  uint64_t saved_ = 0;
  bool changed_ = false;
};

}  // namespace cpu
}  // namespace vqk
