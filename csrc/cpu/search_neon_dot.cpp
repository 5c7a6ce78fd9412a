// AArch64 int8 dot-product first pass (FEAT_DotProd, SDOT): the same answers as the exact fp32
// search (search_impl.h, the `neon` build), from int8 dot products (VQK_CPU_ISA=neon_dot). Built
// with -march=armv8.2-a+dotprod (CMakeLists.txt, .ci/native_checks.sh) and only called after
// vq_cpu.cpp has seen HWCAP_ASIMDDP.
//
// SDOT (vdotq_laneq_s32) multiplies 16 int8 pairs and adds each group of four into one of four int32
// lanes: 16 multiply-adds per instruction against an fp32 FMLA's 4. Whether the whole search is
// faster has NOT been measured: this project has no ARM machine and runs this file under qemu-user
// only, which checks behaviour, not speed. int8 is coarse (Q <= 127 levels), so the proof below
// leaves many rows undecided on random data; those get an fp32 check of the few codes the int8
// values cannot rule out (see "Candidates"), and only the rest the full fp32 search. vq_cpu.cpp
// therefore never picks this build by itself; VQK_CPU_ISA=neon_dot forces it.
// No bf16 BFDOT pass (FEAT_BF16): its rounding is not IEEE's and depends on the CPU and on FPCR.EBF
// (FEAT_EBF16) -- without EBF, products and sums are rounded to odd with denormals flushed, per the
// descriptions available here (qemu's implementation), not the Arm ARM's pseudocode, which this
// project could not consult; a bound "derived" from second-hand rounding rules is not a proof. It
// would also do 8 multiply-adds per instruction to SDOT's 16.
//
// Quantization (power-of-two scales, so rescaling is exact), as search_avx2_i16.cpp with int8:
//   code k: sigma_k = the smallest power of two >= 2^-100 with max_d |e_kd| <= Q sigma_k,
//           q_kd = round(e_kd / sigma_k), so |q_kd| <= Q and |e_kd - sigma_k q_kd| <= sigma_k / 2;
//   row x:  tau the same from max_d |x_d|, p_d = round(x_d / tau), |x_d - tau p_d| <= tau / 2.
// Q = the largest value <= 127 with 4 ceil(D/4) Q^2 <= 2^31 - 1 (127 up to D = 133,000): every
// SDOT group (4 products, <= 4 Q^2) and the whole int32 accumulation over D (<= 4 ceil(D/4) Q^2) are
// exact -- no overflow (SDOT wraps; it cannot here), no rounding. -128 never occurs. D is padded to a
// multiple of 4 with zeros on both sides, which adds nothing.
//
// Bound (the avx2_i16 derivation; only Q differs). With eps_d = e_d - sigma q_d and eta_d = x_d - tau p_d,
//   x_d e_d - tau sigma p_d q_d = x_d eps_d + sigma q_d eta_d, and sigma |q_d| <= |e_d| + sigma / 2, so
//   |x.e - tau sigma (p.q)| <= (sigma/2) ||x||_1 + (tau/2) (||e||_1 + D sigma / 2) <= dd, where
//   dd = (S/2) L1(x) + (tau/2) (L + D S / 2), S = max_k sigma_k, L >= max_k ||e_k||_1 (both over the
//   finite codes, vq_cpu.cpp), L1(x) >= ||x||_1 (fp32 sum enlarged by gamma_{D+2}, plus D 2^-126
//   against flushed denormals; L likewise, summed in float64).
// The approximate value is a_k' = fl(n_k - (2 sigma_k) fl(fl(p.q) tau)): fl(p.q) = SCVTF of the exact
// int32 (relative error u = 2^-24), the product by tau is exact (powers of two, tau >= 2^-100 and
// |p.q| < 2^31: no under/overflow), FMLS rounds once, n_k is the fp32 norm of pack_codes (error
// gamma_{2D} ||e||^2). So
//   |a_k' - (||e_k||^2 - 2 x.e_k)| <= 2 dd + gamma_{2D} E^2 + 2u (||x|| E + dd) + u |a_k'|
//                                 <= 2 dd (1 + 2^-20) + B =: Delta,
// B being the fp32 search's own bound (`decide`), which covers the norm, the conversion and the
// final rounding with room to spare. The fp32 search's values a_k^f are within B of the same exact
// expansion, so |a_k' - a_k^f| <= Delta + B =: Df for every code.
// With Q = 127 the int8 error dd is ~1/254 of ||x||_1 max|e| + ..., some 45 times the int16 pass's:
// on randn data (D = 64) it is of the order of the gap between the two best codes, so the direct
// proof below decides only part of the rows, and the candidate check does the rest.
//
// Proof (direct). Let k1 be the int8 pass's best (value v1, lowest index on ties) and v2 the best
// value over every other code. The row is accepted when v2 - v1 > 2 Delta + 4 B, i.e. when
// v2 - v1 > (4 dd + 6 B) (1 + 2^-10) (room for rounding the test): then for every k != k1 the exact
// expansions differ by a_k - a_k1 > 4 B, so k1 is the exact nearest code, AND the fp32 search's own
// values satisfy v2_fp32 - v1_fp32 > 2 B: the fp32 build would have proven the same row with the same
// index, so it writes the same index, the same fp32 error (finish_tile) and the same z_q.
// Candidates (rows the direct proof leaves, when finite and in range). Every code k with
// a_k' > v2 + 2 Df has a_k^f > v2 + Df >= both a_k1^f and a_k2^f (k2 the int8 runner-up), so it is
// strictly worse in fp32 than two other codes: it is neither the fp32 best nor its runner-up. The fp32
// search's v1_fp32, its index (lowest on ties) and v2_fp32 are therefore those of the candidates
// C = {k : a_k' <= v2 + 2 Df}, visited in increasing k with the same strict compares. A second int8
// pass over the tile (bitwise the same a_k') lists C per row (at most max(4, min(64, K/8)) codes, else
// the row is set aside), each candidate's a_k^f is computed exactly as panel_dots does it (one fused
// multiply-add per d, in order from 0, then fl(n_k - 2 acc): bitwise the fp32 search's value), and
// the fp32 search's own test (the quick form, then `decide`) runs on them: proven -> that index,
// written by finish_tile as the fp32 build would; not proven -> the row is set aside.
// Every other row (NaN or inf, ||x||^2 >= 2^100, max |x| >= 2^60, max ||e|| >= 2^50, too many
// candidates, or no fp32 proof) is set aside and searched by the fp32 search of search_impl.h, which
// treats it exactly as the neon build would (its proof, or the exact float64 re-search). Every row's
// answer depends on that row alone, so which rows went which way changes the speed only.
// A thread that sets aside more than a third of its first rows does plain fp32 tiles for the rest
// of the call.
#include "cpu_internal.h"
#include "simd_neon.h"

