// The int8 tier's parts that do not depend on the vector width, shared by its x86 builds:
// avx2_i8 (search_avx2_i8.cpp: vpmaddubsw on 256-bit registers, in front of avx2_i16) and
// avx512_vnni_i8 (search_avx512_vnni_i8.cpp: vpdpbusd on 512-bit registers, in front of
// avx512_vnni_i16). Here: the byte packing of the codes, the per-thread state, and the tile loop:
// the rows the int8 bound proves are finished from the int8 tile; the others are handed on, a
// tile's worth at a time, to the int16 pass of search_i16_common.h (search_block_i16), which proves
// them or sets them aside for the fp32 search exactly as the int16 build would. Every row's answer
// depends on that row alone, so which rows go which way changes the speed only. Each unit's
// top states its byte ranges and why its int32 sums are exact; the proof is the int16 pass's
// (I16Bound) with the int8 code scales.
//
// Include after search_i16_common.h, in the unit's anonymous namespace's reach, once the unit has
// defined:
//   kQCode8, kCodeOff8    codes: |q| <= kQCode8, stored as the unsigned byte q + kCodeOff8;
//   kQRow8                rows: |p| <= kQRow8 (signed bytes);
//   kMaxD8                the largest D whose int32 sums stay exact;
//   to_bytes_i8(xt, inv, D, xq, rs)   the tile's rows as signed-byte quads, xq[(2s + h) * MR + r] =
//                         p_{8s+4h} .. p_{8s+4h+3} of row r (low byte first, 0 past D), and rs[r] =
//                         kCodeOff8 sum_d p_d, the offset the codes' bias adds to each dot product;
//   i8_dots(xq, b, D8, acc)   the micro-kernel: acc[i][j] = the int32 sums over one panel's byte
//                         codes b ([D8][NR][2] words) of row vector i and code j, p.(q + kCodeOff8).
// Its build entry's flush is flush_i8 below.
#pragma once

#include <cstdint>
#include <vector>

namespace vqk {
namespace {

int64_t d8_steps(int64_t D) { return (D + 7) / 8; }

// Codes: the int16 packing (fp32 panels, norms, int16 pairs, int16 scales, L1 bounds), then the int8
// bytes: packed_i8[((p * D8 + s) * NR + j) * 2 + h] holds q + kCodeOff8 for dimensions 8s + 4h ..
// 8s + 4h + 3 of code p * NR + j (low byte first; kCodeOff8 past D); code_aux[2P + k] = sigma_k of
// the int8 scale (0 if left out). q = round(e / sigma) ties to even, four codes at a time in
// doubles (e * (1 / sigma) is exact: sigma is a power of two), a left-out code's values masked to 0
// (a NaN times 0 would still be NaN); each code's bytes go to its own row of qb, whose 4-byte
// groups are then its words. (One scalar rounding per value took longer than the int16 search of 48 rows.)
template <class E>
void pack_codes_i8(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  static_assert(NR % 4 == 0, "pack_codes_i8 quantizes four codes at a time");
  pack_codes_i16<E>(job, p_lo, p_hi);
  const int64_t D = job.D, D8 = d8_steps(D), P = job.panels * NR;
  const int64_t Dp = D8 * 8;
  std::vector<uint8_t> qb((size_t)(Dp * NR));  // qb[j * Dp + d]: code j's byte for dimension d
  for (int j = 0; j < NR; ++j)
    for (int64_t d = D; d < Dp; ++d) qb[j * Dp + d] = (uint8_t)kCodeOff8;
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const float* src = job.packed + p * D * NR;
    uint32_t* dst = job.packed_i8 + p * D8 * NR * 2;
    float m[NR] = {};
    for (int64_t d = 0; d < D; ++d)
      for (int j = 0; j < NR; ++j) {
        const float v = __builtin_fabsf(src[d * NR + j]);
        m[j] = v > m[j] ? v : m[j];  // NaN never enters
      }
    alignas(32) double inv[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      // As pack_codes_i16 (code_scale): padding, non-finite codes and overflowed norms get q = 0.
      const double sc = code_scale(job, k, (double)m[j], kQCode8);
      job.code_aux[2 * P + k] = (float)sc;
      inv[j] = sc != 0.0 ? 1.0 / sc : 0.0;
    }
    for (int j0 = 0; j0 < NR; j0 += 4) {
      const __m256d iv = _mm256_load_pd(inv + j0);
      const __m256d keep = _mm256_cmp_pd(iv, _mm256_setzero_pd(), _CMP_NEQ_OQ);
      const __m128i off = _mm_set1_epi32(kCodeOff8);
      for (int64_t d = 0; d < D; ++d) {
        const __m256d x = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(src + d * NR + j0)), iv);
        const __m256d r = _mm256_round_pd(_mm256_and_pd(x, keep), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        alignas(16) int32_t c[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(c), _mm_add_epi32(_mm256_cvtpd_epi32(r), off));
        for (int i = 0; i < 4; ++i) qb[(j0 + i) * Dp + d] = (uint8_t)c[i];
      }
    }
    for (int j = 0; j < NR; ++j)
      for (int64_t s = 0; s < D8; ++s)
        for (int h = 0; h < 2; ++h)  // little-endian: the first byte is the low one
          __builtin_memcpy(dst + (s * NR + j) * 2 + h, qb.data() + j * Dp + 8 * s + 4 * h, 4);
  }
}

