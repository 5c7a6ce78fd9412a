// AVX2 int16 first pass: the same answers as the exact fp32 search (search_impl.h), from int16 dot
// products (VQK_CPU_ISA=avx2_i16). Built with -mavx2 -mfma -mf16c like search_avx2.cpp.
//
// vpmaddwd (_mm256_madd_epi16) multiplies 16 int16 pairs and adds neighbours into 8 int32 lanes: 16
// multiply-adds per instruction against an fp32 FMA's 8. On Zen 3 it issues on the same two pipes
// as FMA, so it does twice the work per pipe slot (benchmarks/fma_probe.cpp, one core: int16
// vpmaddwd + vpaddd 80 GMAC/s, fp32 FMA 50), and this build measured 0.71-0.92x the fp32 build's CPU
// time there (2 threads; benchmarks/results/cpu-avx2-i16.md). vq_cpu.cpp picks it by itself only on
// that CPU family (AMD family 25 without AVX-512) for K >= 64 and D >= 16; VQK_CPU_ISA=avx2_i16
// forces it anywhere with AVX2 (Intel cores, where it should also pay: unmeasured).
//
// The quantization (per-code and per-row power-of-two scales), the rigorous bound, the proof that a
// row accepted here gets the fp32 build's bits, the tile loop, and the hand-over of the other rows
// to the fp32 search: search_i16_common.h, shared with the 512-bit build (search_avx512_i16.cpp;
// the hand-over itself is search_set_aside.h, neon_dot's and avx512bf16's too). This file holds the
// 256-bit pieces that header calls, and the residual-VQ search (int16 pass per stage).
#include "cpu_internal.h"
#include "simd_avx2.h"

namespace vqk {
namespace {

constexpr int MRV = 3;
constexpr int NR = 4;

}  // namespace
}  // namespace vqk

#include "search_impl.h"

namespace vqk {
namespace {

// One code panel's int16 pairs (search_i16_common.h, pack_codes_i16): dst[i * NR + j] =
// q_{2i} | q_{2i+1} << 16 of code j, q_d = round(e_d inv[j]) ties to even, 4 codes to a vector of
// doubles. Lanes of codes left out have inv = 0 and are masked to 0 (a NaN times 0 is still NaN).
static_assert(NR == 4, "quant_panel_i16 quantizes a panel's 4 codes as one vector of doubles");
VQK_ALWAYS_INLINE void quant_panel_i16(const float* __restrict src, const double* inv, int64_t D,
                                       uint32_t* __restrict dst) {
  const __m256d iv = _mm256_load_pd(inv);
  const __m256d keep = _mm256_cmp_pd(iv, _mm256_setzero_pd(), _CMP_NEQ_OQ);
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const auto quant = [&](const float* v) {  // round(v_j / sigma_j) for the 4 codes, as int32
    const __m256d q = _mm256_and_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(v)), iv), keep);
    return _mm256_cvttpd_epi32(_mm256_round_pd(q, mode));
  };
  for (int64_t i = 0; i < (D + 1) / 2; ++i) {
    const __m128i lo = quant(src + 2 * i * NR);
    const __m128i hi = 2 * i + 1 < D ? quant(src + (2 * i + 1) * NR) : _mm_setzero_si128();
    const __m128i w = _mm_or_si128(_mm_and_si128(lo, _mm_set1_epi32(0xffff)), _mm_slli_epi32(hi, 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * NR), w);
  }
}

// The tile's rows as int16 pairs: xb[i * MR + r] = p_{2i} | p_{2i+1} << 16 with p_d = round(x_d inv[r])
// (inv = 1/tau, exact; 0 for lanes that will not be proven, whose values do not matter).
void to_pairs_i16(const float* __restrict xt, const float* __restrict inv, int64_t D,
                  uint32_t* __restrict xb) {
  const __m256i low = _mm256_set1_epi32(0xffff);
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < (D + 1) / 2; ++i)
    for (int b = 0; b < MRV; ++b) {
      const __m256 s = _mm256_load_ps(inv + b * W);
      const __m256 lo = _mm256_mul_ps(_mm256_load_ps(xt + 2 * i * MR + b * W), s);
      const __m256 hi = 2 * i + 1 < D ? _mm256_mul_ps(_mm256_load_ps(xt + (2 * i + 1) * MR + b * W), s)
                                      : _mm256_setzero_ps();
      const __m256i li = _mm256_cvttps_epi32(_mm256_round_ps(lo, mode));
      const __m256i hj = _mm256_cvttps_epi32(_mm256_round_ps(hi, mode));
      _mm256_store_si256(reinterpret_cast<__m256i*>(xb + i * MR + b * W),
                         _mm256_or_si256(_mm256_and_si256(li, low), _mm256_slli_epi32(hj, 16)));
    }
}

