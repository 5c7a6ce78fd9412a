// AVX-512 (F, BW, VL, DQ) traits for search_impl.h, shared by the AVX-512 search builds through
// search_avx512_tile.h (search_avx512.cpp, search_avx512_i16.cpp, search_avx512bf16.cpp). Internal
// linkage only: see search_impl.h.
#pragma once
#if defined(VQK_SIMDE)
#include "simde_avx512.h"  // the emulated build of .ci/native_checks.sh x86-emulated only
#else
#include <immintrin.h>
#endif

#include <cstdint>

namespace vqk {
namespace {

struct V {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F set1(float v) { return _mm512_set1_ps(v); }
  static inline I set1i(int32_t v) { return _mm512_set1_epi32(v); }
  static inline F load(const float* p) { return _mm512_load_ps(p); }
  static inline void store(float* p, F v) { _mm512_store_ps(p, v); }
  static inline I loadi(const int32_t* p) { return _mm512_load_si512(p); }
  static inline void storei(int32_t* p, I v) { _mm512_store_si512(p, v); }
  static inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }  // int32 to fp32, rounded to nearest
  static inline F div(F a, F b) { return _mm512_div_ps(a, b); }
  // min/max return their second operand where either is NaN (x86's vminps/vmaxps): top2_update
  // relies on it.
  static constexpr bool kNanSecondMinMax = true;
  static inline F min(F a, F b) { return _mm512_min_ps(a, b); }  // b where either is NaN
  static inline F max(F a, F b) { return _mm512_max_ps(a, b); }  // likewise
  static inline F abs(F a) { return _mm512_abs_ps(a); }
  static inline M le(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static inline I bits(F a) { return _mm512_castps_si512(a); }
  static inline F from_bits(I a) { return _mm512_castsi512_ps(a); }
  static inline I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static inline I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
  template <int n> static inline I srli(I a) { return _mm512_srli_epi32(a, n); }
  template <int n> static inline I slli(I a) { return _mm512_slli_epi32(a, n); }
  static inline float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static inline M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static inline F sel(M m, F t, F f) { return _mm512_mask_mov_ps(f, m, t); }
  static inline I seli(M m, I t, I f) { return _mm512_mask_mov_epi32(f, m, t); }
  static inline F gather(const float* base, I off) { return _mm512_i32gather_ps(off, base, 4); }
  static inline float half_to_float(uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
  }

  // n (<= 16) consecutive elements as fp32, zero past n; and back (only n written).
  static inline __mmask16 first(int64_t n) { return (__mmask16)((1u << n) - 1u); }
  static inline F load_f32(const float* p, int64_t n) {
    return n == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first(n), p);
  }
  static inline void store_f32(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static inline __m256i load_u16(const uint16_t* p, int64_t n) {
    return _mm256_maskz_loadu_epi16(first(n), p);
  }
  static inline F load_f16(const uint16_t* p, int64_t n) { return _mm512_cvtph_ps(load_u16(p, n)); }
  static inline F load_bf16(const uint16_t* p, int64_t n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_u16(p, n)), 16));
  }
  static inline void store_f16(uint16_t* p, F v, int64_t n) {
    _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Only ever given bf16 values widened to fp32 (or NaN), so keeping the high half is exact.
  static inline void store_bf16(uint16_t* p, F v, int64_t n) {
    const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
    _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtepi32_epi16(hi));
  }

  // In-register 16 x 16 transpose: v[r] holds row r on entry, column r on exit.
  static inline void transpose(F* v) {
    F t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3: u[4g + c] holds element c of each 128-bit lane
      F a = t[4 * g], b = t[4 * g + 1], c = t[4 * g + 2], d = t[4 * g + 3];
      u[4 * g + 0] = _mm512_shuffle_ps(a, c, 0x44);
      u[4 * g + 1] = _mm512_shuffle_ps(a, c, 0xEE);
      u[4 * g + 2] = _mm512_shuffle_ps(b, d, 0x44);
      u[4 * g + 3] = _mm512_shuffle_ps(b, d, 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      const F v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
      const F v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
      const F v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
      const F v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
      v[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
      v[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
      v[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
      v[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
  }
};

}  // namespace
}  // namespace vqk
