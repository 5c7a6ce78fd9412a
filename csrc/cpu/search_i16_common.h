// The int16 first pass's parts that do not depend on the vector width, shared by its x86 builds:
// avx2_i16 (search_avx2_i16.cpp, 256-bit vpmaddwd; avx2_i8 reuses it through that file) and
// avx512_i16 (search_avx512_i16.cpp, 512-bit vpmaddwd). Here: the scales, the error bound and its
// proof, the per-row test, and the tile loop that ties them together with the hand-over of the rows
// it cannot prove to the exact fp32 search of search_impl.h (search_set_aside.h).
//
// Include after search_impl.h, in the unit's anonymous namespace's reach, once the unit has
// defined (for its V, MRV, NR, W, MR) the width-specific pieces this file calls:
//   quant_panel_i16(src, inv, D, dst)     one code panel [D][NR] fp32 -> [ceil(D/2)][NR] int16 pairs,
//                                          q = round(e / sigma) (ties to even), 0 where inv[j] = 0;
//   to_pairs_i16(xt, inv, D, xb)           the tile's rows as int16 pairs [ceil(D/2)][MR];
//   i16_dots(xb, b, D2, acc)               the micro-kernel: acc[i][j] = the exact int32 dot
//                                          product of row vector i and code j over one panel's
//                                          pairs b;
// and among its traits (simd_avx2.h, simd_avx512.h) those the code here calls beyond search_impl.h's:
// mul, div, min, max, abs, le, cvt (int32 to fp32), bits / from_bits, addi, srli, slli. search_tile_q, the tile's loop over the
// panels around a micro-kernel, is also avx2_i8's (on its int8 quads).
// Nothing here depends on how many rows or codes one vector holds: the proof is per row and per
// code, and each (row, code) dot product is one int32 accumulation over the D dimensions.
//
// Quantization (power-of-two scales, so rescaling is exact):
//   code k: sigma_k = the smallest power of two >= 2^-100 with max_d |e_kd| <= Q sigma_k,
//           q_kd = round(e_kd / sigma_k), so |q_kd| <= Q and |e_kd - sigma_k q_kd| <= sigma_k / 2;
//   row x:  tau the same from max_d |x_d|, p_d = round(x_d / tau), |x_d - tau p_d| <= tau / 2.
// Q = the largest value <= 32767 with 2 ceil(D/2) Q^2 <= 2^31 - 1: every vpmaddwd pair sum (<= 2 Q^2)
// and the whole int32 accumulation of one (row, code) over D (<= D Q^2, in any order and grouping:
// every partial sum is bounded by that too) are exact -- no overflow, no rounding. (Q = 5792 at
// D = 64, 2047 at D = 512; -32768 never occurs, so vpmaddwd's one overflowing case cannot happen.)
// This is per accumulator lane and independent of the register width: a 512-bit vpmaddwd does 16
// of the 256-bit one's lane operations side by side, each lane still one row and one code.
//
// Bound. With eps_d = e_d - sigma q_d and eta_d = x_d - tau p_d,
//   x_d e_d - tau sigma p_d q_d = x_d eps_d + sigma q_d eta_d, and sigma |q_d| <= |e_d| + sigma / 2, so
//   |x.e - tau sigma (p.q)| <= (sigma/2) ||x||_1 + (tau/2) (||e||_1 + D sigma / 2) <= dd, where
//   dd = (S/2) L1(x) + (tau/2) (L + D S / 2), S = max_k sigma_k, L >= max_k ||e_k||_1 (both over the
//   finite codes, vq_cpu.cpp), L1(x) >= ||x||_1 (fp32 sum enlarged by gamma_{D+2}, plus D 2^-126
//   against flushed denormals; L likewise, summed in float64).
// The approximate value is a_k' = fl(n_k - (2 sigma_k) fl(fl(p.q) tau)): fl(p.q) = cvt of the exact
// int32 (relative error u = 2^-24), the product by tau is exact (powers of two, no under/overflow in
// range), the fnmadd rounds once, n_k is the fp32 norm of pack_codes (error gamma_{2D} ||e||^2). So
//   |a_k' - (||e_k||^2 - 2 x.e_k)| <= 2 dd + gamma_{2D} E^2 + 2u (||x|| E + dd) + u |a_k'|
//                                 <= 2 dd (1 + 2^-20) + B,
// B being the fp32 search's own bound (`decide`: (2D + 8) u 1.01 (E^2 + 2 ||x|| E) + the float64 and
// subnormal terms), which covers the norm, the conversion and the final rounding with room to spare.
// Call Delta = 2 dd (1 + 2^-20) + B.
// Proof. Let k1 be the int pass's best (value v1, lowest index on ties) and v2 the best value over
// every other code. For k != k1 the exact expansions satisfy a_k - a_k1 >= v2 - v1 - 2 Delta. The row
// is accepted when v2 - v1 > 2 Delta + 4 B, i.e. (4 dd + 6 B) (1 + 2^-10) (room for rounding the test):
// then a_k - a_k1 > 4 B, so k1 is the exact nearest code, AND the fp32 search's own values satisfy
// v2_fp32 - v1_fp32 > 4 B - 2 B = 2 B: the fp32 build would have proven the same row too, so it would
// have written the same index, the same fp32 error (finish_tile) and the same z_q -- bit-identical
// output. Every other row (a near tie at int16 resolution, NaN or inf, ||x||^2 >= 2^100, max |x| >= 2^60,
// max ||e|| >= 2^50) is set aside and searched by the fp32 search of search_impl.h, which treats it
// exactly as the fp32 build would (its proof, or the exact float64 re-search). Every row's answer
// depends on that row alone, so which rows went which way changes the speed only. (The fp32 build
// meant is the one of the same width, avx2 or avx512: its search, proof and finish_tile are what
// the rows set aside get, and what a proven row's output equals.)
// A thread that sets aside more than a third of its first rows does plain fp32 tiles for the rest
// of the call (the int16 pass then costs more than it saves).
#pragma once

