// AVX-512 BF16 search: the same answers as the exact fp32 search (search_impl.h), from bf16 dot
// products.
//
// vdpbf16ps does 32 multiply-adds per instruction (pairs of bf16 products into 16 fp32 lanes), twice
// the fp32 FMA rate. Rows and codes are rounded to bf16, the micro-kernel keeps each row's best two
// approximate distances, and then:
//   1. both candidates' distances are recomputed in fp32 exactly as the fp32 kernel computes them
//      (the same FMA chain over d, the same norms), and the better one (ties: lower index) is taken;
//   2. the choice is proven to be the exact nearest code when (a) the two fp32 distances are apart
//      by more than 2B, B the fp32 kernel's rounding bound (search_impl.h, `decide`), and (b) every
//      other code is certainly farther: a code outside the best two has a bf16 distance >= v2 (the
//      second best), and the bf16 and fp32 distances of any code differ by at most
//         delta = (2^-5 + D 2^-21) ||x|| max||e|| + 2^-21 max||e||^2 + tiny
//      (bf16 rounding of both factors, 2u + u^2 with u = 2^-8, on sum |x_d e_d| <= ||x|| ||e||, doubled
//      by the -2 and by a factor of 2 for safety; the fp32 accumulations, D 2^-24 each; the final
//      roundings; flushed denormals), so its true distance is >= v2 - delta - B while the chosen
//      one's is <= best + B: proven when v2 - delta - 2B > best;
//   3. otherwise (near ties, NaN or infinite values, extreme norms) the row is set aside and searched
//      again by the fp32 search of search_impl.h (which proves its own answers or measures the
//      remaining candidates exactly), in tiles of such rows, when enough have gathered or when the
//      thread has no more tiles. A thread that has set aside more than a quarter of its first rows
//      (data with many near ties, where the bf16 pass is wasted) does plain fp32 tiles for the rest
//      of the call. Every path gives the exact nearest code, so this changes speed only.
// It pays off when rows sit clearly closer to one code than to the rest (trained VQ codebooks); on
// rows with many near ties it falls back to fp32 work and costs more.
// The tile (3 x 16 rows by 8 codes) and the avx512 build's fp32 search.
#include "search_avx512_tile.h"
// The rows set aside and their hand-over to the fp32 search.
#include "search_set_aside.h"

namespace vqk {
namespace {

// Per-thread scratch (search_set_aside.h): xb holds the tile's bf16 pairs.
int64_t bf16_scratch_floats(int64_t D) { return set_aside_scratch_floats(D, pair_floats(D)); }

// Two fp32 vectors (elements d and d+1 of 16 rows or codes) as 16 words of bf16 pairs.
inline __m512i pairs16(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}
inline __m256i pairs8(__m256 lo, __m256 hi) {
  const __m256i l = _mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh(lo));
  const __m256i h = _mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh(hi));
  return _mm256_or_si256(l, _mm256_slli_epi32(h, 16));
}

template <class E>
void pack_codes_bf16(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  static_assert(NR == 8, "pairs8 packs one panel row of 8 codes");
  pack_codes<E>(job, p_lo, p_hi);
  const int64_t D = job.D, D2 = (D + 1) / 2;
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const float* src = job.packed + p * D * NR;
    uint32_t* dst = job.packed_bf16 + p * D2 * NR;
    for (int64_t i = 0; i < D2; ++i) {
      const __m256 lo = _mm256_loadu_ps(src + 2 * i * NR);
      const __m256 hi = 2 * i + 1 < D ? _mm256_loadu_ps(src + (2 * i + 1) * NR) : _mm256_setzero_ps();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * NR), pairs8(lo, hi));
    }
  }
}

void to_pairs(const float* __restrict xt, int64_t D, uint32_t* __restrict xb) {
  for (int64_t i = 0; i < (D + 1) / 2; ++i)
    for (int b = 0; b < MRV; ++b) {
      const __m512 lo = _mm512_load_ps(xt + 2 * i * MR + b * W);
      const __m512 hi = 2 * i + 1 < D ? _mm512_load_ps(xt + (2 * i + 1) * MR + b * W)
                                      : _mm512_setzero_ps();
      _mm512_store_si512(xb + i * MR + b * W, pairs16(lo, hi));
    }
}