// The int16 micro-kernel's loop over the D2 dimension pairs, one asm statement: per pair, for each
// of the NR codes, broadcast its int16 pair and vpmaddwd it with the three row vectors read straight
// from the tile (memory operands), adding into the 12 accumulators. Registers decide this kernel's
// speed: 12 accumulators, 3 row vectors, the broadcast and vpmaddwd's product (it cannot
// accumulate, unlike an FMA) are 17 ymm registers, one more than AVX2 has, and GCC kept 9 of the 12
// accumulators on the stack (a load and a store each per step: about half speed, the reason this
// build first measured slower than fp32). Written with intrinsics and memory operands GCC 12 still
// spilled (it computed all products before adding them). Here the loop holds 14 registers: the
// accumulators, ymm14 (broadcast) and ymm15 (product; register renaming lets one architectural
// register carry every product). The rows come from L1: the tile is reread for every panel anyway.
static_assert(MRV == 3 && NR == 4, "i16_dots is written for 3 x 4 accumulators");
#define VQK_I16_CODE(j, a0, a1, a2)                      \
  "vpbroadcastd " #j "*4(%[b]), %%ymm14\n\t"             \
  "vpmaddwd (%[x]), %%ymm14, %%ymm15\n\t"                \
  "vpaddd %%ymm15, %[" #a0 "], %[" #a0 "]\n\t"          \
  "vpmaddwd 32(%[x]), %%ymm14, %%ymm15\n\t"              \
  "vpaddd %%ymm15, %[" #a1 "], %[" #a1 "]\n\t"          \
  "vpmaddwd 64(%[x]), %%ymm14, %%ymm15\n\t"              \
  "vpaddd %%ymm15, %[" #a2 "], %[" #a2 "]\n\t"
// xb: D2 steps of MR = 24 words (32-byte aligned), b: D2 steps of NR = 4 words; acc is set to the
// panel's int32 dot products.
VQK_ALWAYS_INLINE void i16_dots(const uint32_t* xb, const uint32_t* b, int64_t D2, __m256i (&acc)[MRV][NR]) {
#pragma GCC unroll 64
  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  if (D2 <= 0) return;
  __asm__("1:\n\t"
          VQK_I16_CODE(0, a00, a10, a20) VQK_I16_CODE(1, a01, a11, a21)
          VQK_I16_CODE(2, a02, a12, a22) VQK_I16_CODE(3, a03, a13, a23)
          "add $96, %[x]\n\t"
          "add $16, %[b]\n\t"
          "dec %[n]\n\t"
          "jnz 1b"
          : [a00] "+x"(acc[0][0]), [a01] "+x"(acc[0][1]), [a02] "+x"(acc[0][2]), [a03] "+x"(acc[0][3]),
            [a10] "+x"(acc[1][0]), [a11] "+x"(acc[1][1]), [a12] "+x"(acc[1][2]), [a13] "+x"(acc[1][3]),
            [a20] "+x"(acc[2][0]), [a21] "+x"(acc[2][1]), [a22] "+x"(acc[2][2]), [a23] "+x"(acc[2][3]),
            [x] "+r"(xb), [b] "+r"(b), [n] "+r"(D2)
          :  // no inputs: 12 in-out vectors and 3 in-out pointers are GCC's limit of 30 operands,
             // so the memory the loop reads is declared by the "memory" clobber
          : "xmm14", "xmm15", "cc", "memory");
}
#undef VQK_I16_CODE

}  // namespace
}  // namespace vqk

