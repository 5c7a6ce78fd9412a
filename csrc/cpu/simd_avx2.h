// AVX2 + FMA + F16C traits for search_impl.h, shared by the fp32 build (search_avx2.cpp) and the
// int16 first pass (search_avx2_i16.cpp). Include only from translation units compiled with
// -mavx2 -mfma -mf16c, inside no namespace (it opens vqk's anonymous one itself).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace vqk {
namespace {

struct V {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // compare result: all-ones lanes where true
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F set1(float v) { return _mm256_set1_ps(v); }
  static inline I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  static inline F load(const float* p) { return _mm256_load_ps(p); }
  static inline void store(float* p, F v) { _mm256_store_ps(p, v); }
  static inline I loadi(const int32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void storei(int32_t* p, I v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline float hsum(F a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  static inline M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static inline F sel(M m, F t, F f) { return _mm256_blendv_ps(f, t, m); }
  static inline I seli(M m, I t, I f) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(f), _mm256_castsi256_ps(t), m));
  }
  static inline F gather(const float* base, I off) { return _mm256_i32gather_ps(base, off, 4); }
  static inline float half_to_float(uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
  }
  // n (<= 8) consecutive elements as fp32, zero past n; and back (only n written). Partial
  // vectors go through a small buffer: AVX2 has no masked 16-bit loads.
  template <class T, class Full>
  static inline F load_n(const T* p, int64_t n, Full full) {
    if (n == 8) return full(p);
    alignas(32) T tmp[8] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
    return full(tmp);
  }
  template <class T, class Full>
  static inline void store_n(T* p, F v, int64_t n, Full full) {
    if (n == 8) return full(p, v);
    alignas(32) T tmp[8];
    full(tmp, v);
    for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
  }
  static inline F load_f32(const float* p, int64_t n) {
    return load_n(p, n, [](const float* q) { return _mm256_loadu_ps(q); });
  }
  static inline void store_f32(float* p, F v, int64_t n) {
    store_n(p, v, n, [](float* q, F x) { _mm256_storeu_ps(q, x); });
  }
  static inline F load_f16(const uint16_t* p, int64_t n) {
    return load_n(p, n, [](const uint16_t* q) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    });
  }
  static inline F load_bf16(const uint16_t* p, int64_t n) {
    return load_n(p, n, [](const uint16_t* q) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    });
  }
  static inline void store_f16(uint16_t* p, F v, int64_t n) {
    store_n(p, v, n, [](uint16_t* q, F x) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                       _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    });
  }
  // Only ever given bf16 values widened to fp32 (or NaN), so keeping the high half is exact.
  static inline void store_bf16(uint16_t* p, F v, int64_t n) {
    store_n(p, v, n, [](uint16_t* q, F x) {
      const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(x), 16);
      // packus works within 128-bit lanes: pack, then bring the two useful quarters together.
      const __m256i packed = _mm256_packus_epi32(hi, hi);
      const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm256_castsi256_si128(ordered));
    });
  }

  // In-register 8 x 8 transpose: v[r] holds row r on entry, column r on exit.
  static inline void transpose(F* v) {
    F t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {
      F a = t[4 * g], b = t[4 * g + 1], c = t[4 * g + 2], d = t[4 * g + 3];
      u[4 * g + 0] = _mm256_shuffle_ps(a, c, 0x44);
      u[4 * g + 1] = _mm256_shuffle_ps(a, c, 0xEE);
      u[4 * g + 2] = _mm256_shuffle_ps(b, d, 0x44);
      u[4 * g + 3] = _mm256_shuffle_ps(b, d, 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      v[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      v[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
};

}  // namespace
}  // namespace vqk
