// AVX2 int8 tier in front of the int16 first pass (VQK_CPU_ISA=avx2_i8): the same answers as the
// exact fp32 search (search_impl.h), bit for bit, from int8 dot products where their coarse bound
// proves the row, from the int16 pass (search_avx2_i16.cpp) where it does not, and from the fp32
// search where neither does. Built with -mavx2 -mfma -mf16c. `auto` takes it where it took
// avx2_i16 (AMD family 25 without AVX-512, K >= 64, D >= 16; vq_cpu.cpp): there its CPU time was
// 0.67-0.85x avx2_i16's at issue 16's five shapes (benchmarks/results/cpu-avx2-i8.md). Single-stage
// and grouped forwards (each group a job of its own, vq_cpu.cpp); residual calls take avx2_i16.
//
// Why: vpmaddubsw multiplies 32 unsigned bytes by 32 signed bytes and adds neighbours into 16 int16
// lanes, one multiply-pipe op per 32 multiply-adds. Shape (b) of benchmarks/results/cpu-avx2-i16-
// profile.md ("Fourth look"): per row vector and code, two vpmaddubsw (dimensions 0-3 and 4-7 of
// every row lane) + vpaddw + vpmaddwd by ones (int16 pairs -> int32) + vpaddd: 64 multiply-adds in
// 1.5 multiply-pipe ops, measured 1.5-1.8x the int16 kernel step in benchmarks/fma_probe.cpp.
//
// Ranges (the int16 lanes must stay exact: vpmaddubsw saturates, vpaddw wraps):
//   codes: sigma_k = the smallest power of two >= 2^-100 with max_d |e_kd| <= 63 sigma_k,
//          q_kd = round(e_kd / sigma_k) in [-63, 63], stored as the unsigned byte c = q + 64 in
//          [1, 127] (the broadcast register operand: vpmaddubsw's unsigned side);
//   rows:  tau the smallest power of two >= 2^-100 with max_d |x_d| <= 64 tau, p_d = round(x_d / tau)
//          in [-64, 64] (signed bytes, the memory operand).
//   One vpmaddubsw lane is c0 p0 + c1 p1, |.| <= 2 * 127 * 64 = 16256; vpaddw adds two such lanes,
//   |.| <= 32512 <= 32767: never saturates nor wraps. vpmaddwd by ones adds two int16 lanes into int32
//   (exact), vpaddd accumulates over D: |sum| <= 127 * 64 * D = 8128 D < 2^31 for D <= 2^18 (kMaxD).
//   The offset is removed exactly in int32: p.(q + 64) - 64 sum_d p_d = p.q, one row sum per row
//   (|64 sum p| <= 4096 D). D is padded to a multiple of 8 with p = 0 (and c = 64), adding nothing.
//
// Bound: the int16 pass's proof (search_i16_common.h) holds word for word -- it uses only that p.q is the exact
// integer dot product, |x_d - tau p_d| <= tau/2, |e_kd - sigma_k q_kd| <= sigma_k/2, sigma and tau
// powers of two, and fl(p.q) = cvt of an exact int32 (relative error 2^-24); the integer ranges
// (here |p| <= 64, |q| <= 63, |p.q| <= 4032 D < 2^31) enter only through exactness. So with
// S8 = max_k sigma_k (the int8 scales, ~Q16/Q8 = 30-90x int16's), L >= max_k ||e_k||_1,
//   dd = (S8/2) L1(x) + (tau/2) (L + D S8 / 2),
// a row is accepted when v2 - v1 > (4 dd + 6 B)(1 + 2^-10), B the fp32 search's own bound; then the
// int8 pass's best k1 is the exact nearest code and the fp32 build proves the same row with the same
// index, so finish_tile writes the fp32 build's bits. The test, quick (float) form included, is
// I16Bound's with S8 in place of S.
//
// Rows the int8 bound cannot prove are handed on, a tile's worth at a time, to the int16 pass
// (search_i8_common.h: search_block_i16 on the gathered rows), which proves them or hands them to
// the fp32 search exactly as the avx2_i16 build does. A thread that hands on more than a third of
// its first rows does int16 tiles for the rest of the call (an int8 tile costs ~0.6 of an int16
// one), never fp32 tiles: the int16 pass still proves most rows the int8 one cannot. (Until
// 2026-12-03 a whole tile went back to the int16 pass for one unproven row.)
//
// The int16 functions live in search_avx2_i16.cpp's anonymous namespace; this file includes it
// (with VQK_I16_AS_PART, which leaves out its kernels_avx2_i16 definition) so this build calls them
// as they are. Each translation unit gets its own copy of that code.
// Its build entry's two dispatchers are unused here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#define VQK_I16_AS_PART 1
#include "search_avx2_i16.cpp"
#undef VQK_I16_AS_PART
#pragma GCC diagnostic pop