// The width-independent part: pack_codes_i16, the bound, search_tiles_i16 (and through it
// search_set_aside.h: the rows set aside, flush_set_aside).
#include "search_i16_common.h"

namespace vqk {
namespace {

// ---------------------------------------------------------------------------------------------
// Residual VQ (issue 17) with the int16 first pass: search_impl.h's residual_tiles, each stage's
// search of the tile first done on int16 pairs. The answer must be bitwise the fp32 residual
// path's (indices, errors, z_q), and that path's answer for a lane depends on two things only:
// the exact nearest code (every path finds that one), and whether its fp32 search proves the row
// (error = the fp32 sum of squares of the tile, finish below) or flags it (error = the float64
// distance of the exact re-search). So per stage and lane:
//   1. the int16 pass and its direct proof (search_tiles_i16's: v2' - v1' > (4 dd + 6 B)(1 + 2^-10)
//      or its quick form) -- then the fp32 search would have proven the same code too (the top of
//      this file): the code, unflagged;
//   2. otherwise, for a finite lane in range, the candidates of neon_dot's argument
//      (search_neon_dot.cpp, "Candidates"): with Df = 2 dd (1 + 2^-20) + 2 B >= |a_k' - a_k^f|
//      for every code, every code with a_k' > v2' + 2 Df is worse in fp32 than two other codes, so
//      the fp32 search's v1, its index (lowest on ties) and v2 are those of the candidates
//      C = {k : a_k' <= lim}. lim is taken 3 B larger, v2' + (4 dd + 7 B)(1 + 2^-10), so that C
//      also holds every code the fp32 exact re-search would measure (a_k^f <= thr =
//      v1_fp32 + 2 B (1 + 2^-20), hence a_k' <= v1' + 2 Df + 2.0001 B <= lim). One vectorised int16
//      pass over the codebook for that lane alone lists C (the same integers and the same float
//      operations as search_tile_i16: bitwise the same a_k'); each candidate's fp32 value is
//      computed bit for bit as panel_dots does (one FMA per d in order from 0, then
//      fl(n_k - 2 acc)); the fp32 test (quick form, then `decide`) runs on them. Proven: that code,
//      unflagged. Not proven: flagged, and the float64 distances of the candidates give the lowest
//      exact minimiser and its error -- the same as residual_exact, whose candidate set C contains
//      (every exact minimiser is in both, and nothing else can win);
//   3. every other lane (NaN or inf, ||x||^2 >= 2^100, max|x| >= 2^60, E >= 2^50, more than `cap`
//      candidates) runs the fp32 search of the tile itself: residual_tiles' own code.
// The residual update, the errors and the writes are then residual_tiles' own, line for line.
// Rows the int16 pass could not prove (2. and 3.) are counted in g_set_aside_rows. A thread that
// sees more than half of a stage's rows miss the direct proof runs that stage in fp32 for the rest
// of the call (candidates cost about one row of the int16 tile each; 3. a whole fp32 tile).

// Stages whose int16 take-up each thread tracks (later stages share the last counter).
constexpr int kResStages = 64;
struct ResidualI16Header {
  int64_t seen[kResStages], missed[kResStages];
  bool fp32_only[kResStages];
};
constexpr int64_t kResHeaderFloats = (int64_t)(sizeof(ResidualI16Header) + 63) / 64 * 16;
// Candidates per lane, at most (more: the lane takes the fp32 tile search).
constexpr int kResMaxCand = 64;

// The lane's int16 pairs laid out for collect_lane_i16: step h holds pairs 2h (x4) and 2h + 1 (x4).
int64_t lane_pair_floats(int64_t D) { return (((D + 1) / 2 + 1) / 2 * 8 + 15) / 16 * 16; }

int64_t residual_i16_scratch_floats(int64_t D) {
  return kResHeaderFloats + residual_scratch_floats(D) + pair_floats(D) + lane_pair_floats(D);
}

// search_tile_i16 keeping a little more per lane: the runner-up's index k2 and the third value v3
// (ties and NaN as search_tile's update rule: strict compares in increasing k). The values are
// search_tile_i16's bit for bit (the same operations on the same integers). A lane that misses
// the direct proof with v3 > lim has exactly {k1, k2} as its candidates: no collect pass.
struct Top3 {
  alignas(64) int32_t k1[MR];
  alignas(64) int32_t k2[MR];
  alignas(64) float v1[MR];
  alignas(64) float v2[MR];
  alignas(64) float v3[MR];
};

VQK_ALWAYS_INLINE void search_tile_i16_top3(const uint32_t* __restrict xb,
                                            const uint32_t* __restrict pb,
                                            const float* __restrict norms,
                                            const float* __restrict scales,
                                            const float* __restrict tau, int64_t panels,
                                            int64_t D2, Top3& out) {
  __m256 b1[MRV], b2[MRV], b3[MRV], tv[MRV];
  __m256i k1[MRV], k2[MRV];
  for (int i = 0; i < MRV; ++i) {
    b1[i] = b2[i] = b3[i] = _mm256_set1_ps(__builtin_inff());
    k1[i] = k2[i] = _mm256_setzero_si256();
    tv[i] = _mm256_load_ps(tau + i * W);
  }
  for (int64_t p = 0; p < panels; ++p) {
    const uint32_t* b = pb + p * D2 * NR;
    __m256i acc[MRV][NR];
    i16_dots(xb, b, D2, acc);
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) {
      const __m256 nj = _mm256_set1_ps(norms[p * NR + j]);
      const __m256 sj = _mm256_set1_ps(2.0f * scales[p * NR + j]);
      const __m256 kj = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)(p * NR + j)));
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) {
        const __m256 dist = i16_value(acc[i][j], tv[i], sj, nj);
        const __m256 m1 = _mm256_cmp_ps(dist, b1[i], _CMP_LT_OQ);
        const __m256 m2 = _mm256_cmp_ps(dist, b2[i], _CMP_LT_OQ);
        const __m256 m3 = _mm256_cmp_ps(dist, b3[i], _CMP_LT_OQ);
        b3[i] = _mm256_blendv_ps(_mm256_blendv_ps(b3[i], dist, m3), b2[i], m2);
        b2[i] = _mm256_blendv_ps(_mm256_blendv_ps(b2[i], dist, m2), b1[i], m1);
        const __m256 k1f = _mm256_castsi256_ps(k1[i]);
        k2[i] = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_blendv_ps(_mm256_castsi256_ps(k2[i]), kj, m2), k1f, m1));
        b1[i] = _mm256_blendv_ps(b1[i], dist, m1);
        k1[i] = _mm256_castps_si256(_mm256_blendv_ps(k1f, kj, m1));
      }
    }
  }
  for (int i = 0; i < MRV; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.k1 + i * W), k1[i]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.k2 + i * W), k2[i]);
    _mm256_store_ps(out.v1 + i * W, b1[i]);
    _mm256_store_ps(out.v2 + i * W, b2[i]);
    _mm256_store_ps(out.v3 + i * W, b3[i]);
  }
}

