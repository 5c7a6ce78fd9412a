// Portable instantiation of the fused search: one lane, 4 rows x 4 codes of scalar accumulators
// (the compiler may still vectorise what it can for the baseline ISA). Used on CPUs without AVX2
// and FMA, on other architectures, and when VQK_CPU_ISA=scalar.
#include <cstdint>

#include "cpu_internal.h"
#include "vqk/common.h"  // baseline flags here, so sharing the header's inline helpers is safe

namespace vqk {
namespace {

struct V {
  static constexpr int W = 1;
  using F = float;
  using I = int32_t;
  using M = bool;
  static inline F zero() { return 0.0f; }
  static inline F set1(float v) { return v; }
  static inline I set1i(int32_t v) { return v; }
  static inline F load(const float* p) { return *p; }
  static inline void store(float* p, F v) { *p = v; }
  static inline I loadi(const int32_t* p) { return *p; }
  static inline void storei(int32_t* p, I v) { *p = v; }
  static inline F fmadd(F a, F b, F c) { return a * b + c; }
  static inline F fnmadd(F a, F b, F c) { return c - a * b; }
  static inline F sub(F a, F b) { return a - b; }
  static inline F add(F a, F b) { return a + b; }
  static inline float hsum(F a) { return a; }
  static constexpr bool kNanSecondMinMax = false;  // no min/max here: top2_update selects
  static inline M lt(F a, F b) { return a < b; }  // false when either is NaN
  static inline F sel(M m, F t, F f) { return m ? t : f; }
  static inline I seli(M m, I t, I f) { return m ? t : f; }
  static inline F gather(const float* base, I off) { return base[off]; }
  static inline float half_to_float(uint16_t h) { return vqk::half_to_float(h); }
  // One lane: n is always 1 here.
  static inline F load_f32(const float* p, int64_t) { return *p; }
  static inline void store_f32(float* p, F v, int64_t) { *p = v; }
  static inline F load_f16(const uint16_t* p, int64_t) { return vqk::half_to_float(*p); }
  static inline void store_f16(uint16_t* p, F v, int64_t) { *p = vqk::float_to_half(v); }
  static inline F load_bf16(const uint16_t* p, int64_t) { return vqk::bf16_to_float(*p); }
  static inline void store_bf16(uint16_t* p, F v, int64_t) { *p = vqk::float_to_bf16(v); }
  static inline void transpose(F*) {}
};

constexpr int MRV = 4;
constexpr int NR = 4;

}  // namespace
}  // namespace vqk

#include "search_impl.h"

namespace vqk {
namespace cpu {
const SearchKernels& kernels_scalar() {
  static const SearchKernels k{"scalar", MR, NR, pack_any, search_any, flush_exact,
                                  scratch_floats, false, false, residual_tiles,
                                  residual_scratch_floats};
  return k;
}
}  // namespace cpu
}  // namespace vqk
