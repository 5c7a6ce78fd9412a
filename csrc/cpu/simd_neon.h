// AArch64 Advanced SIMD traits for search_impl.h, shared by the fp32 build (search_neon.cpp) and the
// int8 dot-product first pass (search_neon_dot.cpp). Include inside no namespace (it opens vqk's
// anonymous one itself). Semantics are the x86 builds': fmadd/fnmadd are fused (FMLA/FMLS), `lt` is
// FCMGT with swapped operands (an ordered compare, false on NaN), selects are BSL on the compare mask.
#pragma once
#include <arm_neon.h>

#include <cstdint>

namespace vqk {
namespace {

struct V {
  static constexpr int W = 4;
  using F = float32x4_t;
  using I = int32x4_t;
  using M = uint32x4_t;  // compare result: all-ones lanes where true
  static inline F zero() { return vdupq_n_f32(0.0f); }
  static inline F set1(float v) { return vdupq_n_f32(v); }
  static inline I set1i(int32_t v) { return vdupq_n_s32(v); }
  static inline F load(const float* p) { return vld1q_f32(p); }
  static inline void store(float* p, F v) { vst1q_f32(p, v); }
  static inline I loadi(const int32_t* p) { return vld1q_s32(p); }
  static inline void storei(int32_t* p, I v) { vst1q_s32(p, v); }
  static inline F fmadd(F a, F b, F c) { return vfmaq_f32(c, a, b); }   // c + a * b, one rounding
  static inline F fnmadd(F a, F b, F c) { return vfmsq_f32(c, a, b); }  // c - a * b, one rounding
  static inline F sub(F a, F b) { return vsubq_f32(a, b); }
  static inline F add(F a, F b) { return vaddq_f32(a, b); }
  static inline float hsum(F a) { return vaddvq_f32(a); }
  static constexpr bool kNanSecondMinMax = false;  // vminq_f32 returns NaN: top2_update selects
  static inline M lt(F a, F b) { return vcltq_f32(a, b); }  // false when either is NaN
  static inline F sel(M m, F t, F f) { return vbslq_f32(m, t, f); }
  static inline I seli(M m, I t, I f) { return vbslq_s32(m, t, f); }
  static inline F gather(const float* base, I off) {
    alignas(16) int32_t o[4];
    vst1q_s32(o, off);
    alignas(16) const float v[4] = {base[o[0]], base[o[1]], base[o[2]], base[o[3]]};
    return vld1q_f32(v);
  }
  static inline float half_to_float(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
  }
  // n (<= 4) consecutive elements as fp32, zero past n; and back (only n written). Partial vectors
  // go through a small buffer, never reading or writing past the caller's n elements.
  template <class T, class Full>
  static inline F load_n(const T* p, int64_t n, Full full) {
    if (n == 4) return full(p);
    alignas(16) T tmp[4] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
    return full(tmp);
  }
  template <class T, class Full>
  static inline void store_n(T* p, F v, int64_t n, Full full) {
    if (n == 4) return full(p, v);
    alignas(16) T tmp[4];
    full(tmp, v);
    for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
  }
  static inline F load_f32(const float* p, int64_t n) {
    return load_n(p, n, [](const float* q) { return vld1q_f32(q); });
  }
  static inline void store_f32(float* p, F v, int64_t n) {
    store_n(p, v, n, [](float* q, F x) { vst1q_f32(q, x); });
  }
  static inline F load_f16(const uint16_t* p, int64_t n) {
    return load_n(p, n, [](const uint16_t* q) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(q))); });
  }
  // Only ever given f16 values widened to fp32 (or NaN), so the narrowing is exact.
  static inline void store_f16(uint16_t* p, F v, int64_t n) {
    store_n(p, v, n, [](uint16_t* q, F x) { vst1_u16(q, vreinterpret_u16_f16(vcvt_f16_f32(x))); });
  }
  static inline F load_bf16(const uint16_t* p, int64_t n) {
    return load_n(p, n, [](const uint16_t* q) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(q), 16)); });
  }
  // Only ever given bf16 values widened to fp32 (or NaN), so keeping the high half is exact.
  static inline void store_bf16(uint16_t* p, F v, int64_t n) {
    store_n(p, v, n, [](uint16_t* q, F x) { vst1_u16(q, vshrn_n_u32(vreinterpretq_u32_f32(x), 16)); });
  }

  // In-register 4 x 4 transpose: v[r] holds row r on entry, column r on exit.
  static inline void transpose(F* v) {
    const F t0 = vtrn1q_f32(v[0], v[1]), t1 = vtrn2q_f32(v[0], v[1]);  // a0 b0 a2 b2 | a1 b1 a3 b3
    const F t2 = vtrn1q_f32(v[2], v[3]), t3 = vtrn2q_f32(v[2], v[3]);  // c0 d0 c2 d2 | c1 d1 c3 d3
    const float64x2_t u0 = vreinterpretq_f64_f32(t0), u1 = vreinterpretq_f64_f32(t1);
    const float64x2_t u2 = vreinterpretq_f64_f32(t2), u3 = vreinterpretq_f64_f32(t3);
    v[0] = vreinterpretq_f32_f64(vtrn1q_f64(u0, u2));
    v[1] = vreinterpretq_f32_f64(vtrn1q_f64(u1, u3));
    v[2] = vreinterpretq_f32_f64(vtrn2q_f64(u0, u2));
    v[3] = vreinterpretq_f32_f64(vtrn2q_f64(u1, u3));
  }
};

}  // namespace
}  // namespace vqk