#include <cstdint>
#include <type_traits>

#include "search_set_aside.h"

namespace vqk {
namespace {

// Q for a given D (see the top): 2 ceil(D/2) Q^2 <= 2^31 - 1, Q <= 32767.
int32_t quant_max(int64_t D) {
  const int64_t pairs = 2 * ((D + 1) / 2 > 0 ? (D + 1) / 2 : 1);
  int64_t q = (int64_t)__builtin_sqrt(2147483647.0 / (double)pairs);
  if (q > 32767) q = 32767;
  while (q > 0 && pairs * q * q > 2147483647LL) --q;
  while (q < 32767 && pairs * (q + 1) * (q + 1) <= 2147483647LL) ++q;
  return (int32_t)q;
}
// Below this the int16 values are too coarse to prove anything (D beyond ~2^21): fp32 tiles only.
constexpr int32_t kMinQ = 16;

double pow2(int e) {  // 2^e for -1022 <= e <= 1023
  const uint64_t bits = (uint64_t)(e + 1023) << 52;
  double v;
  __builtin_memcpy(&v, &bits, 8);
  return v;
}

// The smallest power of two s >= 2^-100 with m <= Q s (0 <= m < 2^100; m / s is exact).
double pow2_scale(double m, int32_t Q) {
  if (m <= 0x1p-100 * Q) return 0x1p-100;
  const double r = m / Q;
  uint64_t bits;
  __builtin_memcpy(&bits, &r, 8);
  double s = pow2((int)((bits >> 52) & 0x7ff) - 1023 + 1);  // > r
  while (s > 0x1p-100 && m / (0.5 * s) <= Q) s *= 0.5;
  while (m / s > Q) s *= 2.0;
  return s;
}

// Code k's scale sigma_k for max_d |e_kd| = m (pow2_scale), or 0 when the code is left out of the
// reduced-precision pass: padding, NaN/inf codes and finite codes whose norm overflowed (their fp32
// norm, +inf or NaN, already makes their value +inf or NaN, and max ||e|| infinite stops every
// proof), and max |e_kd| >= 2^60.
double code_scale(const cpu::FwdJob& job, int64_t k, double m, int32_t Q) {
  const float n = job.norms[k];
  const bool ok = k < job.K && n - n == 0.0f && m < 0x1p60;
  return ok ? pow2_scale(m, Q) : 0.0;
}

// Codes: pack_codes' fp32 panels and norms, then per code its scale and L1 bound in code_aux
// (code_aux[k] = sigma_k, code_aux[P + k] = an upper bound of ||e_k||_1; both 0 when left out) and
// its int16 pairs in packed_bf16 ([panel][ceil(D/2)][NR] words, quant_panel_i16). The panel's NR
// codes are walked together, as in pack_codes: the same per-code sums in the same order. x / sigma
// is computed as x * (1 / sigma), the same value: sigma is a power of two in [2^-100, 2^61], so
// both are exact.
template <class E>
void pack_codes_i16(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  pack_codes<E>(job, p_lo, p_hi);
  const int64_t D = job.D, D2 = (D + 1) / 2, P = job.panels * NR;
  const int32_t Q = quant_max(D);
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const float* src = job.packed + p * D * NR;
    double m[NR] = {}, l1[NR] = {};
    for (int64_t d = 0; d < D; ++d)
      for (int j = 0; j < NR; ++j) {
        const double v = __builtin_fabs((double)src[d * NR + j]);
        m[j] = v > m[j] ? v : m[j];
        l1[j] += v;
      }
    alignas(64) double inv[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      const double sc = code_scale(job, k, m[j], Q);
      job.code_aux[k] = (float)sc;
      job.code_aux[P + k] = sc != 0.0 ? (float)((l1[j] + (double)D * 0x1p-126) * (1.0 + 0x1p-20)) : 0.0f;
      inv[j] = sc != 0.0 ? 1.0 / sc : 0.0;
    }
    quant_panel_i16(src, inv, D, job.packed_bf16 + p * D2 * NR);
  }
}

// The direct proof of the top for one call: its quick (float) form and the double test.
// S is the largest code scale of the pass (int16: max_code_scale; avx2_i8's int8 tier passes its own).
struct I16Bound {
  double u, Dd, En, S, L;
  float q_a, q_xx, q_l1, q_tau;
  I16Bound(const cpu::FwdJob& job, double S_)
      : u(0x1p-24), Dd((double)job.D), En(job.max_code_norm), S(S_), L(job.max_code_l1) {
    // The proof's quick form, linear in the lane's fp32 xx, L1 sum and tau: 6B <= 3 (quick_a +
    // quick_b xx) (vq_cpu.cpp's quick_bound, never below `decide`'s 2B), 4 dd as below with l1x
    // expanded; every constant enlarged by 2^-8 more for its rounding to float and the float
    // evaluation of the sum (a few units of 2^-24 on positive terms) and of fl(v2 - v1). Never below
    // the double test's right side, so it proves only what that test proves; +inf when quick_a is
    // (E out of range, or the debug switch), then the double test decides.
    const double kq = (1.0 + 0x1p-10) * (1.0 + 0x1p-8), lx = 1.0 + (Dd + 2.0) * u;
    q_a = (float)((3.0 * (double)job.quick_a + 2.0 * S * Dd * 0x1p-126 * lx) * kq);
    q_xx = (float)(3.0 * (double)job.quick_b * kq);
    q_l1 = (float)(2.0 * S * lx * kq);
    q_tau = (float)(2.0 * (L + 0.5 * Dd * S) * kq);
  }
  // The quick form: no square root, no double. False for a NaN or infinite v1 or gap.
  bool quick(float v1, float v2, float xx, float l1, float tau) const {
    const float gap = v2 - v1;
    return v1 - v1 == 0.0f && gap < __builtin_inff() && gap > q_a + q_xx * xx + q_l1 * l1 + q_tau * tau;
  }
  // The row's B (the fp32 search's bound, `decide`) and dd (see the top).
  void terms(float xx, float l1, float tau, double& B, double& dd) const {
    const double xn = __builtin_sqrt((double)xx + Dd * 0x1p-126) * (1.0 + (Dd + 2.0) * u);
    B = (2.0 * Dd + 8.0) * u * 1.01 * (En * En + 2.0 * xn * En) + (Dd + 2.0) * 0x1p-50 * xn * xn +
        (4.0 * Dd + 8.0) * 0x1p-120 * (1.0 + En + xn);
    const double l1x = ((double)l1 + Dd * 0x1p-126) * (1.0 + (Dd + 2.0) * u);
    dd = 0.5 * S * l1x + 0.5 * (double)tau * (L + 0.5 * Dd * S);
  }
  static bool direct(double v1, double v2, double B, double dd) {
    return v2 - v1 > (4.0 * dd + 6.0 * B) * (1.0 + 0x1p-10);
  }
  // The whole test for a row in range (`provable`, see row_scales): the quick form, then the
  // double one; VQK_DEBUG_APPROX_ONLY (job.approx_only) accepts every row, unproven.
  bool proves(const cpu::FwdJob& job, bool provable, float v1, float v2, float xx, float l1,
              float tau) const {
    if (provable && quick(v1, v2, xx, l1, tau)) return true;
    if (job.approx_only) return true;
    if (!provable || !((double)v1 - (double)v1 == 0.0)) return false;
    double B, dd;
    terms(xx, l1, tau, B, dd);
    return direct(v1, v2, B, dd);
  }
};

// One code's approximate value from the exact int32 p.q (see the top):
// a_k' = fl(n_k - (2 sigma_k) fl(fl(p.q) tau)), the conversion correctly rounded, the product by
// tau exact (powers of two), the fnmadd rounding once.
VQK_ALWAYS_INLINE V::F i16_value(V::I pq, V::F tau, V::F two_sigma, V::F norm) {
  return V::fnmadd(V::mul(V::cvt(pq), tau), two_sigma, norm);
}

// The best three per lane (residual_tiles_i16's shortcut, search_i16_residual.h "Top three"):
// Top2 plus the runner-up's index k2 and the third value v3, the best over every code but k1 and
// k2 (when v3 exceeds a lane's candidate limit, its candidates are k1 and k2 alone).
struct Top3 : Top2 {
  alignas(64) int32_t k2[MR];
  alignas(64) float v3[MR];
};

// search_tile's shape (MRV x NR accumulators, lanes = rows, codes broadcast, best two per lane in
// increasing code order with strict compares) on exact int32 dot products: dots(p, acc) sets
// acc[i][j] to p.q of row vector i and code j of panel p (the micro-kernel: int16 pairs here,
// int8 quads less their offset in avx2_i8). Per lane: the best value v1 (lowest index on ties),
// its index, and v2 over the other codes; with Out = Top3 also k2 and v3, v1, k1 and v2 then bit
// for bit the same (the same values, strict compares in increasing code order, NaN values ignored:
// x86's min and max return the second operand when either is NaN).
template <class Out, class Dots>
VQK_ALWAYS_INLINE void search_tile_q(const float* __restrict norms, const float* __restrict scales,
                                     const float* __restrict tau, int64_t panels, Out& out,
                                     Dots&& dots) {
  constexpr bool three = std::is_same_v<Out, Top3>;
  static_assert(three || std::is_same_v<Out, Top2>, "search_tile_q writes a Top2 or a Top3");
  static_assert(!three || V::kNanSecondMinMax, "the best three's updates rely on x86's NaN rule");
  using F = V::F;
  using I = V::I;
  F b1[MRV], b2[MRV], b3[MRV], tv[MRV];
  I k1[MRV], k2[MRV];
  for (int i = 0; i < MRV; ++i) {
    b1[i] = b2[i] = b3[i] = V::set1(__builtin_inff());
    k1[i] = k2[i] = V::set1i(0);
    tv[i] = V::load(tau + i * W);
  }
  for (int64_t p = 0; p < panels; ++p) {
    I acc[MRV][NR];
    dots(p, acc);
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) {
      const F nj = V::set1(norms[p * NR + j]);
      const F sj = V::set1(2.0f * scales[p * NR + j]);
      const I kj = V::set1i((int32_t)(p * NR + j));
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) {
        const F d = i16_value(acc[i][j], tv[i], sj, nj);
        if constexpr (three) {
          const auto m1 = V::lt(d, b1[i]);
          const auto m2 = V::lt(d, b2[i]);
          b3[i] = V::min(V::max(b2[i], d), b3[i]);
          b2[i] = V::min(V::max(b1[i], d), b2[i]);
          b1[i] = V::min(d, b1[i]);
          k2[i] = V::seli(m1, k1[i], V::seli(m2, kj, k2[i]));
          k1[i] = V::seli(m1, kj, k1[i]);
        } else {
          top2_update(d, kj, b1[i], b2[i], k1[i]);
        }
      }
    }
  }
  for (int i = 0; i < MRV; ++i) {
    V::storei(out.k1 + i * W, k1[i]);
    V::store(out.v1 + i * W, b1[i]);
    V::store(out.v2 + i * W, b2[i]);
    if constexpr (three) {
      V::storei(out.k2 + i * W, k2[i]);
      V::store(out.v3 + i * W, b3[i]);
    }
  }
}