namespace vqk {
namespace {

// The byte ranges (see the top): codes q + 64 with |q| <= 63, rows |p| <= 64; D up to 2^18.
constexpr int32_t kQCode8 = 63, kQRow8 = 64, kCodeOff8 = 64;
constexpr int64_t kMaxD8 = (int64_t)1 << 18;

// The tile's rows as signed bytes: xq[(2s + h) * MR + r] = p_{8s+4h} .. p_{8s+4h+3} of row r (low
// byte first), p_d = round(x_d inv[r]) (inv = 1/tau, exact; 0 for lanes not proven), 0 past D;
// rs64[r] = 64 sum_d p_d, the offset to take off.
void to_bytes_i8(const float* __restrict xt, const float* __restrict inv, int64_t D,
                 uint32_t* __restrict xq, int32_t* __restrict rs64) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i low = _mm256_set1_epi32(0xff);
  __m256i sum[MRV];
  for (int b = 0; b < MRV; ++b) sum[b] = _mm256_setzero_si256();
  for (int64_t g = 0; g < 2 * ((D + 7) / 8); ++g)
#pragma GCC unroll 64
    for (int b = 0; b < MRV; ++b) {
      const __m256 s = _mm256_load_ps(inv + b * W);
      __m256i w = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        const int64_t d = 4 * g + c;
        if (d >= D) break;
        const __m256i p = _mm256_cvttps_epi32(
            _mm256_round_ps(_mm256_mul_ps(_mm256_load_ps(xt + d * MR + b * W), s), mode));
        sum[b] = _mm256_add_epi32(sum[b], p);
        w = _mm256_or_si256(w, _mm256_slli_epi32(_mm256_and_si256(p, low), 8 * c));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(xq + g * MR + b * W), w);
    }
  for (int b = 0; b < MRV; ++b)
    _mm256_store_si256(reinterpret_cast<__m256i*>(rs64 + b * W), _mm256_slli_epi32(sum[b], 6));
}

// vpmaddwd's second operand: int16 ones, a static (rip-relative) memory operand -- the loop has no
// register left for it, and a stack copy would be the kind of operand test_cpu_kernel checks for.
alignas(32) const int16_t kOnes16[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// The int8 micro-kernel's loop over the D8 steps of 8 dimensions, one asm statement (for the reason
// i16_dots is one): per step and code, broadcast the code's two byte quads (ymm12: dimensions 0-3,
// ymm13: 4-7), and per row vector vpmaddubsw each with the rows' quads read from the tile (memory
// operands), vpaddw the two, vpmaddwd by ones, vpaddd into the accumulator. 12 accumulators +
// ymm12-15 = all 16 registers. AT&T order: `vpmaddubsw mem, %ymm12, %ymm14` multiplies ymm12's
// unsigned bytes (codes) by mem's signed bytes (rows).
static_assert(MRV == 3 && NR == 4, "i8_dots is written for 3 x 4 accumulators");
#define VQK_I8_ROW(i, a)                                     \
  "vpmaddubsw " #i "*32(%[x]), %%ymm12, %%ymm14\n\t"        \
  "vpmaddubsw 96+" #i "*32(%[x]), %%ymm13, %%ymm15\n\t"     \
  "vpaddw %%ymm15, %%ymm14, %%ymm14\n\t"                     \
  "vpmaddwd %[ones], %%ymm14, %%ymm14\n\t"                   \
  "vpaddd %%ymm14, %[" #a "], %[" #a "]\n\t"
#define VQK_I8_CODE(j, a0, a1, a2)                 \
  "vpbroadcastd " #j "*8(%[b]), %%ymm12\n\t"       \
  "vpbroadcastd " #j "*8+4(%[b]), %%ymm13\n\t"     \
  VQK_I8_ROW(0, a0) VQK_I8_ROW(1, a1) VQK_I8_ROW(2, a2)
// xq: D8 steps of 2 x MR words (32-byte aligned), b: D8 steps of NR x 2 words; acc is set to the
// panel's int32 sums (p.q plus the rows' offset).
VQK_ALWAYS_INLINE void i8_dots(const uint32_t* xq, const uint32_t* b, int64_t D8, __m256i (&acc)[MRV][NR]) {
#pragma GCC unroll 64
  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  if (D8 <= 0) return;
  const uint32_t* end = xq + D8 * 2 * MR;
  __asm__("1:\n\t"
          VQK_I8_CODE(0, a00, a10, a20) VQK_I8_CODE(1, a01, a11, a21)
          VQK_I8_CODE(2, a02, a12, a22) VQK_I8_CODE(3, a03, a13, a23)
          "add $192, %[x]\n\t"
          "add $32, %[b]\n\t"
          "cmp %[end], %[x]\n\t"
          "jne 1b"
          : [a00] "+x"(acc[0][0]), [a01] "+x"(acc[0][1]), [a02] "+x"(acc[0][2]), [a03] "+x"(acc[0][3]),
            [a10] "+x"(acc[1][0]), [a11] "+x"(acc[1][1]), [a12] "+x"(acc[1][2]), [a13] "+x"(acc[1][3]),
            [a20] "+x"(acc[2][0]), [a21] "+x"(acc[2][1]), [a22] "+x"(acc[2][2]), [a23] "+x"(acc[2][3]),
            [x] "+r"(xq), [b] "+r"(b)
          // 12 + 2 in-out operands count twice: with these two inputs, GCC's limit of 30. The rows
          // and codes the loop reads are declared by the "memory" clobber.
          : [end] "r"(end), [ones] "m"(*reinterpret_cast<const __m256i*>(kOnes16))
          : "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}
#undef VQK_I8_CODE
#undef VQK_I8_ROW

}  // namespace
}  // namespace vqk

// The width-independent part: the byte packing, the tile loop and its hand-over to the int16 pass.
#include "search_i8_common.h"

namespace vqk {
namespace cpu {
const SearchKernels& kernels_avx2_i8() {
  // flush_i8: the rows still handed on, then the int16 pass's rows set aside and the fp32
  // search's exact re-search, in the int16 scratch this build's scratch starts with.
  static const SearchKernels k{"avx2_i8", MR, NR, pack_any_i8, search_any_i8, flush_i8,
                               i8_scratch_floats, false, true, nullptr, nullptr, true};
  return k;
}
}  // namespace cpu
}  // namespace vqk