namespace vqk {
namespace {

constexpr int MRV = 5;
constexpr int NR = 4;

}  // namespace
}  // namespace vqk

#include "search_impl.h"
// The rows set aside and their hand-over to the fp32 search.
#include "search_set_aside.h"

namespace vqk {
namespace {

// Q for a given D (see the top): 4 ceil(D/4) Q^2 <= 2^31 - 1, Q <= 127.
int32_t quant_max(int64_t D) {
  const int64_t quads = 4 * ((D + 3) / 4 > 0 ? (D + 3) / 4 : 1);
  int64_t q = 127;
  while (q > 0 && quads * q * q > 2147483647LL) --q;
  return (int32_t)q;
}
// Below this the int8 values are too coarse to prove anything (D beyond ~2^23): fp32 tiles only.
constexpr int32_t kMinQ = 16;
// Candidates per row the fp32 check takes, at most (more: the row is set aside); per call the
// limit is K / 8 (at least 4), so the check (a scalar chain of D multiply-adds per candidate) costs
// at most about half of what the fp32 search of the row (K D / 4 vector FMAs) would. On randn rows
// (D = 64..256, K = 256..4096, under qemu) 97-100% of the rows that need the check have <= 64.
constexpr int kMaxCand = 64;

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

// round(v) to the nearest integer (ties to even) whatever the rounding mode: FCVTNS.
int32_t round_int(double v) { return (int32_t)vcvtnd_s64_f64(v); }

template <class E>
void pack_codes_i8(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  pack_codes<E>(job, p_lo, p_hi);
  const int64_t D = job.D, D4 = (D + 3) / 4, P = job.panels * NR;
  const int32_t Q = quant_max(D);
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const float* src = job.packed + p * D * NR;
    uint32_t* dst = job.packed_bf16 + p * D4 * NR;
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      double m = 0.0, l1 = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = __builtin_fabs((double)src[d * NR + j]);
        m = v > m ? v : m;
        l1 += v;
      }
      // Padding, NaN/inf codes and finite codes whose norm overflowed get zeros: their fp32 norm
      // (+inf or NaN) already makes their value +inf or NaN, and max||e|| infinite stops every proof.
      const float n = job.norms[k];
      const bool ok = k < job.K && n - n == 0.0f && m < 0x1p60;
      const double s = ok ? pow2_scale(m, Q) : 0.0;
      job.code_aux[k] = (float)s;
      job.code_aux[P + k] = ok ? (float)((l1 + (double)D * 0x1p-126) * (1.0 + 0x1p-20)) : 0.0f;
      for (int64_t i = 0; i < D4; ++i) {
        uint32_t w = 0;
        for (int c = 0; c < 4; ++c) {
          const int64_t d = 4 * i + c;
          const int32_t q = ok && d < D ? round_int(src[d * NR + j] / s) : 0;
          w |= (uint32_t)(uint8_t)(int8_t)q << (8 * c);
        }
        dst[i * NR + j] = w;
      }
    }
  }
}