// The codes k with a_k' <= lim for lane r of the int16 tile xb (tau: the lane's scale), in
// increasing k, into out[0 .. cap); returns their number, cap + 1 when there are more. a_k' is
// search_tile_i16's value bit for bit: the exact int32 dot (here summed two pair-steps at a time,
// an exact reordering: every partial sum is bounded by D Q^2 < 2^31), converted, times tau (exact),
// then fl(n_k - (2 sigma_k) dot) in one rounding. Padding and non-finite codes have n_k = +inf or
// NaN and are never listed.
// Written for the packed layout [panel][D2][NR = 4] words: one 256-bit load is two pair-steps of
// a panel's 4 codes.
static_assert(NR == 4 && MRV == 3, "collect_lane_i16 and search_tile_i16_top3 assume 3 x 4 tiles");
int collect_lane_i16(const cpu::FwdJob& job, const uint32_t* __restrict xb, int r, float tau,
                     float lim, int cap, int32_t* __restrict out, uint32_t* __restrict lp) {
  const int64_t D2 = (job.D + 1) / 2, H = D2 / 2;
  for (int64_t h = 0; h < H; ++h)
    for (int c = 0; c < 4; ++c) {
      lp[8 * h + c] = xb[(2 * h) * MR + r];
      lp[8 * h + 4 + c] = xb[(2 * h + 1) * MR + r];
    }
  const __m128i last = _mm_set1_epi32((int32_t)(D2 & 1 ? xb[(D2 - 1) * MR + r] : 0u));
  const __m128 tv = _mm_set1_ps(tau), lv = _mm_set1_ps(lim), two = _mm_set1_ps(2.0f);
  int n = 0;
  for (int64_t p = 0; p < job.panels; ++p) {
    const uint32_t* b = job.packed_bf16 + p * D2 * NR;
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    int64_t h = 0;
    for (; h + 1 < H; h += 2) {
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 8 * h)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(lp + 8 * h))));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 8 * h + 8)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(lp + 8 * h + 8))));
    }
    if (h < H)
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 8 * h)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(lp + 8 * h))));
    a0 = _mm256_add_epi32(a0, a1);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1));
    if (D2 & 1)
      s = _mm_add_epi32(s, _mm_madd_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8 * H)), last));
    const __m128 dot = _mm_mul_ps(_mm_cvtepi32_ps(s), tv);
    const __m128 dist = _mm_fnmadd_ps(dot, _mm_mul_ps(two, _mm_loadu_ps(job.code_aux + p * NR)),
                                      _mm_loadu_ps(job.norms + p * NR));
    const int m = _mm_movemask_ps(_mm_cmp_ps(dist, lv, _CMP_LE_OQ));
    if (!m) continue;
    for (int j = 0; j < NR; ++j)
      if (m >> j & 1) {
        if (n < cap) out[n] = (int32_t)(p * NR + j);
        if (n <= cap) ++n;
      }
  }
  return n;
}