// The bf16 micro-kernel: like search_tile, but bf16 pairs and the best two per lane.
VQK_ALWAYS_INLINE void search_tile_bf16(const uint32_t* __restrict xb, const uint32_t* __restrict pb,
                                        const float* __restrict norms, int64_t panels, int64_t D2,
                                        int32_t* __restrict k1o, int32_t* __restrict k2o,
                                        float* __restrict v2o) {
  __m512 b1[MRV], b2[MRV];
  __m512i k1[MRV], k2[MRV];
  for (int i = 0; i < MRV; ++i) {
    b1[i] = b2[i] = _mm512_set1_ps(__builtin_inff());
    k1[i] = k2[i] = _mm512_setzero_si512();
  }
  const __m512 two = _mm512_set1_ps(2.0f);
  for (int64_t p = 0; p < panels; ++p) {
    const uint32_t* b = pb + p * D2 * NR;
    __m512 acc[MRV][NR];
#pragma GCC unroll 64
    for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    const uint32_t* xp = xb;
    for (int64_t d = 0; d < D2; ++d, xp += MR, b += NR) {
      __m512bh xv[MRV];
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) xv[i] = (__m512bh)_mm512_load_si512(xp + i * W);
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) {
        const __m512bh bj = (__m512bh)_mm512_set1_epi32((int)b[j]);
#pragma GCC unroll 64
        for (int i = 0; i < MRV; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], bj);
      }
    }
    const float* nrm = norms + p * NR;
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) {
      const __m512 nj = _mm512_set1_ps(nrm[j]);
      const __m512i kj = _mm512_set1_epi32((int32_t)(p * NR + j));
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) {
        const __m512 dist = _mm512_fnmadd_ps(acc[i][j], two, nj);
        const __mmask16 m1 = _mm512_cmp_ps_mask(dist, b1[i], _CMP_LT_OQ);
        const __mmask16 m2 = _mm512_cmp_ps_mask(dist, b2[i], _CMP_LT_OQ);  // m1 implies m2
        b2[i] = _mm512_mask_mov_ps(_mm512_mask_mov_ps(b2[i], m2, dist), m1, b1[i]);
        k2[i] = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(k2[i], m2, kj), m1, k1[i]);
        b1[i] = _mm512_mask_mov_ps(b1[i], m1, dist);
        k1[i] = _mm512_mask_mov_epi32(k1[i], m1, kj);
      }
    }
  }
  for (int i = 0; i < MRV; ++i) {
    _mm512_store_si512(k1o + i * W, k1[i]);
    _mm512_store_si512(k2o + i * W, k2[i]);
    _mm512_store_ps(v2o + i * W, b2[i]);
  }
}

// fp32 distance of each lane's row to code k[lane], computed as the fp32 micro-kernel does.
template <class E>
VQK_ALWAYS_INLINE __m512 fp32_dist(const cpu::FwdJob& job, const float* xt, float* et, int blk,
                                   const int32_t* k) {
  using T = typename E::T;
  const T* cb = static_cast<const T*>(job.codebook);
  const T* rp[W];
  alignas(64) float nrm[W];
  for (int r = 0; r < W; ++r) {
    rp[r] = cb + (int64_t)k[r] * job.D;
    nrm[r] = job.norms[k[r]];
  }
  pack_block<E>(rp, 1, job.D, et + blk * W);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < job.D; ++d)
    acc = _mm512_fmadd_ps(_mm512_load_ps(xt + d * MR + blk * W), _mm512_load_ps(et + d * MR + blk * W), acc);
  return _mm512_fnmadd_ps(acc, _mm512_set1_ps(2.0f), _mm512_load_ps(nrm));
}

