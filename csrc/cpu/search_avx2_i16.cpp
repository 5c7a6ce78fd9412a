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
// 256-bit pieces that header calls, and the 256-bit candidate pass (collect_lane_i16) of the
// residual-VQ search (int16 pass per stage: search_i16_residual.h, shared with the 512-bit build).
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

// The codes k with a_k' <= lim for lane r of the int16 tile xb (tau: the lane's scale), in
// increasing k, into out[0 .. cap); returns their number, cap + 1 when there are more. a_k' is
// search_tile_i16's value bit for bit: the exact int32 dot (here summed two pair-steps at a time,
// an exact reordering: every partial sum is bounded by D Q^2 < 2^31), converted, times tau (exact),
// then fl(n_k - (2 sigma_k) dot) in one rounding. Padding and non-finite codes have n_k = +inf or
// NaN and are never listed.
// Written for the packed layout [panel][D2][NR = 4] words: one 256-bit load is two pair-steps of
// a panel's 4 codes.
static_assert(NR == 4, "collect_lane_i16 reads two pair steps of a panel's 4 codes per 256-bit load");
int collect_lane_i16(const cpu::FwdJob& job, const uint32_t* __restrict xb, int r, float tau,
                     float lim, int cap, int32_t* __restrict out, uint32_t* __restrict lp) {
  const int64_t D2 = (job.D + 1) / 2, H = D2 / 2;
  lane_pairs(xb, r, H, lp);
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
    if (m) list_codes(m, p, cap, out, n);
  }
  return n;
}

}  // namespace
}  // namespace vqk

// The residual search on top of it (search_tile_i16, residual_tiles_i16).
#include "search_i16_residual.h"

namespace vqk {

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
