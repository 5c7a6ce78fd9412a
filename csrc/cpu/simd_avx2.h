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
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }  // int32 to fp32, rounded to nearest
  static inline F div(F a, F b) { return _mm256_div_ps(a, b); }
  // min/max return their second operand where either is NaN (x86's vminps/vmaxps): top2_update
  // relies on it.
  static constexpr bool kNanSecondMinMax = true;
  static inline F min(F a, F b) { return _mm256_min_ps(a, b); }  // b where either is NaN
  static inline F max(F a, F b) { return _mm256_max_ps(a, b); }  // likewise
  static inline F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline M le(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static inline I bits(F a) { return _mm256_castps_si256(a); }
  static inline F from_bits(I a) { return _mm256_castsi256_ps(a); }
  static inline I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static inline I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
  template <int n> static inline I srli(I a) { return _mm256_srli_epi32(a, n); }
  template <int n> static inline I slli(I a) { return _mm256_slli_epi32(a, n); }
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

// The fp32 micro-kernel's loop over D for 3 x 8 rows x 4 codes (search_impl.h's panel_dots uses
// it when VQK_PANEL_DOTS is defined): per dimension, load the 3 row vectors, broadcast each code
// value and FMA it into the 12 accumulators -- the same vfmadd231ps operations, in the same order
// for every accumulator, as the intrinsics, so bitwise the same sums. Written as one asm loop
// because the register allocation decides this loop's speed: 12 accumulators + 3 rows + the
// broadcast are all 16 ymm registers, and GCC 12 has twice, after unrelated edits of search_impl.h
// (an LTO relink, then the residual search), kept one accumulator on the stack (`vfmadd213ps
// -0x490(%rbp)` in the loop), which halved the kernel's speed. Here the accumulators are operands
// of the whole loop and the rows and broadcast live in ymm12-15: nothing can spill inside it.
#define VQK_F32_CODE(j, a0, a1, a2)                   \
  "vbroadcastss " #j "*4(%[b]), %%ymm15\n\t"          \
  "vfmadd231ps %%ymm15, %%ymm12, %[" #a0 "]\n\t"     \
  "vfmadd231ps %%ymm15, %%ymm13, %[" #a1 "]\n\t"     \
  "vfmadd231ps %%ymm15, %%ymm14, %[" #a2 "]\n\t"
// xt: D steps of 24 floats (32-byte aligned), b: D steps of 4 floats; D >= 0.
static inline __attribute__((always_inline)) void avx2_f32_dots_3x4(const float* xt, const float* b,
                                                                  int64_t D, __m256 (&acc)[3][4]) {
  if (D <= 0) return;
  __asm__("1:\n\t"
          "vmovaps (%[x]), %%ymm12\n\t"
          "vmovaps 32(%[x]), %%ymm13\n\t"
          "vmovaps 64(%[x]), %%ymm14\n\t"
          VQK_F32_CODE(0, a00, a10, a20) VQK_F32_CODE(1, a01, a11, a21)
          VQK_F32_CODE(2, a02, a12, a22) VQK_F32_CODE(3, a03, a13, a23)
          "add $96, %[x]\n\t"
          "add $16, %[b]\n\t"
          "dec %[n]\n\t"
          "jnz 1b"
          : [a00] "+x"(acc[0][0]), [a01] "+x"(acc[0][1]), [a02] "+x"(acc[0][2]), [a03] "+x"(acc[0][3]),
            [a10] "+x"(acc[1][0]), [a11] "+x"(acc[1][1]), [a12] "+x"(acc[1][2]), [a13] "+x"(acc[1][3]),
            [a20] "+x"(acc[2][0]), [a21] "+x"(acc[2][1]), [a22] "+x"(acc[2][2]), [a23] "+x"(acc[2][3]),
            [x] "+r"(xt), [b] "+r"(b), [n] "+r"(D)
          :  // no inputs: 12 in-out vectors and 3 in-out pointers are GCC's limit of 30 operands,
             // so the memory the loop reads is declared by the "memory" clobber
          : "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}
#undef VQK_F32_CODE

// The same loop for 2 x 8 rows x 4 codes (search_avx2_small.cpp): 8 accumulators, the two row
// vectors in ymm12-13 and the broadcast in ymm15. The loop starts on a 64-byte boundary: unaligned, the
// same code measured 0.97-0.99x the 3 x 8 build on the DAC-like residual_vq in one build and
// 1.04-1.08x in another whose loops sat 16 bytes earlier in their lines; aligned, 1.03-1.06x.
#define VQK_F32_CODE(j, a0, a1)                       \
  "vbroadcastss " #j "*4(%[b]), %%ymm15\n\t"          \
  "vfmadd231ps %%ymm15, %%ymm12, %[" #a0 "]\n\t"     \
  "vfmadd231ps %%ymm15, %%ymm13, %[" #a1 "]\n\t"
// xt: D steps of 16 floats (32-byte aligned), b: D steps of 4 floats; D >= 0.
static inline __attribute__((always_inline)) void avx2_f32_dots_2x4(const float* xt, const float* b,
                                                                  int64_t D, __m256 (&acc)[2][4]) {
  if (D <= 0) return;
  __asm__(".p2align 6\n\t"
          "1:\n\t"
          "vmovaps (%[x]), %%ymm12\n\t"
          "vmovaps 32(%[x]), %%ymm13\n\t"
          VQK_F32_CODE(0, a00, a10) VQK_F32_CODE(1, a01, a11)
          VQK_F32_CODE(2, a02, a12) VQK_F32_CODE(3, a03, a13)
          "add $64, %[x]\n\t"
          "add $16, %[b]\n\t"
          "dec %[n]\n\t"
          "jnz 1b"
          : [a00] "+x"(acc[0][0]), [a01] "+x"(acc[0][1]), [a02] "+x"(acc[0][2]), [a03] "+x"(acc[0][3]),
            [a10] "+x"(acc[1][0]), [a11] "+x"(acc[1][1]), [a12] "+x"(acc[1][2]), [a13] "+x"(acc[1][3]),
            [x] "+r"(xt), [b] "+r"(b), [n] "+r"(D)
          :
          : "xmm12", "xmm13", "xmm15", "cc", "memory");
}
#undef VQK_F32_CODE

static inline __attribute__((always_inline)) void avx2_f32_dots(const float* xt, const float* b,
                                                              int64_t D, __m256 (&acc)[3][4]) {
  avx2_f32_dots_3x4(xt, b, D, acc);
}
static inline __attribute__((always_inline)) void avx2_f32_dots(const float* xt, const float* b,
                                                              int64_t D, __m256 (&acc)[2][4]) {
  avx2_f32_dots_2x4(xt, b, D, acc);
}

}  // namespace
}  // namespace vqk

// search_impl.h: the AVX2 builds (3 x 4 or 2 x 4 accumulators) take the asm loops above.
#define VQK_PANEL_DOTS(xt, b, D, acc) avx2_f32_dots(xt, b, D, acc)