template <class E>
void search_tiles_bf16(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  const int64_t N = job.x.B * job.x.S, D = job.D, D2 = (D + 1) / 2;
  const Areas a(scratch, D);
  alignas(64) int32_t k1[MR], k2[MR], idx[MR];
  alignas(64) float v2[MR];
  int64_t rowno[MR];
  const float E_ = (float)job.max_code_norm;  // +inf when >= 2^128: nothing is proven then
  const __m512 c_rel = _mm512_set1_ps(0.03125f + (float)D * 4.76837158e-7f);  // 2^-5 + D 2^-21
  const __m512 c_abs = _mm512_set1_ps(4.76837158e-7f * E_ * E_ + 1e-30f * (float)(D + 1) * (E_ + 1.0f));
  const __m512 vE = _mm512_set1_ps(E_);
  // The fp32 bound B of search_impl.h's `decide`, in fp32 vectors (2% more for their rounding).
  const __m512 b_rel = _mm512_set1_ps((float)((2.0 * D + 8.0) * 0x1p-24 * 1.03));
  const __m512 b_sq = _mm512_set1_ps((float)((D + 2.0) * 0x1p-50 * 1.02));
  const __m512 b_abs = _mm512_set1_ps((float)((4.0 * D + 8.0) * 0x1p-120 * 1.02));
  const __m512 x_pad = _mm512_set1_ps((float)(D * 0x1p-126));
  const __m512 x_up = _mm512_set1_ps((float)(1.0 + (D + 3.0) * 0x1p-24));
  const bool e_in_range = (double)E_ < 0x1p50;
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<E>(job, row0, rows, a.xt);
    if (a.pend->fp32_only) {
      search_block<E>(job, rowno, a.xt, a.base);
      continue;
    }
    a.pend->seen += rows;
    to_pairs(a.xt, D, a.xb);
    search_tile_bf16(a.xb, job.packed_bf16, job.norms, job.panels, D2, k1, k2, v2);
    for (int blk = 0; blk < MRV; ++blk) {
      __m512 xx = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m512 v = _mm512_load_ps(a.xt + d * MR + blk * W);
        xx = _mm512_fmadd_ps(v, v, xx);
      }
      const __m512 d1 = fp32_dist<E>(job, a.xt, a.et, blk, k1 + blk * W);
      const __m512 d2 = fp32_dist<E>(job, a.xt, a.et, blk, k2 + blk * W);
      const __m512i i1 = _mm512_load_si512(k1 + blk * W), i2 = _mm512_load_si512(k2 + blk * W);
      const __mmask16 take2 = _mm512_cmp_ps_mask(d2, d1, _CMP_LT_OQ) |
                              (_mm512_cmp_ps_mask(d2, d1, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(i2, i1));
      const __m512 best = _mm512_mask_mov_ps(d1, take2, d2);
      _mm512_store_si512(idx + blk * W, _mm512_mask_mov_epi32(i1, take2, i2));
      // Proven (the exact nearest code, see search_impl.h) when
      //   * the fp32 distances of the two candidates are apart by more than 2B (so the better one
      //     is exactly the nearer of the two), and
      //   * every other code is certainly farther: its bf16 value is >= v2 and its true distance
      //     >= v2 - delta - B, while the chosen one's is <= best + B: v2 - delta - 2B > best;
      // ordered compares, so NaN anywhere means not proven. Not proven either: a row of tiny
      // values (||x||^2 < 2^-100: bf16 flushes denormals to zero), or one outside the fp32 bound's
      // range (||x||^2 >= 2^100 or max||e|| >= 2^50) -- which also keeps the bf16 products finite.
      const __m512 xe = _mm512_mul_ps(_mm512_sqrt_ps(xx), vE);  // ||x|| max||e||
      const __m512 delta = _mm512_fmadd_ps(c_rel, xe, c_abs);
      const __m512 xn = _mm512_mul_ps(_mm512_sqrt_ps(_mm512_add_ps(xx, x_pad)), x_up);
      const __m512 ee = _mm512_mul_ps(vE, _mm512_fmadd_ps(_mm512_set1_ps(2.0f), xn, vE));
      const __m512 B = _mm512_fmadd_ps(b_rel, ee, _mm512_fmadd_ps(b_sq, _mm512_mul_ps(xn, xn),
          _mm512_mul_ps(b_abs, _mm512_add_ps(_mm512_add_ps(vE, xn), _mm512_set1_ps(1.0f)))));
      const __m512 twoB = _mm512_add_ps(B, B);
      const __m512 gap = _mm512_sub_ps(_mm512_max_ps(d1, d2), _mm512_min_ps(d1, d2));
      const __mmask16 ok =
          (e_in_range ? (__mmask16)0xffff : (__mmask16)0) &
          _mm512_cmp_ps_mask(_mm512_add_ps(best, twoB),
                             _mm512_sub_ps(_mm512_load_ps(v2 + blk * W), delta), _CMP_LT_OQ) &
          _mm512_cmp_ps_mask(gap, twoB, _CMP_GT_OQ) &
          _mm512_cmp_ps_mask(xx, _mm512_set1_ps(7.88860905e-31f), _CMP_GE_OQ) &
          _mm512_cmp_ps_mask(xx, _mm512_set1_ps(1.2676506e30f), _CMP_LT_OQ) &
          _mm512_cmp_ps_mask(d1, d1, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(d2, d2, _CMP_EQ_OQ);
      for (int r = 0; r < W; ++r) {
        const int lane = blk * W + r;
        if (rowno[lane] >= 0 && !((ok >> r) & 1)) set_aside<E>(job, a, rowno, lane);
      }
    }
    finish_tile<E>(job, rowno, a.xt, a.et, idx);
    // Break-even is near 40% set aside (a bf16 tile costs ~0.6 of an fp32 one, plus the re-search).
    fp32_only_after(*a.pend, 4);
  }
}

void pack_any_bf16(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  switch (job.dtype) {
    case DType::f16: return pack_codes_bf16<EF16>(job, p_lo, p_hi);
    case DType::bf16: return pack_codes_bf16<EBF16>(job, p_lo, p_hi);
    default: return pack_codes_bf16<EF32>(job, p_lo, p_hi);
  }
}

void search_any_bf16(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  switch (job.dtype) {
    case DType::f16: return search_tiles_bf16<EF16>(job, t_lo, t_hi, scratch);
    case DType::bf16: return search_tiles_bf16<EBF16>(job, t_lo, t_hi, scratch);
    default: return search_tiles_bf16<EF32>(job, t_lo, t_hi, scratch);
  }
}

}  // namespace

namespace cpu {
const SearchKernels& kernels_avx512bf16() {
  static const SearchKernels k{"avx512bf16", MR, NR, pack_any_bf16, search_any_bf16, flush_set_aside,
                               bf16_scratch_floats, true, false, nullptr, nullptr};
  return k;
}
}  // namespace cpu
}  // namespace vqk