// Per-thread scratch (search_set_aside.h): xb holds the tile's int8 quads.
int64_t quad_floats(int64_t D) { return ((D + 3) / 4 * MR + 15) / 16 * 16; }
int64_t i8_scratch_floats(int64_t D) { return set_aside_scratch_floats(D, quad_floats(D)); }

// The tile's rows as int8 quads: xb[i * MR + r] = p_{4i} | p_{4i+1} << 8 | ... with
// p_d = round(x_d inv[r]) (inv = 1/tau, exact; 0 for lanes that will not be proven).
void to_quads_i8(const float* __restrict xt, const float* __restrict inv, int64_t D,
                 uint32_t* __restrict xb) {
  for (int64_t i = 0; i < (D + 3) / 4; ++i)
    for (int b = 0; b < MRV; ++b) {
      const float32x4_t s = vld1q_f32(inv + b * W);
      int32x4_t q[4];
      for (int c = 0; c < 4; ++c)
        q[c] = 4 * i + c < D ? vcvtnq_s32_f32(vmulq_f32(vld1q_f32(xt + (4 * i + c) * MR + b * W), s))
                             : vdupq_n_s32(0);
      // |q| <= 127: keep each lane's low byte, then byte c of lane r = row r's element 4i + c.
      const uint32x4_t m = vdupq_n_u32(0xff);
      uint32x4_t w = vandq_u32(vreinterpretq_u32_s32(q[0]), m);
      w = vorrq_u32(w, vshlq_n_u32(vandq_u32(vreinterpretq_u32_s32(q[1]), m), 8));
      w = vorrq_u32(w, vshlq_n_u32(vandq_u32(vreinterpretq_u32_s32(q[2]), m), 16));
      w = vorrq_u32(w, vshlq_n_u32(vreinterpretq_u32_s32(q[3]), 24));
      vst1q_u32(xb + i * MR + b * W, w);
    }
}