// The fp32 search's values a_k^f of codes k[0 .. c) for lane r of the tile st, bit for bit:
// panel_dots' chain acc = fma(x_d, e_d, acc) from d = 0 (the packed panel holds the codebook's
// fp32 values), then search_tile's fl(n_k - 2 acc) (2 acc is exact: one rounding either way).
void fp32_values(const cpu::FwdJob& job, const float* __restrict st, int r, const int32_t* k,
                 int c, float* __restrict val) {
  const int64_t D = job.D;
  const float* cb = static_cast<const float*>(job.codebook);
  for (int i0 = 0; i0 < c; i0 += 8) {
    const int n = c - i0 < 8 ? c - i0 : 8;
    const float* e[8];
    float acc[8];
    for (int i = 0; i < 8; ++i) {
      e[i] = cb + (int64_t)k[i0 + (i < n ? i : 0)] * D;
      acc[i] = 0.0f;
    }
    for (int64_t d = 0; d < D; ++d) {
      const float x = st[d * MR + r];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = __builtin_fmaf(x, e[i][d], acc[i]);
    }
    // One scalar fnmadd per candidate: vectorised, GCC read the 8 sums back from the stack as a
    // vfmadd231ps operand, which test_avx2_inner_loops_keep_accumulators_in_registers flags.
    for (int i = 0; i < n; ++i)
      val[i0 + i] = _mm_cvtss_f32(_mm_fnmadd_ss(_mm_set_ss(acc[i]), _mm_set_ss(2.0f),
                                                _mm_set_ss(job.norms[k[i0 + i]])));
  }
}

