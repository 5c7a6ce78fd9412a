// AVX-512 int16 first pass (VQK_CPU_ISA=avx512_i16): avx2_i16's search on 512-bit registers, for
// AVX-512 CPUs without the bf16 path (Skylake-SP to Ice Lake; Zen 4 where avx512bf16 is not
// chosen). The same answers as the exact fp32 search (search_impl.h), bit for bit. Built with the
// avx512 build's flags (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c; vpmaddwd on zmm is
// AVX512BW) and run only after vq_cpu.cpp's run-time check. Written with intrinsics only, so that
// .ci/native_checks.sh x86-emulated can compile it against SIMDe and run it on a CPU without AVX-512.
//
// _mm512_madd_epi16 multiplies 32 int16 pairs and adds neighbours into 16 int32 lanes: 32
// multiply-adds per instruction against an fp32 FMA's 16. Under AVX512_VNNI (Cascade Lake on,
// Zen 4) _mm512_dpwssd_epi32 does the multiply-adds and the accumulation in one instruction
// (VQK_I16_VNNI, the avx512_vnni_i16 build: search_avx512_vnni_i16.cpp). On a Zen 4 EPYC and an
// Ice Lake Xeon this build was slower than the VNNI one at every shape timed (benchmarks/results/
// cpu-zen4-2026-12-02.md, cpu-icelake-2026-12-02.md), so `auto` never picks it (README, "Speed on
// a CPU").
//
// Tile: 3 x 16 rows against panels of 8 codes, as search_avx512.cpp: 24 zmm accumulators; with the
// 3 row vectors, the code broadcast and vpmaddwd's product (it cannot accumulate) 29 of the 32 zmm
// registers (i16_dots). Per pair step: 3 row loads, 8 broadcasts, 24 vpmaddwd,
// 24 vpaddd (VNNI: 24 vpdpwssd).
//
// Exactness: search_i16_common.h's quantization, bound and proof, unchanged. Nothing in them
// depends on the register width: each int32 lane is one row and one code, accumulating the same
// ceil(D/2) pair sums as an AVX2 lane (the exactness of the int32 sum, <= 2 ceil(D/2) Q^2 < 2^31,
// is per lane; vpdpwssd adds the two products of a pair to the lane without saturation, the same
// integer as vpmaddwd + vpaddd since no partial sum overflows), and the per-row and per-code
// scales are those of avx2_i16 (the same powers of two, the same int16 values). The epilogue is
// avx2_i16's per lane: fl(n_k - (2 sigma_k) fl(fl(p.q) tau)), fl(p.q) a correctly rounded int32 to
// fp32 conversion. So the bound and the test (I16Bound) hold word for word, rows it cannot prove go
// to the fp32 search of the same width (search_impl.h with the avx512 traits: the avx512 build's
// search, proof and exact re-search), and the output is the avx512 build's, bit for bit.
//
// Residual VQ: search_i16_residual.h's int16 pass per stage, avx2_i16's residual search on these
// tiles (collect_lane_i16 below is the width-specific part), bitwise the avx512 build's residual
// path; grouped VQ runs this build's search per group.
// The tile (3 x 16 rows by 8 codes) and the avx512 build's fp32 search.
#include "search_avx512_tile.h"

namespace vqk {
namespace {

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// One code panel's int16 pairs (search_i16_common.h, pack_codes_i16): dst[i * NR + j] =
// q_{2i} | q_{2i+1} << 16 of code j, q_d = round(e_d inv[j]) ties to even, the 8 codes as one
// vector of doubles (avx2_i16's values: the same double products, the same rounding). Codes left
// out have inv = 0 and are zeroed by the mask (a NaN times 0 would still be NaN).
static_assert(NR == 8, "quant_panel_i16 quantizes a panel's 8 codes as one vector of doubles");
VQK_ALWAYS_INLINE void quant_panel_i16(const float* __restrict src, const double* inv, int64_t D,
                                       uint32_t* __restrict dst) {
  const __m512d iv = _mm512_load_pd(inv);
  const auto keep = _mm512_cmp_pd_mask(iv, _mm512_setzero_pd(), _CMP_NEQ_OQ);  // __mmask8
  const auto quant = [&](const float* v) {  // round(v_j / sigma_j) for the 8 codes, as int32
    const __m512d q = _mm512_maskz_mul_pd(keep, _mm512_cvtps_pd(_mm256_loadu_ps(v)), iv);
    return _mm512_cvttpd_epi32(_mm512_roundscale_pd(q, kRound));
  };
  for (int64_t i = 0; i < (D + 1) / 2; ++i) {
    const __m256i lo = quant(src + 2 * i * NR);
    const __m256i hi = 2 * i + 1 < D ? quant(src + (2 * i + 1) * NR) : _mm256_setzero_si256();
    const __m256i w = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xffff)),
                                      _mm256_slli_epi32(hi, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * NR), w);
  }
}