// The int8 micro-kernel: search_tile's shape (MRV x NR accumulators, lanes = rows, codes broadcast
// by lane: SDOT v.4s, v.16b, v.4b[j]), then each code's approximate value handed to `epi` in
// increasing code order. 20 accumulators + 5 row vectors + 1 code vector: 26 of 32 registers.
template <class Epi>
VQK_ALWAYS_INLINE void tile_i8(const uint32_t* __restrict xb, const uint32_t* __restrict pb,
                               const float* __restrict norms, const float* __restrict scales,
                               const float* __restrict tau, int64_t panels, int64_t D4, Epi&& epi) {
  float32x4_t tv[MRV];
  for (int i = 0; i < MRV; ++i) tv[i] = vld1q_f32(tau + i * W);
  for (int64_t p = 0; p < panels; ++p) {
    const uint32_t* b = pb + p * D4 * NR;
    int32x4_t acc[MRV][NR];
#pragma GCC unroll 64
    for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) acc[i][j] = vdupq_n_s32(0);
    const uint32_t* xp = xb;
    for (int64_t d = 0; d < D4; ++d, xp += MR, b += NR) {
      const int8x16_t bv = vreinterpretq_s8_u32(vld1q_u32(b));
      int8x16_t xv[MRV];
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) xv[i] = vreinterpretq_s8_u32(vld1q_u32(xp + i * W));
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) {
        acc[i][0] = vdotq_laneq_s32(acc[i][0], xv[i], bv, 0);
        acc[i][1] = vdotq_laneq_s32(acc[i][1], xv[i], bv, 1);
        acc[i][2] = vdotq_laneq_s32(acc[i][2], xv[i], bv, 2);
        acc[i][3] = vdotq_laneq_s32(acc[i][3], xv[i], bv, 3);
      }
    }
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) {
      const float32x4_t nj = vdupq_n_f32(norms[p * NR + j]);
      const float32x4_t sj = vdupq_n_f32(2.0f * scales[p * NR + j]);
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) {
        const float32x4_t dot = vmulq_f32(vcvtq_f32_s32(acc[i][j]), tv[i]);  // exact
        epi(i, p * NR + j, vfmsq_f32(nj, dot, sj));                          // n - 2 sigma dot
      }
    }
  }
}

// The best value per lane (lowest index on ties) and the second (search_tile's update rule).
VQK_ALWAYS_INLINE void search_tile_i8(const uint32_t* xb, const uint32_t* pb, const float* norms,
                                      const float* scales, const float* tau, int64_t panels,
                                      int64_t D4, Top2& out) {
  using F = V::F;
  using I = V::I;
  F b1[MRV], b2[MRV];
  I k1[MRV];
  for (int i = 0; i < MRV; ++i) {
    b1[i] = b2[i] = V::set1(__builtin_inff());
    k1[i] = V::set1i(0);
  }
  tile_i8(xb, pb, norms, scales, tau, panels, D4, [&](int i, int64_t k, F dist) {
    const V::M m1 = V::lt(dist, b1[i]);
    const V::M m2 = V::lt(dist, b2[i]);
    b2[i] = V::sel(m1, b1[i], V::sel(m2, dist, b2[i]));
    b1[i] = V::sel(m1, dist, b1[i]);
    k1[i] = V::seli(m1, V::set1i((int32_t)k), k1[i]);
  });
  for (int i = 0; i < MRV; ++i) {
    V::storei(out.k1 + i * W, k1[i]);
    V::store(out.v1 + i * W, b1[i]);
    V::store(out.v2 + i * W, b2[i]);
  }
}

// The candidates of each lane: codes whose a_k' <= thr[lane] (bitwise the values search_tile_i8
// saw), in increasing k; ncand[lane] = cap + 1 when there are more than cap (<= kMaxCand). Lanes
// with thr = -inf collect nothing (every a_k' is finite or NaN).
struct Cands {
  int32_t k[MR][kMaxCand];
  int ncand[MR];
};

