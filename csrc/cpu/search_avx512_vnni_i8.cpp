// AVX-512 VNNI int8 tier in front of the avx512_vnni_i16 pass (VQK_CPU_ISA=avx512_vnni_i8): the same
// answers as the exact fp32 search of the avx512 build (search_impl.h), bit for bit, from int8 dot
// products where their bound proves a whole tile, from the int16 VNNI pass (search_avx512_i16.cpp)
// where it does not, and from the fp32 search where neither does. avx2_i8's design
// (search_avx2_i8.cpp) on 512-bit registers, with vpdpbusd in place of its vpmaddubsw chain. Built
// with the avx512 flags plus -mavx512vnni; run only where the CPU reports AVX512_VNNI. Single-stage
// and grouped forwards; residual calls take avx512_vnni_i16 (vq_cpu.cpp).
//
// Why: _mm512_dpbusd_epi32 multiplies 64 unsigned bytes by 64 signed bytes, adds each group of four
// products and accumulates into 16 int32 lanes -- 64 multiply-adds per instruction against
// vpdpwssd's 32, one instruction per row vector and code per 4 dimensions. Unlike vpmaddubsw
// (avx2_i8) nothing saturates on the way: each product fits 16 bits and the four are summed in
// 32-bit arithmetic, so the bytes can use their whole range.
//
// Ranges:
//   codes: sigma_k = the smallest power of two >= 2^-100 with max_d |e_kd| <= 127 sigma_k,
//          q_kd = round(e_kd / sigma_k) in [-127, 127], stored as the unsigned byte c = q + 128 in
//          [1, 255] (vpdpbusd's unsigned operand, the code broadcast);
//   rows:  tau the smallest power of two >= 2^-100 with max_d |x_d| <= 127 tau, p_d = round(x_d / tau)
//          in [-127, 127] (signed bytes: vpdpbusd's signed operand, the row vectors).
//   One lane step adds c0 p0 + .. + c3 p3, each product |c p| <= 255 * 127 = 32385 (exact in the
//   instruction's 16-bit intermediates), summed into int32 without saturation; over D the lane holds
//   sum_d c_d p_d, |.| <= 255 * 127 * D < 2^31 for D <= 2^16 (kMaxD8): exact. The offset is removed
//   exactly in int32: p.(q + 128) - 128 sum_d p_d = p.q (|128 sum p| <= 2^7 * 127 * D < 2^31). D is
//   padded to a multiple of 8 with p = 0 (and c = 128), adding nothing.
//
// Bound: the int16 pass's proof (search_i16_common.h) holds word for word -- it uses only that p.q is
// the exact integer dot product, |x_d - tau p_d| <= tau/2, |e_kd - sigma_k q_kd| <= sigma_k/2, sigma
// and tau powers of two, and fl(p.q) = cvt of an exact int32 (relative error 2^-24). With S8 =
// max_k sigma_k of the int8 scales (~Q16/Q8 = 16-45x the int16 ones, half avx2_i8's), a row is
// accepted when v2 - v1 > (4 dd + 6 B)(1 + 2^-10) with S8 in dd; then the int8 best k1 is the exact
// nearest code and the fp32 build proves the same row with the same index, so finish_tile writes
// the fp32 build's bits (I16Bound with S8 in place of S).
//
// Rows the int8 bound cannot prove are handed on, a tile's worth at a time, to the int16 VNNI pass
// (search_i8_common.h), which proves them or hands them to the fp32 search exactly as the
// avx512_vnni_i16 build does.
//
// The int16 functions live in search_avx512_i16.cpp's anonymous namespace; this file includes it
// (with VQK_I16_VNNI and VQK_I16_AS_PART, which leaves out its build entries) so this build calls
// them as they are. Written with intrinsics only, as that file, for .ci/native_checks.sh
// x86-emulated (SIMDe).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
// GCC 12 flags the `__Y = __Y` placeholder inside avx512fintrin.h's unmasked intrinsics once the
// int16 tile body (search_block_i16) is inlined into this unit's hand-over too: a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#define VQK_I16_VNNI 1
#define VQK_I16_AS_PART 1
#include "search_avx512_i16.cpp"
#undef VQK_I16_AS_PART
#pragma GCC diagnostic pop