// search_tile_i16 on int8 quads (search_i16_common.h's search_tile_q: the same epilogue), the
// offset taken off in int32 (exact: p.q).
VQK_ALWAYS_INLINE void search_tile_i8(const uint32_t* __restrict xq, const int32_t* __restrict rs,
                                      const uint32_t* __restrict pb, const float* __restrict norms,
                                      const float* __restrict scales, const float* __restrict tau,
                                      int64_t panels, int64_t D8, Top2& out) {
  V::I off[MRV];
  for (int i = 0; i < MRV; ++i) off[i] = V::loadi(rs + i * W);
  search_tile_q(norms, scales, tau, panels, out,
                [&](int64_t p, V::I(&acc)[MRV][NR]) __attribute__((always_inline)) {
                  i8_dots(xq, pb + p * D8 * NR * 2, D8, acc);
#pragma GCC unroll 64
                  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
                    for (int j = 0; j < NR; ++j) acc[i][j] = V::subi(acc[i][j], off[i]);
                });
}

// Per-thread scratch: the int16 build's whole scratch (its pending rows and the fp32 search's), then
// [I8State][xq: D8 steps x 2 halves x MR words of 4 signed bytes][x16: the rows handed on, packed
// like a tile].
struct I8State {
  int64_t seen, handed;   // rows this thread searched in int8, and handed to the int16 pass
  bool i16_only;          // too many handed on: int16 tiles for the rest of the call
  int64_t count;          // rows waiting in x16
  int64_t rowno[MR];
};
constexpr int64_t kI8HeaderFloats = (sizeof(I8State) + 63) / 64 * 16;
int64_t xq_floats(int64_t D) { return (d8_steps(D) * 2 * MR + 15) / 16 * 16; }
int64_t i8_base_floats(int64_t D) { return (i16_scratch_floats(D) + 15) / 16 * 16; }
int64_t i8_scratch_floats(int64_t D) {
  return i8_base_floats(D) + kI8HeaderFloats + xq_floats(D) + tile_floats(D);
}
I8State* i8_state(float* scratch, int64_t D) {
  return reinterpret_cast<I8State*>(scratch + i8_base_floats(D));
}
uint32_t* i8_rows(float* scratch, int64_t D) {
  return reinterpret_cast<uint32_t*>(scratch + i8_base_floats(D) + kI8HeaderFloats);
}
float* i8_handed(float* scratch, int64_t D) {
  return scratch + i8_base_floats(D) + kI8HeaderFloats + xq_floats(D);
}

// The rows handed on so far, as one tile (unused lanes zero, rowno -1), through the int16 pass --
// or the fp32 search, once this thread's int16 pass has given up (fp32_only).
template <class E>
void run_handed(const cpu::FwdJob& job, float* scratch) {
  I8State& st = *i8_state(scratch, job.D);
  const int64_t c = st.count;
  if (c == 0) return;
  float* x16 = i8_handed(scratch, job.D);
  for (int64_t r = c; r < MR; ++r) {
    st.rowno[r] = -1;
    for (int64_t d = 0; d < job.D; ++d) x16[d * MR + r] = 0.0f;
  }
  st.count = 0;
  const Areas a(scratch, job.D);
  if (a.pend->fp32_only)
    search_block<E>(job, st.rowno, x16, a.base);
  else
    search_block_i16<E>(job, st.rowno, x16, a, I16Bound(job, job.max_code_scale), quant_max(job.D));
}