// The tile's rows as int16 pairs: xb[i * MR + r] = p_{2i} | p_{2i+1} << 16 with p_d = round(x_d inv[r])
// (inv = 1/tau, exact; 0 for lanes that will not be proven, whose values do not matter).
void to_pairs_i16(const float* __restrict xt, const float* __restrict inv, int64_t D,
                  uint32_t* __restrict xb) {
  const __m512i low = _mm512_set1_epi32(0xffff);
  for (int64_t i = 0; i < (D + 1) / 2; ++i)
    for (int b = 0; b < MRV; ++b) {
      const __m512 s = _mm512_load_ps(inv + b * W);
      const __m512 lo = _mm512_mul_ps(_mm512_load_ps(xt + 2 * i * MR + b * W), s);
      const __m512 hi = 2 * i + 1 < D ? _mm512_mul_ps(_mm512_load_ps(xt + (2 * i + 1) * MR + b * W), s)
                                      : _mm512_setzero_ps();
      const __m512i li = _mm512_cvttps_epi32(_mm512_roundscale_ps(lo, kRound));
      const __m512i hj = _mm512_cvttps_epi32(_mm512_roundscale_ps(hi, kRound));
      _mm512_store_si512(xb + i * MR + b * W,
                         _mm512_or_si512(_mm512_and_si512(li, low), _mm512_slli_epi32(hj, 16)));
    }
}

// acc += the pair dot products of x and the broadcast code pair b, lane by lane.
VQK_ALWAYS_INLINE __m512i madd_acc(__m512i acc, __m512i x, __m512i b) {
#if defined(VQK_I16_VNNI)
  return _mm512_dpwssd_epi32(acc, x, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(x, b));
#endif
}

// The micro-kernel's loop over the D2 pair steps of one panel: per step the 3 row vectors, and per
// code its pair broadcast and multiply-added into the 3 accumulators of that code. Its own function
// (not inlined, the accumulators local): inlined into search_tile_i16, whose best-two state and
// scales stay live across the panel loop, GCC 12 kept 9 (VNNI) to 17 of the 24 accumulators on the
// stack inside this loop, a load and a store each per step; alone it holds all of them in registers
// (24 + 3 rows + broadcast + product = 29 zmm; test_cpu_kernel checks the machine code). One call
// per panel costs a few cycles against D2 x 24 multiply-adds.
__attribute__((noinline)) void i16_dots(const uint32_t* __restrict xb, const uint32_t* __restrict b,
                                        int64_t D2, __m512i (&out)[MRV][NR]) {
  __m512i acc[MRV][NR];
#pragma GCC unroll 64
  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t s = 0; s < D2; ++s, xb += MR, b += NR) {
    __m512i xv[MRV];
#pragma GCC unroll 64
    for (int i = 0; i < MRV; ++i) xv[i] = _mm512_load_si512(xb + i * W);
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) {
      const __m512i bj = _mm512_set1_epi32((int32_t)b[j]);
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) acc[i][j] = madd_acc(acc[i][j], xv[i], bj);
    }
  }
#pragma GCC unroll 64
  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) out[i][j] = acc[i][j];
}

}  // namespace
}  // namespace vqk

// The width-independent part: pack_codes_i16, the bound, search_tiles_i16 (and through it
// search_set_aside.h: the rows set aside, flush_set_aside).
#include "search_i16_common.h"