// The int16 pass's tile: i16_dots over each panel's pairs (pb: [panel][D2][NR] words); the best
// two (Top2) or three (Top3) per lane.
template <class Out>
VQK_ALWAYS_INLINE void search_tile_i16(const uint32_t* __restrict xb, const uint32_t* __restrict pb,
                                       const float* __restrict norms, const float* __restrict scales,
                                       const float* __restrict tau, int64_t panels, int64_t D2,
                                       Out& out) {
  search_tile_q(norms, scales, tau, panels, out,
                [&](int64_t p, V::I(&acc)[MRV][NR]) __attribute__((always_inline)) {
                  i16_dots(xb, pb + p * D2 * NR, D2, acc);
                });
}

// Per lane of a packed tile: max |x_d| and sum |x_d| (fp32, in d order).
VQK_ALWAYS_INLINE void lane_abs_stats(const float* __restrict xt, int64_t D, float* __restrict mx,
                                      float* __restrict l1) {
  V::F m[MRV], s[MRV];
  for (int i = 0; i < MRV; ++i) m[i] = s[i] = V::zero();
  for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 64
    for (int i = 0; i < MRV; ++i) {
      const V::F v = V::abs(V::load(xt + d * MR + i * W));
      m[i] = V::max(m[i], v);
      s[i] = V::add(s[i], v);
    }
  for (int i = 0; i < MRV; ++i) {
    V::store(mx + i * W, m[i]);
    V::store(l1 + i * W, s[i]);
  }
}