VQK_ALWAYS_INLINE void collect_i8(const uint32_t* xb, const uint32_t* pb, const float* norms,
                                  const float* scales, const float* tau, int64_t panels, int64_t D4,
                                  const float* thr, int cap, Cands& c) {
  float32x4_t tv[MRV];
  for (int i = 0; i < MRV; ++i) tv[i] = vld1q_f32(thr + i * W);
  for (int r = 0; r < MR; ++r) c.ncand[r] = 0;
  tile_i8(xb, pb, norms, scales, tau, panels, D4, [&](int i, int64_t k, float32x4_t dist) {
    const uint32x4_t m = vcleq_f32(dist, tv[i]);
    if (vmaxvq_u32(m) == 0) return;
    alignas(16) uint32_t ml[4];
    vst1q_u32(ml, m);
    for (int l = 0; l < W; ++l) {
      if (!ml[l]) continue;
      int& n = c.ncand[i * W + l];
      if (n < cap) c.k[i * W + l][n] = (int32_t)k;
      if (n <= cap) ++n;
    }
  });
}

// The fp32 search's value a_k^f of code k for lane r of the packed tile, bit for bit: panel_dots'
// chain acc = fma(x_d, e_d, acc) from d = 0 (FMLA and FMADD round alike: one IEEE rounding, the same
// FPCR), then search_tile's fl(n_k - 2 acc) (2 acc is exact, so this is its FMLS).
VQK_ALWAYS_INLINE float fp32_value(const cpu::FwdJob& job, const float* xt, int r, int64_t k) {
  const int64_t D = job.D, p = k / NR, j = k % NR;
  const float* e = job.packed + p * D * NR + j;
  float acc = 0.0f;
  for (int64_t d = 0; d < D; ++d) acc = __builtin_fmaf(xt[d * MR + r], e[d * NR], acc);
  return vgetq_lane_f32(vfmsq_f32(vdupq_n_f32(job.norms[k]), vdupq_n_f32(acc), vdupq_n_f32(2.0f)), 0);
}