[[maybe_unused]] void residual_tiles_i16(const cpu::ResidualJob& rj, int64_t t_lo, int64_t t_hi,
                                         float* scratch) {
  const cpu::FwdJob& first = rj.stages[0];
  const int64_t N = first.x.B * first.x.S, D = first.D, D2 = (D + 1) / 2;
  ResidualI16Header& hdr = *reinterpret_cast<ResidualI16Header*>(scratch);
  float* __restrict xt = scratch + kResHeaderFloats;
  float* __restrict qt = xt + tile_floats(D);
  float* __restrict et = qt + tile_floats(D);
  float* __restrict un = et + tile_floats(D);
  uint32_t* __restrict xb = reinterpret_cast<uint32_t*>(un + tile_floats(D));
  uint32_t* __restrict lp = xb + pair_floats(D);
  const float* __restrict st = rj.cosine ? un : xt;
  const int32_t Q = quant_max(D);
  int64_t rowno[MR];
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<EF32>(first, row0, rows, xt);
    for (int64_t i = 0; i < D * MR; ++i) qt[i] = 0.0f;
    for (int64_t s = 0; s < rj.S; ++s) {
      const cpu::FwdJob& job = rj.stages[s];
      const int hs = (int)imin(s, kResStages - 1);
      bool on[MR];
      int live = 0;
      for (int r = 0; r < MR; ++r) {
        on[r] = rowno[r] >= 0 && (!rj.active || s < rj.active[rowno[r]]);
        live += on[r];
      }
      if (live == 0) {  // every row of the tile has stopped (quantizer dropout): nothing to search
        for (int r = 0; r < MR; ++r)
          if (rowno[r] >= 0) { job.indices[rowno[r]] = -1; job.sqerr[rowno[r]] = 0.0f; }
        continue;
      }
      if (rj.cosine) unit_tile(xt, D, un);
      alignas(64) float xx[MR];
      lane_sqnorms(st, D, xx);
      int32_t idx[MR];
      bool flag[MR], need32[MR];
      double thr[MR], xerr[MR];
      bool any32 = false;
      const float qa = job.quick_a, qb = job.quick_b;
      const double En = job.max_code_norm;
      // This stage's int16 pass: packed (vq_cpu.cpp leaves packed_bf16 null for a stage the
      // single-stage rule gives the fp32 build), in the bound's range, and still paying here.
      const bool use_i16 = job.packed_bf16 && Q >= kMinQ && En < 0x1p50 && !hdr.fp32_only[hs];
      for (int r = 0; r < MR; ++r) {
        idx[r] = 0;
        flag[r] = false;
        need32[r] = on[r] && !use_i16;
        thr[r] = __builtin_inf();
        any32 |= need32[r];
      }
      if (use_i16) {
        const I16Bound bound(job, job.max_code_scale);
        const int cap = (int)imin(kResMaxCand, job.K);
        alignas(64) float mx[MR], l1[MR], tau[MR], inv[MR];
        bool provable[MR];
        row_scales(st, D, Q, on, xx, mx, l1, tau, inv, provable);
        to_pairs_i16(st, inv, D, xb);
        Top3 top;
        search_tile_i16_top3(xb, job.packed_bf16, job.norms, job.code_aux, tau, job.panels, D2,
                             top);
        int missed = 0;
        for (int r = 0; r < MR; ++r) {
          if (!on[r]) continue;
          idx[r] = top.k1[r];
          if (provable[r] && bound.quick(top.v1[r], top.v2[r], xx[r], l1[r], tau[r])) continue;
          if (job.approx_only) continue;  // VQK_DEBUG_APPROX_ONLY: the int16 answer, unproven
          ++missed;
          const double v1 = top.v1[r], v2 = top.v2[r];
          bool done = false;
          if (provable[r] && v1 - v1 == 0.0) {
            double B, dd;
            bound.terms(xx[r], l1[r], tau[r], B, dd);
            if (I16Bound::direct(v1, v2, B, dd)) {
              --missed;
              continue;
            }
            // 2. Candidates (see the top of this part); lim rounded up to float, the slack
            // covering the roundings of this sum.
            const double lim = v2 + (4.0 * dd + 7.0 * B) * (1.0 + 0x1p-10) + __builtin_fabs(v2) * 0x1p-20;
            float lf = (float)lim;
            if ((double)lf < lim) lf = __builtin_nextafterf(lf, __builtin_inff());
            if (v2 - v2 == 0.0 && lf < __builtin_inff()) {
              int32_t cand[kResMaxCand];
              int c;
              if (top.v3[r] > lf) {  // only k1 and k2 reach lim: listed in increasing k
                const int32_t ka = top.k1[r], kb = top.k2[r];
                cand[0] = ka < kb ? ka : kb;
                cand[1] = ka < kb ? kb : ka;
                c = 2;
              } else {
                c = collect_lane_i16(job, xb, r, tau[r], lf, cap, cand, lp);
              }
              // k1' and the runner-up are always listed; fewer means something is off: fp32.
              if (c >= 2 && c <= cap) {
                float val[kResMaxCand];
                fp32_values(job, st, r, cand, c, val);
                float b1 = __builtin_inff(), b2 = __builtin_inff();
                int32_t k1 = cand[0];
                for (int i = 0; i < c; ++i) {
                  if (val[i] < b1) { b2 = b1; b1 = val[i]; k1 = cand[i]; }
                  else if (val[i] < b2) b2 = val[i];
                }
                idx[r] = k1;
                // residual_tiles' test on the fp32 search's own values: the quick form, then decide.
                const float g32 = b2 - b1;
                double th;
                if (b1 - b1 == 0.0f && xx[r] < 0x1p100f && g32 < __builtin_inff() &&
                    g32 > qa + qb * xx[r])
                  done = true;
                else if (decide(job, b1, b2, xx[r], &th))
                  done = true;
                else {
                  // Flagged: the lowest exact minimiser among the candidates (residual_exact's
                  // answer: both sets hold every exact minimiser).
                  __atomic_fetch_add(&cpu::g_exact_rows, 1, __ATOMIC_RELAXED);
                  double best = __builtin_inf();
                  int64_t bk = 0;
                  for (int i = 0; i < c; ++i) {
                    const double dk = exact_dist<EF32>(job, st + r, cand[i]);
                    if (dk < best) { best = dk; bk = cand[i]; }  // increasing k: ties keep the lowest
                  }
                  idx[r] = (int32_t)bk;
                  xerr[r] = best < __builtin_inf() ? best : exact_dist<EF32>(job, st + r, bk);
                  flag[r] = true;
                  done = true;
                }
              }
            }
          }
          if (!done) {  // 3. the fp32 search of the tile decides this lane
            need32[r] = true;
            any32 = true;
          }
        }
        __atomic_fetch_add(&cpu::g_set_aside_rows, (int64_t)missed, __ATOMIC_RELAXED);
        hdr.seen[hs] += live;
        hdr.missed[hs] += missed + (any32 ? MR : 0);
        if (hdr.seen[hs] >= 4 * MR && 2 * hdr.missed[hs] > hdr.seen[hs]) hdr.fp32_only[hs] = true;
      }
      if (any32) {
        // residual_tiles' search, proof and exact re-search for these lanes.
        Top2 top;
        search_tile(st, job.packed, job.norms, job.panels, D, top);
        bool f32[MR];
        bool anyf = false;
        for (int r = 0; r < MR; ++r) {
          f32[r] = false;
          if (!need32[r]) continue;
          idx[r] = top.k1[r];
          thr[r] = __builtin_inf();
          const float v1 = top.v1[r], gap = top.v2[r] - v1;
          if (v1 - v1 == 0.0f && xx[r] < 0x1p100f && gap < __builtin_inff() && gap > qa + qb * xx[r])
            continue;
          if (decide(job, v1, top.v2[r], xx[r], &thr[r])) continue;
          f32[r] = flag[r] = anyf = true;
        }
        if (anyf) residual_exact(job, st, f32, thr, idx, xerr);
      }
      // From here residual_tiles' own steps (search_impl.h).
      residual_finish_stage(job, st, on, rowno, idx, flag, xerr, xt, qt, et);
    }
    if (rj.zq)
      for (int r = 0; r < MR; ++r) {
        if (rowno[r] < 0) continue;
        float* __restrict dst = rj.zq + rowno[r] * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = qt[d * MR + r];
      }
  }
}

}  // namespace

// search_avx2_i8.cpp includes this file for the functions above (VQK_I16_AS_PART); the build's
// entry point is defined here only.
#ifndef VQK_I16_AS_PART
namespace cpu {
const SearchKernels& kernels_avx2_i16() {
  static const SearchKernels k{"avx2_i16", MR, NR, pack_any_i16, search_any_i16,
                               flush_set_aside, i16_scratch_floats, false, true, residual_tiles_i16,
                               residual_i16_scratch_floats};
  return k;
}
}  // namespace cpu
#endif
}  // namespace vqk