// tau and 1/tau per lane from max |x_d|, pow2_scale's value in vectors: with 2^qbits <= Q <
// 2^(qbits+1) and 2^e <= m < 2^(e+1), t0 = 2^(e+1-qbits) has m < Q t0 and m >= Q t0 / 4, so tau is
// t0 or t0 / 2 (2m <= Q t0, an exact compare: powers of two times values of <= 16 bits); 2^-100
// below m = Q 2^-100. Lanes with m >= 2^60 (or NaN) are not provable (row_scales gives them inv = 0).
VQK_ALWAYS_INLINE void lane_scales(const float* __restrict mx, int32_t Q, float* __restrict tau,
                                   float* __restrict inv) {
  using F = V::F;
  const int qbits = 31 - __builtin_clz((unsigned)Q);
  const F Qf = V::set1((float)Q);
  for (int i = 0; i < MRV; ++i) {
    const F m = V::min(V::load(mx + i * W), V::set1(0x1p60f));
    const V::I e = V::srli<23>(V::bits(m));
    const F t0 = V::from_bits(V::slli<23>(V::addi(e, V::set1i(1 - qbits))));
    const F half = V::mul(t0, V::set1(0.5f));
    F t = V::sel(V::le(V::add(m, m), V::mul(Qf, t0)), half, t0);
    t = V::sel(V::lt(m, V::set1(0x1p-100f * (float)Q)), V::set1(0x1p-100f), t);
    V::store(tau + i * W, t);
    V::store(inv + i * W, V::div(V::set1(1.0f), t));  // exact
  }
}