template <class E>
void search_tiles_i8(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  const int64_t N = job.x.B * job.x.S, D = job.D, D4 = (D + 3) / 4;
  const Areas a(scratch, D);
  const int32_t Q = quant_max(D);
  const double u = 0x1p-24, Dd = (double)D, En = job.max_code_norm, S = job.max_code_scale,
               L = job.max_code_l1;
  // Nothing is proven when the codes are out of the fp32 bound's range (then every row would be
  // set aside: plain fp32 tiles instead) or the int8 values would be too coarse.
  const bool usable = Q >= kMinQ && En < 0x1p50;
  const int qbits = 31 - __builtin_clz((unsigned)Q);
  const int cap = (int)imin(kMaxCand, job.K / 8 > 4 ? job.K / 8 : 4);
  // The direct proof's quick form, as search_avx2_i16.cpp's (the same bound, only Q differs): linear
  // in the lane's fp32 xx, L1 sum and tau, never below the double test's right side; +inf when
  // quick_a is (E out of range, or the debug switch), then the double test decides.
  const double kq = (1.0 + 0x1p-10) * (1.0 + 0x1p-8), lx = 1.0 + (Dd + 2.0) * u;
  const float q_a = (float)((3.0 * (double)job.quick_a + 2.0 * S * Dd * 0x1p-126 * lx) * kq);
  const float q_xx = (float)(3.0 * (double)job.quick_b * kq);
  const float q_l1 = (float)(2.0 * S * lx * kq);
  const float q_tau = (float)(2.0 * (L + 0.5 * Dd * S) * kq);
  const float32x4_t Qf = vdupq_n_f32((float)Q);
  alignas(64) float xx[MR], mx[MR], l1[MR], tau[MR], inv[MR], thr[MR];
  int64_t rowno[MR];
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<E>(job, row0, rows, a.xt);
    if (a.pend->fp32_only || !usable) {
      search_block<E>(job, rowno, a.xt, a.base);
      continue;
    }
    a.pend->seen += rows;
    // Per lane: ||x||^2 (fp32, as the fp32 search has it), max |x_d| and sum |x_d|.
    lane_sqnorms(a.xt, D, xx);
    {
      float32x4_t m[MRV], s[MRV];
      for (int i = 0; i < MRV; ++i) m[i] = s[i] = vdupq_n_f32(0.0f);
      for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 64
        for (int i = 0; i < MRV; ++i) {
          const float32x4_t v = vabsq_f32(vld1q_f32(a.xt + d * MR + i * W));
          m[i] = vmaxq_f32(m[i], v);  // NaN propagates (FMAX), and the lane is not provable
          s[i] = vaddq_f32(s[i], v);
        }
      for (int i = 0; i < MRV; ++i) {
        vst1q_f32(mx + i * W, m[i]);
        vst1q_f32(l1 + i * W, s[i]);
      }
    }
    // tau per lane, pow2_scale's value in vectors: with 2^qbits <= Q < 2^(qbits+1) and
    // 2^e <= m < 2^(e+1), t0 = 2^(e+1-qbits) has m < Q t0 and m >= Q t0 / 4, so tau is t0 or t0 / 2
    // (2m <= Q t0, an exact compare: powers of two times values of <= 8 bits); 2^-100 below
    // m = Q 2^-100. Lanes with m >= 2^60 (or NaN) are not provable and get inv = 0 below.
    for (int i = 0; i < MRV; ++i) {
      const float32x4_t m = vminq_f32(vld1q_f32(mx + i * W), vdupq_n_f32(0x1p60f));
      const int32x4_t e = vreinterpretq_s32_u32(vshrq_n_u32(vreinterpretq_u32_f32(m), 23));
      const float32x4_t t0 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(e, vdupq_n_s32(1 - qbits)), 23));
      const float32x4_t half = vmulq_f32(t0, vdupq_n_f32(0.5f));
      float32x4_t tv = vbslq_f32(vcleq_f32(vaddq_f32(m, m), vmulq_f32(Qf, t0)), half, t0);
      tv = vbslq_f32(vcltq_f32(m, vdupq_n_f32(0x1p-100f * (float)Q)), vdupq_n_f32(0x1p-100f), tv);
      vst1q_f32(tau + i * W, tv);
      vst1q_f32(inv + i * W, vdivq_f32(vdupq_n_f32(1.0f), tv));  // exact
    }
    bool provable[MR];
    for (int r = 0; r < MR; ++r) {
      // Ordered compares: NaN or inf anywhere in the row makes xx NaN or inf, never provable.
      provable[r] = rowno[r] >= 0 && xx[r] < 0x1p100f && mx[r] < 0x1p60f;
      if (!provable[r]) tau[r] = 1.0f, inv[r] = 0.0f;
    }
    to_quads_i8(a.xt, inv, D, a.xb);
    Top2 top;
    search_tile_i8(a.xb, job.packed_bf16, job.norms, job.code_aux, tau, job.panels, D4, top);
    bool any_cand = false;
    for (int r = 0; r < MR; ++r) {
      thr[r] = -__builtin_inff();
      if (rowno[r] < 0) continue;
      // The quick form first (see q_a above): no square root, no double.
      const float gap = top.v2[r] - top.v1[r];
      if (provable[r] && top.v1[r] - top.v1[r] == 0.0f && gap < __builtin_inff() &&
          gap > q_a + q_xx * xx[r] + q_l1 * l1[r] + q_tau * tau[r])
        continue;
      bool ok = job.approx_only;  // VQK_DEBUG_APPROX_ONLY: the int8 pass's answer, unproven
      const double v1 = top.v1[r], v2 = top.v2[r];
      if (!ok && provable[r] && v1 - v1 == 0.0) {
        const double xn = __builtin_sqrt((double)xx[r] + Dd * 0x1p-126) * (1.0 + (Dd + 2.0) * u);
        const double B = (2.0 * Dd + 8.0) * u * 1.01 * (En * En + 2.0 * xn * En) +
                         (Dd + 2.0) * 0x1p-50 * xn * xn + (4.0 * Dd + 8.0) * 0x1p-120 * (1.0 + En + xn);
        const double l1x = ((double)l1[r] + Dd * 0x1p-126) * (1.0 + (Dd + 2.0) * u);
        const double dd = 0.5 * S * l1x + 0.5 * (double)tau[r] * (L + 0.5 * Dd * S);
        ok = v2 - v1 > (4.0 * dd + 6.0 * B) * (1.0 + 0x1p-10);
        if (!ok && v2 - v2 == 0.0) {
          // Candidates: a_k' <= v2 + 2 Df, Df = 2 dd (1 + 2^-20) + 2 B, enlarged for the
          // rounding of this sum and of its conversion to float (rounded up below).
          const double lim = v2 + (4.0 * dd + 4.0 * B) * (1.0 + 0x1p-10) + __builtin_fabs(v2) * 0x1p-20;
          float tf = (float)lim;
          if ((double)tf < lim) tf = __builtin_nextafterf(tf, __builtin_inff());
          if (tf < __builtin_inff()) { thr[r] = tf; any_cand = true; continue; }
        }
      }
      if (!ok) set_aside<E>(job, a, rowno, r);
    }
    if (any_cand) {
      Cands c;
      collect_i8(a.xb, job.packed_bf16, job.norms, job.code_aux, tau, job.panels, D4, thr, cap, c);
      int64_t settled = 0;
      const float qa = job.quick_a, qb = job.quick_b;
      for (int r = 0; r < MR; ++r) {
        if (!(thr[r] > -__builtin_inff())) continue;
        bool proven = false;
        // At least k1 and k2 are candidates; fewer means the two passes disagree (they cannot: the
        // same code on the same data), and the row is set aside all the same.
        if (c.ncand[r] >= 2 && c.ncand[r] <= cap) {
          float b1 = __builtin_inff(), b2 = __builtin_inff();
          int32_t k1 = 0;
          for (int i = 0; i < c.ncand[r]; ++i) {
            const float v = fp32_value(job, a.xt, r, c.k[r][i]);
            if (v < b1) { b2 = b1; b1 = v; k1 = c.k[r][i]; }
            else if (v < b2) b2 = v;
          }
          // The fp32 search's own test on its own values (search_block): the quick form, then decide.
          const float gap = b2 - b1;
          double unused;
          proven = (b1 - b1 == 0.0f && xx[r] < 0x1p100f && gap < __builtin_inff() && gap > qa + qb * xx[r]) ||
                   decide(job, b1, b2, xx[r], &unused);
          if (proven) top.k1[r] = k1, ++settled;
        }
        if (!proven) set_aside<E>(job, a, rowno, r);
      }
      __atomic_fetch_add(&cpu::g_rechecked_rows, settled, __ATOMIC_RELAXED);
    }
    finish_tile<E>(job, rowno, a.xt, a.et, top.k1);
    // Break-even is unmeasured (no ARM machine): the avx2_i16 build's third is kept.
    fp32_only_after(*a.pend, 3);
  }
}

void pack_any_i8(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  switch (job.dtype) {
    case DType::f16: return pack_codes_i8<EF16>(job, p_lo, p_hi);
    case DType::bf16: return pack_codes_i8<EBF16>(job, p_lo, p_hi);
    default: return pack_codes_i8<EF32>(job, p_lo, p_hi);
  }
}

void search_any_i8(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  switch (job.dtype) {
    case DType::f16: return search_tiles_i8<EF16>(job, t_lo, t_hi, scratch);
    case DType::bf16: return search_tiles_i8<EBF16>(job, t_lo, t_hi, scratch);
    default: return search_tiles_i8<EF32>(job, t_lo, t_hi, scratch);
  }
}

}  // namespace

namespace cpu {
// Residual VQ runs this file's fp32 instantiation (the neon build's code, compiled here): the int8
// proof is set up per call, not per stage.
const SearchKernels& kernels_neon_dot() {
  static const SearchKernels k{"neon_dot", MR, NR, pack_any_i8, search_any_i8, flush_set_aside,
                               i8_scratch_floats, false, true, residual_tiles,
                               residual_scratch_floats};
  return k;
}
}  // namespace cpu
}  // namespace vqk
