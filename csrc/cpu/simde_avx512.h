// Only in the x86-emulated native check (.ci/native_checks.sh x86-emulated), never in the module:
// with VQK_SIMDE defined, simd_avx512.h includes this header instead of <immintrin.h>, so the
// AVX-512 search builds compile to portable code (SIMD Everywhere, Debian's libsimde-dev, plus the
// few intrinsics below) and run on a CPU without AVX-512. Emulation checks behaviour -- the
// kernels' answers bit for bit against the driver's float64 brute force -- not speed, and it cannot
// catch a bug in SIMDe itself, in the shims below, or in the compiler's real AVX-512 code.
//
// SIMDe 0.7.4 lacks these, written here from Intel's documented semantics (the Intrinsics Guide
// and the SDM's pseudocode), lane by lane:
//   _mm512_reduce_add_ps   GCC's order (hi 256 + lo 256, then hi 128 + lo 128, then pairs), so
//                          a sum is bitwise the one the real build computes;
//   _mm512_i32gather_ps, _mm512_maskz_loadu_ps, _mm512_mask_storeu_ps,
//   _mm256_maskz_loadu_epi16, _mm256_mask_storeu_epi16
//                          masked-off lanes are neither read nor written (as the hardware's
//                          fault suppression), so a wrong tail mask shows up as wrong answers;
//   _mm512_cvtph_ps, _mm512_cvtps_ph   two halves through SIMDe's F16C (the real instruction when
//                          built with -mf16c; round to nearest only, another mode fails to compile);
//   _mm512_cvtepu16_epi32, _mm512_cvtepi32_epi16 (truncating), _mm512_cmplt_epi32_mask;
//   _mm512_cvtneps_pbh, _mm256_cvtneps_pbh   the SDM's convert_fp32_to_bfloat16: round to nearest
//                          even, denormals to signed zero, NaN kept with its quiet bit set;
//   integer ones: _mm512_cvtepi32_ps, _mm512_cvttps_epi32 (NaN and out of range: 0x80000000;
//                          these two used by avx512_i16, the rest for builds to come),
//                          _mm512_srai_epi32, _mm512_cvtepi16_epi32, _mm512_cvtepi8_epi32,
//                          _mm512_cvtepu8_epi16, _mm512_reduce_add_epi32,
//                          _mm512_cmp_epi32_mask (SIMDe has dpwssd, dpbusd, madd, maddubs, packs);
//   _mm512_shuffle_f32x4   SIMDe has it but not its native name; _mm512_madd_epi16's native name
//                          is declared with the wrong arguments.
// tests/native/simde_check.cpp checks these against the documented semantics (edge cases, and
// that masked-off lanes at a page's end are never read).
// And one replaced: _mm512_dpbf16_ps. SIMDe's rounds each product, adds the even pair first and
// keeps denormals;
// the SDM's VDPBF16PS is two fused multiply-adds per lane, the odd pair first, with denormal
// inputs read as zero and denormal results flushed to zero (round to nearest even throughout).
// That is done here. (A real CPU may round differently from the SDM's description; the bf16
// kernel's proof bounds any such rounding, and only its first pass sees the difference.)
// Without FMA instructions (a build without -mfma) SIMDe's _mm512_fmadd_ps / _mm512_fnmadd_ps
// round twice; they are replaced by single-rounding std::fma per lane then.
#pragma once
#if defined(__AVX512F__)
#error "simde_avx512.h is the emulated AVX-512 build: compile it without -mavx512* flags"
#endif

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

// SIMDe names no __mmask16 of its own; the compiler's headers do only when SIMDe includes them
// (built with -mavx2 and the like). The same type either way, so declaring it again is allowed.
typedef simde__mmask16 __mmask16;

#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif

namespace vqk_simde {

// Lanes in and out by memcpy (bit patterns, nothing converted); plain arrays, since a vector type
// as a template argument loses its attributes.
#define VQK_LANES(T, name, vec) \
  T name[sizeof(vec) / sizeof(T)]; \
  std::memcpy(name, &(vec), sizeof(vec))
#define VQK_RETURN(Vec, arr) \
  do {                       \
    Vec r_;                  \
    std::memcpy(&r_, arr, sizeof(r_)); \
    return r_;               \
  } while (0)

inline float reduce_add_ps(__m512 a) {
  VQK_LANES(float, l, a);
  float t3[8], t6[4];
  for (int i = 0; i < 8; ++i) t3[i] = l[8 + i] + l[i];
  for (int i = 0; i < 4; ++i) t6[i] = t3[4 + i] + t3[i];
  const float t80 = t6[0] + t6[2], t81 = t6[1] + t6[3];
  return t80 + t81;
}

inline __m512 i32gather_ps(__m512i idx, const void* base, int scale) {
  VQK_LANES(int32_t, ix, idx);
  float r[16];
  for (int i = 0; i < 16; ++i)
    std::memcpy(&r[i], static_cast<const char*>(base) + (int64_t)ix[i] * scale, 4);
  VQK_RETURN(__m512, r);
}

inline __m512 maskz_loadu_ps(__mmask16 k, const void* p) {
  float r[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(&r[i], static_cast<const char*>(p) + 4 * i, 4);
  VQK_RETURN(__m512, r);
}

inline void mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
  VQK_LANES(float, l, a);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + 4 * i, &l[i], 4);
}

inline __m256i maskz_loadu_epi16(__mmask16 k, const void* p) {
  uint16_t r[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(&r[i], static_cast<const char*>(p) + 2 * i, 2);
  VQK_RETURN(__m256i, r);
}

inline void mask_storeu_epi16(void* p, __mmask16 k, __m256i a) {
  VQK_LANES(uint16_t, l, a);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + 2 * i, &l[i], 2);
}

inline __m512 cvtph_ps(__m256i a) {
  __m128i h[2];
  std::memcpy(h, &a, sizeof(a));
  __m256 r[2] = {simde_mm256_cvtph_ps(h[0]), simde_mm256_cvtph_ps(h[1])};
  VQK_RETURN(__m512, r);
}

template <int imm>
inline __m256i cvtps_ph(__m512 a) {
  static_assert((imm & 7) == SIMDE_MM_FROUND_TO_NEAREST_INT, "only round to nearest is emulated");
  __m256 h[2];
  std::memcpy(h, &a, sizeof(a));
  __m128i r[2] = {simde_mm256_cvtps_ph(h[0], SIMDE_MM_FROUND_TO_NEAREST_INT | SIMDE_MM_FROUND_NO_EXC),
                  simde_mm256_cvtps_ph(h[1], SIMDE_MM_FROUND_TO_NEAREST_INT | SIMDE_MM_FROUND_NO_EXC)};
  VQK_RETURN(__m256i, r);
}

inline __m512i cvtepu16_epi32(__m256i a) {
  VQK_LANES(uint16_t, l, a);
  int32_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = (int32_t)l[i];
  VQK_RETURN(__m512i, r);
}

inline __m256i cvtepi32_epi16(__m512i a) {
  VQK_LANES(uint32_t, l, a);
  uint16_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = (uint16_t)(l[i] & 0xffffu);
  VQK_RETURN(__m256i, r);
}

inline __mmask16 cmplt_epi32_mask(__m512i a, __m512i b) {
  VQK_LANES(int32_t, x, a);
  VQK_LANES(int32_t, y, b);
  unsigned m = 0;
  for (int i = 0; i < 16; ++i) m |= (unsigned)(x[i] < y[i]) << i;
  return (__mmask16)m;
}

// The SDM's convert_fp32_to_bfloat16.
inline uint16_t to_bf16(uint32_t u) {
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);    // NaN: truncated, made quiet
  if (mag == 0x7f800000u) return (uint16_t)(u >> 16);             // infinity
  if (mag < 0x00800000u) return (uint16_t)((u >> 16) & 0x8000u);  // zero or denormal: signed zero
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);       // normal: nearest even
}

inline __m256bh cvtneps_pbh_512(__m512 a) {
  VQK_LANES(uint32_t, l, a);
  uint16_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = to_bf16(l[i]);
  VQK_RETURN(__m256bh, r);
}

inline __m128bh cvtneps_pbh_256(__m256 a) {
  VQK_LANES(uint32_t, l, a);
  uint16_t r[8];
  for (int i = 0; i < 8; ++i) r[i] = to_bf16(l[i]);
  VQK_RETURN(__m128bh, r);
}

// Denormals as signed zero (the instruction's DAZ on inputs and FTZ on results).
inline float flush(float v) { return std::fabs(v) < 1.17549435e-38f ? std::copysign(0.0f, v) : v; }
inline float widen_bf16(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return flush(f);
}