// Lane r of the packed tile xt, which the int8 bound could not prove: copied to the rows handed on
// and taken out of the tile (rowno[r] = -1); a full tile of them goes through the int16 pass.
template <class E>
void hand_on(const cpu::FwdJob& job, float* scratch, const float* xt, int64_t* rowno, int r) {
  I8State& st = *i8_state(scratch, job.D);
  float* x16 = i8_handed(scratch, job.D);
  for (int64_t d = 0; d < job.D; ++d) x16[d * MR + st.count] = xt[d * MR + r];
  st.rowno[st.count++] = rowno[r];
  ++st.handed;
  rowno[r] = -1;
  if (st.count == MR) run_handed<E>(job, scratch);
}

// Called once by each thread after its last tile: the rows still handed on, then the int16 pass's
// rows set aside and the fp32 search's exact re-search (flush_set_aside).
void flush_i8(const cpu::FwdJob& job, float* scratch) {
  switch (job.dtype) {
    case DType::f16: run_handed<EF16>(job, scratch); break;
    case DType::bf16: run_handed<EBF16>(job, scratch); break;
    default: run_handed<EF32>(job, scratch); break;
  }
  flush_set_aside(job, scratch);
}

template <class E>
void search_tiles_i8(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  const int64_t N = job.x.B * job.x.S, D = job.D, D8 = d8_steps(D);
  I8State& st = *i8_state(scratch, D);
  const bool usable = D <= kMaxD8 && job.max_code_norm < 0x1p50;
  if (st.i16_only || !usable) return search_tiles_i16<E>(job, t_lo, t_hi, scratch);
  const Areas a(scratch, D);
  uint32_t* xq = i8_rows(scratch, D);
  // The int16 pass's bound with the int8 scales (S8 for S, see the unit's top).
  const I16Bound bound(job, job.max_code_scale8);
  alignas(64) float xx[MR], mx[MR], l1[MR], tau[MR], inv[MR];
  alignas(64) int32_t rs[MR];
  int64_t rowno[MR];
  bool live[MR], provable[MR];
  for (int64_t t = t_lo; t < t_hi; ++t) {
    if (st.i16_only) return search_tiles_i16<E>(job, t, t_hi, scratch);
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<E>(job, row0, rows, a.xt);
    st.seen += rows;
    // Per lane as search_tiles_i16, with Q = kQRow8 (the row bytes' range).
    lane_sqnorms(a.xt, D, xx);
    for (int r = 0; r < MR; ++r) live[r] = rowno[r] >= 0;
    row_scales(a.xt, D, kQRow8, live, xx, mx, l1, tau, inv, provable);
    to_bytes_i8(a.xt, inv, D, xq, rs);
    Top2 top;
    search_tile_i8(xq, rs, job.packed_i8, job.norms, job.code_aux + 2 * job.panels * NR, tau,
                   job.panels, D8, top);
    int64_t proven = rows;
    for (int r = 0; r < MR; ++r) {
      if (rowno[r] < 0) continue;
      // VQK_DEBUG_APPROX_ONLY accepts the int8 pass's answer, unproven.
      if (bound.proves(job, provable[r], top.v1[r], top.v2[r], xx[r], l1[r], tau[r])) continue;
      hand_on<E>(job, scratch, a.xt, rowno, r);  // may run the int16 pass, which uses a.xb only
      --proven;
    }
    finish_tile<E>(job, rowno, a.xt, a.et, top.k1);
    __atomic_fetch_add(&cpu::g_int8_rows, proven, __ATOMIC_RELAXED);
    // An int8 tile costs ~0.55 of an int16 one and a row handed on about one int16 row more, so
    // break-even is near 45% handed on: a third leaves room for the overhead. Half of the first
    // tile handed on already gives up (rows far from every code: on a 1024-row call with random
    // rows, waiting for four tiles made the call 1.3x the int16 pass's time).
    if ((st.seen >= MR && 2 * st.handed > st.seen) || (st.seen >= 4 * MR && 3 * st.handed > st.seen))
      st.i16_only = true;
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
}  // namespace vqk