// Per lane of a packed tile (xx = its fp32 ||x||^2, live = the lane holds a row to search): max |x_d|,
// the fp32 L1 sum, tau and 1/tau (lane_abs_stats, lane_scales), and whether the bound can prove
// the lane at all. Ordered compares: NaN or inf anywhere in the row makes xx NaN or inf, never
// provable. Lanes not provable get tau = 1 and inv = 0 (their int16 values are 0 and never used).
VQK_ALWAYS_INLINE void row_scales(const float* __restrict xt, int64_t D, int32_t Q, const bool* live,
                                  const float* __restrict xx, float* __restrict mx,
                                  float* __restrict l1, float* __restrict tau,
                                  float* __restrict inv, bool* provable) {
  lane_abs_stats(xt, D, mx, l1);
  lane_scales(mx, Q, tau, inv);
  for (int r = 0; r < MR; ++r) {
    provable[r] = live[r] && xx[r] < 0x1p100f && mx[r] < 0x1p60f;
    if (!provable[r]) tau[r] = 1.0f, inv[r] = 0.0f;
  }
}

// For the residual search's candidate pass (collect_lane_i16, search_i16_residual.h), in each
// unit: lane r's int16 pairs laid out as a panel's, two pair steps at a time: lp[2 NR h + c] =
// pair 2h and lp[2 NR h + NR + c] = pair 2h + 1 of the lane, for every code slot c < NR (H = D2 / 2
// steps; an odd last pair is the caller's).
VQK_ALWAYS_INLINE void lane_pairs(const uint32_t* __restrict xb, int r, int64_t H,
                                  uint32_t* __restrict lp) {
  for (int64_t h = 0; h < H; ++h)
    for (int c = 0; c < NR; ++c) {
      lp[2 * NR * h + c] = xb[(2 * h) * MR + r];
      lp[2 * NR * h + NR + c] = xb[(2 * h + 1) * MR + r];
    }
}