inline __m512 dpbf16_ps(__m512 src, __m512bh a, __m512bh b) {
  VQK_LANES(float, acc, src);
  VQK_LANES(uint16_t, x, a);
  VQK_LANES(uint16_t, y, b);
  for (int j = 0; j < 16; ++j) {
    float t = flush(acc[j]);
    t = flush(std::fma(widen_bf16(x[2 * j + 1]), widen_bf16(y[2 * j + 1]), t));
    t = flush(std::fma(widen_bf16(x[2 * j]), widen_bf16(y[2 * j]), t));
    acc[j] = t;
  }
  VQK_RETURN(__m512, acc);
}

inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  VQK_LANES(float, x, a);
  VQK_LANES(float, y, b);
  VQK_LANES(float, r, c);
  for (int i = 0; i < 16; ++i) r[i] = std::fma(x[i], y[i], r[i]);
  VQK_RETURN(__m512, r);
}
inline __m512 fnmadd_ps(__m512 a, __m512 b, __m512 c) {
  VQK_LANES(float, x, a);
  VQK_LANES(float, y, b);
  VQK_LANES(float, r, c);
  for (int i = 0; i < 16; ++i) r[i] = std::fma(-x[i], y[i], r[i]);
  VQK_RETURN(__m512, r);
}

// Integer shims: cvtepi32_ps and cvttps_epi32 are used by the AVX-512 int16 builds
// (search_avx512_i16.cpp), the others are for builds to come; checked by simde_check.cpp like the rest.
inline __m512 cvtepi32_ps(__m512i a) {
  VQK_LANES(int32_t, l, a);
  float r[16];
  for (int i = 0; i < 16; ++i) r[i] = (float)l[i];  // round to nearest even, as MXCSR's default
  VQK_RETURN(__m512, r);
}

inline __m512i cvttps_epi32(__m512 a) {
  VQK_LANES(float, l, a);
  int32_t r[16];
  for (int i = 0; i < 16; ++i)  // NaN and out of range: the "integer indefinite" 0x80000000
    r[i] = l[i] >= -2147483648.0f && l[i] < 2147483648.0f ? (int32_t)l[i] : INT32_MIN;
  VQK_RETURN(__m512i, r);
}

inline __m512i srai_epi32(__m512i a, unsigned imm) {
  VQK_LANES(int32_t, l, a);
  int32_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = l[i] >> (imm > 31 ? 31 : imm);  // arithmetic; > 31 fills the sign
  VQK_RETURN(__m512i, r);
}

inline __m512i cvtepi16_epi32(__m256i a) {
  VQK_LANES(int16_t, l, a);
  int32_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = l[i];
  VQK_RETURN(__m512i, r);
}

inline __m512i cvtepi8_epi32(__m128i a) {
  VQK_LANES(int8_t, l, a);
  int32_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = l[i];
  VQK_RETURN(__m512i, r);
}

inline __m512i cvtepu8_epi16(__m256i a) {
  VQK_LANES(uint8_t, l, a);
  int16_t r[32];
  for (int i = 0; i < 32; ++i) r[i] = (int16_t)l[i];
  VQK_RETURN(__m512i, r);
}

inline int reduce_add_epi32(__m512i a) {
  VQK_LANES(uint32_t, l, a);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += l[i];  // wraps, as the hardware's
  return (int)(int32_t)s;
}

// imm: _MM_CMPINT_EQ, LT, LE, FALSE, NE, NLT, NLE, TRUE (0..7), signed.
inline __mmask16 cmp_epi32_mask(__m512i a, __m512i b, int imm) {
  VQK_LANES(int32_t, x, a);
  VQK_LANES(int32_t, y, b);
  unsigned m = 0;
  for (int i = 0; i < 16; ++i) {
    bool t;
    switch (imm & 7) {
      case 0: t = x[i] == y[i]; break;
      case 1: t = x[i] < y[i]; break;
      case 2: t = x[i] <= y[i]; break;
      case 3: t = false; break;
      case 4: t = x[i] != y[i]; break;
      case 5: t = !(x[i] < y[i]); break;
      case 6: t = !(x[i] <= y[i]); break;
      default: t = true; break;
    }
    m |= (unsigned)t << i;
  }
  return (__mmask16)m;
}

#undef VQK_LANES
#undef VQK_RETURN

}  // namespace vqk_simde