namespace vqk {
namespace {

// The byte ranges (see the top).
constexpr int32_t kQCode8 = 127, kQRow8 = 127, kCodeOff8 = 128;
constexpr int64_t kMaxD8 = (int64_t)1 << 16;

// The tile's rows as signed bytes: xq[(2s + h) * MR + r] = p_{8s+4h} .. p_{8s+4h+3} of row r (low
// byte first), p_d = round(x_d inv[r]) (inv = 1/tau, exact; 0 for lanes not proven), 0 past D;
// rs[r] = 128 sum_d p_d, the offset to take off.
void to_bytes_i8(const float* __restrict xt, const float* __restrict inv, int64_t D,
                 uint32_t* __restrict xq, int32_t* __restrict rs) {
  const __m512i low = _mm512_set1_epi32(0xff);
  __m512i sum[MRV];
  for (int b = 0; b < MRV; ++b) sum[b] = _mm512_setzero_si512();
  for (int64_t g = 0; g < 2 * ((D + 7) / 8); ++g)
#pragma GCC unroll 64
    for (int b = 0; b < MRV; ++b) {
      const __m512 s = _mm512_load_ps(inv + b * W);
      __m512i w = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        const int64_t d = 4 * g + c;
        if (d >= D) break;
        const __m512i p = _mm512_cvttps_epi32(
            _mm512_roundscale_ps(_mm512_mul_ps(_mm512_load_ps(xt + d * MR + b * W), s), kRound));
        sum[b] = _mm512_add_epi32(sum[b], p);
        w = _mm512_or_si512(w, _mm512_sllv_epi32(_mm512_and_si512(p, low), _mm512_set1_epi32(8 * c)));
      }
      _mm512_store_si512(xq + g * MR + b * W, w);
    }
  // The product in vector lanes (wrapping, as the sums do for lanes not proven, whose NaN rows
  // convert to INT_MIN: unused, and no undefined behaviour); GCC 12 warns on the shift's mask.
  for (int b = 0; b < MRV; ++b)
    _mm512_store_si512(rs + b * W, _mm512_mullo_epi32(sum[b], _mm512_set1_epi32(kCodeOff8)));
}

// The micro-kernel's loop over the D8 steps of one panel (codes b: D8 steps of NR x 2 words, the
// layout of search_i8_common.h's pack_codes_i8): per quad of dimensions the 3 row vectors, and per
// code its quad broadcast and vpdpbusd'ed into the 3 accumulators of that code. Its own function
// for i16_dots' reason (search_avx512_i16.cpp): 24 accumulators + 3 rows + the broadcast = 28 zmm.
// out is set to the panel's int32 sums (p.q plus the rows' offset).
__attribute__((noinline)) void i8_dots(const uint32_t* __restrict xq, const uint32_t* __restrict b,
                                       int64_t D8, __m512i (&out)[MRV][NR]) {
  __m512i acc[MRV][NR];
#pragma GCC unroll 64
  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t s = 0; s < D8; ++s, b += 2 * NR) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h, xq += MR) {
      __m512i xv[MRV];
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) xv[i] = _mm512_load_si512(xq + i * W);
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) {
        const __m512i bj = _mm512_set1_epi32((int32_t)b[2 * j + h]);
#pragma GCC unroll 64
        for (int i = 0; i < MRV; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], bj, xv[i]);
      }
    }
  }
#pragma GCC unroll 64
  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) out[i][j] = acc[i][j];
}

}  // namespace
}  // namespace vqk

// The width-independent part: the byte packing, the tile loop and its hand-over to the int16 pass.
#include "search_i8_common.h"

namespace vqk {
namespace cpu {
const SearchKernels& kernels_avx512_vnni_i8() {
  // flush_i8: the rows still handed on, then the int16 pass's rows set aside and the fp32
  // search's exact re-search, in the int16 scratch this build's scratch starts with.
  static const SearchKernels k{"avx512_vnni_i8", MR, NR, pack_any_i8, search_any_i8,
                               flush_i8, i8_scratch_floats, false, true, nullptr, nullptr,
                               true};
  return k;
}
}  // namespace cpu
}  // namespace vqk