namespace vqk {
namespace {

// The codes k with a_k' <= lim for lane r of the int16 tile xb (tau: the lane's scale), in
// increasing k, into out[0 .. cap); returns their number, cap + 1 when there are more (the
// residual search's candidates, search_i16_residual.h). a_k' is search_tile_i16's value bit for
// bit: the exact int32 dot (here summed two pair steps at a time into two accumulators, an exact
// reordering: every partial sum is bounded by D Q^2 < 2^31), converted, times tau (exact), then
// fl(n_k - (2 sigma_k) dot) in one rounding. Padding and non-finite codes have n_k = +inf or NaN
// and are never listed. Written for the packed layout [panel][D2][NR = 8] words: one 512-bit load
// is two pair steps of a panel's 8 codes, against the lane's pairs laid out the same way in lp.
static_assert(NR == 8, "collect_lane_i16 reads two pair steps of a panel's 8 codes per 512-bit load");
int collect_lane_i16(const cpu::FwdJob& job, const uint32_t* __restrict xb, int r, float tau,
                     float lim, int cap, int32_t* __restrict out, uint32_t* __restrict lp) {
  const int64_t D2 = (job.D + 1) / 2, H = D2 / 2;
  lane_pairs(xb, r, H, lp);
  const __m256i last = _mm256_set1_epi32((int32_t)(D2 & 1 ? xb[(D2 - 1) * MR + r] : 0u));
  const __m256 tv = _mm256_set1_ps(tau), lv = _mm256_set1_ps(lim), two = _mm256_set1_ps(2.0f);
  int n = 0;
  for (int64_t p = 0; p < job.panels; ++p) {
    const uint32_t* b = job.packed_bf16 + p * D2 * NR;
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    int64_t h = 0;
    for (; h + 1 < H; h += 2) {
      a0 = madd_acc(a0, _mm512_loadu_si512(b + 2 * NR * h), _mm512_loadu_si512(lp + 2 * NR * h));
      a1 = madd_acc(a1, _mm512_loadu_si512(b + 2 * NR * h + 2 * NR),
                    _mm512_loadu_si512(lp + 2 * NR * h + 2 * NR));
    }
    if (h < H)
      a0 = madd_acc(a0, _mm512_loadu_si512(b + 2 * NR * h), _mm512_loadu_si512(lp + 2 * NR * h));
    a0 = _mm512_add_epi32(a0, a1);
    __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(a0), _mm512_extracti64x4_epi64(a0, 1));
    if (D2 & 1)
      s = _mm256_add_epi32(s, _mm256_madd_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2 * NR * H)), last));
    const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(s), tv);
    const __m256 dist = _mm256_fnmadd_ps(dot, _mm256_mul_ps(two, _mm256_loadu_ps(job.code_aux + p * NR)),
                                         _mm256_loadu_ps(job.norms + p * NR));
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(dist, lv, _CMP_LE_OQ));
    if (m) list_codes(m, p, cap, out, n);
  }
  return n;
}

}  // namespace
}  // namespace vqk

// The residual search on top of it (search_tile_i16, residual_tiles_i16): each stage's
// search of a tile first on int16 pairs, bitwise the avx512 build's residual path.
#include "search_i16_residual.h"

// search_avx512_vnni_i8.cpp includes this file for the functions above (VQK_I16_AS_PART, with
// VQK_I16_VNNI); the build's entries are then its own.
#ifndef VQK_I16_AS_PART
namespace vqk {
namespace cpu {
#if defined(VQK_I16_VNNI)
const SearchKernels& kernels_avx512_vnni_i16() {
  static const SearchKernels k{"avx512_vnni_i16", MR, NR, pack_any_i16, search_any_i16,
                               flush_set_aside, i16_scratch_floats, false, true, residual_tiles_i16,
                               residual_i16_scratch_floats};
  return k;
}
#else
const SearchKernels& kernels_avx512_i16() {
  static const SearchKernels k{"avx512_i16", MR, NR, pack_any_i16, search_any_i16,
                               flush_set_aside, i16_scratch_floats, false, true, residual_tiles_i16,
                               residual_i16_scratch_floats};
  return k;
}
#endif
}  // namespace cpu
}  // namespace vqk
#endif  // VQK_I16_AS_PART