// Macros, as SIMDe's own aliases, so that they win over a compiler's native declarations.
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(a) vqk_simde::reduce_add_ps(a)
#undef _mm512_i32gather_ps
#define _mm512_i32gather_ps(idx, base, scale) vqk_simde::i32gather_ps(idx, base, scale)
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) vqk_simde::maskz_loadu_ps(k, p)
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, a) vqk_simde::mask_storeu_ps(p, k, a)
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, p) vqk_simde::maskz_loadu_epi16(k, p)
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16(p, k, a) vqk_simde::mask_storeu_epi16(p, k, a)
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps(a) vqk_simde::cvtph_ps(a)
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph(a, imm) vqk_simde::cvtps_ph<(imm)>(a)
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32(a) vqk_simde::cvtepu16_epi32(a)
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) vqk_simde::cvtepi32_epi16(a)
#undef _mm512_cmplt_epi32_mask
#define _mm512_cmplt_epi32_mask(a, b) vqk_simde::cmplt_epi32_mask(a, b)
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh(a) vqk_simde::cvtneps_pbh_512(a)
#undef _mm256_cvtneps_pbh
#define _mm256_cvtneps_pbh(a) vqk_simde::cvtneps_pbh_256(a)
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm) simde_mm512_shuffle_f32x4(a, b, imm)
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps(src, a, b) vqk_simde::dpbf16_ps(src, a, b)
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(a) vqk_simde::cvtepi32_ps(a)
#undef _mm512_cvttps_epi32
#define _mm512_cvttps_epi32(a) vqk_simde::cvttps_epi32(a)
#undef _mm512_srai_epi32
#define _mm512_srai_epi32(a, imm) vqk_simde::srai_epi32(a, imm)
#undef _mm512_cvtepi16_epi32
#define _mm512_cvtepi16_epi32(a) vqk_simde::cvtepi16_epi32(a)
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(a) vqk_simde::cvtepi8_epi32(a)
#undef _mm512_cvtepu8_epi16
#define _mm512_cvtepu8_epi16(a) vqk_simde::cvtepu8_epi16(a)
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32(a) vqk_simde::reduce_add_epi32(a)
#undef _mm512_cmp_epi32_mask
#define _mm512_cmp_epi32_mask(a, b, imm) vqk_simde::cmp_epi32_mask(a, b, imm)
// SIMDe 0.7.4's alias for _mm512_madd_epi16 takes the masked form's four arguments (a slip in its
// header); Intel's takes two.
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
#if !defined(__FMA__)
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps(a, b, c) vqk_simde::fmadd_ps(a, b, c)
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps(a, b, c) vqk_simde::fnmadd_ps(a, b, c)
#endif

// vq_cpu.cpp, built with VQK_EMULATED_AVX512 for the emulated driver, refers to this symbol: linked
// with real AVX-512 objects (which lack it) instead of these, that binary fails to link.
extern "C" __attribute__((weak)) const int vqk_avx512_emulated_by_simde = 1;

// --- For the AVX-512 int16 builds (search_avx512_i16.cpp), besides _mm512_cvtepi32_ps and
// _mm512_cvttps_epi32 above: the two double conversions SIMDe 0.7.4 lacks, lane by lane as the SDM
// describes them (tests/native/simde_check.cpp holds them to it):
//   _mm512_cvttpd_epi32  truncation toward zero; NaN and out-of-range lanes give the "integer
//                        indefinite" 0x80000000;
//   _mm512_cvtps_pd      exact widening.
namespace vqk_simde {
template <class To, class From>
inline To bits_as(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}
inline __m256i cvttpd_epi32(__m512d a) {
  double l[8];
  int32_t r[8];
  std::memcpy(l, &a, sizeof(l));
  for (int i = 0; i < 8; ++i)  // false for NaN
    r[i] = l[i] > -2147483649.0 && l[i] < 2147483648.0 ? (int32_t)l[i] : INT32_MIN;
  return bits_as<__m256i>(r);
}
inline __m512d cvtps_pd(__m256 a) {
  float l[8];
  double r[8];
  std::memcpy(l, &a, sizeof(l));
  for (int i = 0; i < 8; ++i) r[i] = (double)l[i];
  return bits_as<__m512d>(r);
}
}  // namespace vqk_simde
#undef _mm512_cvttpd_epi32
#define _mm512_cvttpd_epi32(a) vqk_simde::cvttpd_epi32(a)
#undef _mm512_cvtps_pd
#define _mm512_cvtps_pd(a) vqk_simde::cvtps_pd(a)