// The candidate pass's listing: panel p's codes whose bit is set in mask m, in increasing k, into
// out[0 .. cap); n counts them, stopping at cap + 1 (more than cap).
VQK_ALWAYS_INLINE void list_codes(int m, int64_t p, int cap, int32_t* __restrict out, int& n) {
  for (int j = 0; j < NR; ++j)
    if (m >> j & 1) {
      if (n < cap) out[n] = (int32_t)(p * NR + j);
      if (n <= cap) ++n;
    }
}

// Per-thread scratch (search_set_aside.h): xb holds the tile's int16 pairs.
int64_t i16_scratch_floats(int64_t D) { return set_aside_scratch_floats(D, pair_floats(D)); }

// One packed tile of rows xt (lanes rowno[r] >= 0) through the int16 pass: the rows it proves
// finished, the others set aside (rowno modified). The tile is search_tiles_i16's, or the int8
// tier's rows handed on (search_i8_common.h).
template <class E>
void search_block_i16(const cpu::FwdJob& job, int64_t* rowno, const float* xt, const Areas& a,
                      const I16Bound& bound, int32_t Q) {
  const int64_t D = job.D, D2 = (D + 1) / 2;
  alignas(64) float xx[MR], mx[MR], l1[MR], tau[MR], inv[MR];
  bool live[MR], provable[MR];
  for (int r = 0; r < MR; ++r) {
    live[r] = rowno[r] >= 0;
    a.pend->seen += live[r];
  }
  // Per lane: ||x||^2 (fp32, as the fp32 search has it), max |x_d|, sum |x_d|, tau.
  lane_sqnorms(xt, D, xx);
  row_scales(xt, D, Q, live, xx, mx, l1, tau, inv, provable);
  to_pairs_i16(xt, inv, D, a.xb);
  Top2 top;
  search_tile_i16(a.xb, job.packed_bf16, job.norms, job.code_aux, tau, job.panels, D2, top);
  for (int r = 0; r < MR; ++r) {
    if (rowno[r] < 0) continue;
    if (!bound.proves(job, provable[r], top.v1[r], top.v2[r], xx[r], l1[r], tau[r]))
      set_aside<E>(job, a, xt, rowno, r);
  }
  finish_tile<E>(job, rowno, xt, a.et, top.k1);
  // Break-even is near 45% set aside (an int16 tile costs ~0.55 of an fp32 one, plus the fp32
  // search of what it set aside): a third leaves room for the pending tiles' overhead.
  fp32_only_after(*a.pend, 3);
}

// Nothing is proven when the codes are out of the fp32 bound's range (then every row would be set
// aside: plain fp32 tiles instead) or the int16 values would be too coarse.
bool i16_usable(const cpu::FwdJob& job) {
  return quant_max(job.D) >= kMinQ && job.max_code_norm < 0x1p50;
}

template <class E>
void search_tiles_i16(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  const int64_t N = job.x.B * job.x.S;
  const Areas a(scratch, job.D);
  const int32_t Q = quant_max(job.D);
  const bool usable = i16_usable(job);
  const I16Bound bound(job, job.max_code_scale);
  int64_t rowno[MR];
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<E>(job, row0, rows, a.xt);
    if (a.pend->fp32_only || !usable)
      search_block<E>(job, rowno, a.xt, a.base);
    else
      search_block_i16<E>(job, rowno, a.xt, a, bound, Q);
  }
}

void pack_any_i16(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  switch (job.dtype) {
    case DType::f16: return pack_codes_i16<EF16>(job, p_lo, p_hi);
    case DType::bf16: return pack_codes_i16<EBF16>(job, p_lo, p_hi);
    default: return pack_codes_i16<EF32>(job, p_lo, p_hi);
  }
}

void search_any_i16(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  switch (job.dtype) {
    case DType::f16: return search_tiles_i16<EF16>(job, t_lo, t_hi, scratch);
    case DType::bf16: return search_tiles_i16<EBF16>(job, t_lo, t_hi, scratch);
    default: return search_tiles_i16<EF32>(job, t_lo, t_hi, scratch);
  }
}

}  // namespace
}  // namespace vqk
