// The fused nearest-code search, written once over a SIMD traits type `V` and instantiated by each
// ISA translation unit (search_avx512.cpp, search_avx512bf16.cpp, search_avx2.cpp,
// search_scalar.cpp) with its own traits and compiler flags.
//
// Include this only inside an anonymous namespace's reach: everything here has internal linkage, and
// nothing from the standard library is instantiated, so no function compiled for AVX-512 can be
// merged by the linker into a caller built for a lesser CPU. The including unit defines, before the
// include: `struct V` (traits, see simd_avx512.h) and the constants MRV and NR.
//
// Shape of the computation (per row tile of MR = MRV * V::W rows):
//   1. pack the tile's rows d-major into `xt` [D][MR] floats (converted from f16/bf16 here, so the
//      micro-kernel only ever sees fp32, and channel-first input is read as it lies);
//   2. for every code panel (NR codes, packed [D][NR] once per call): MRV x NR vector accumulators
//      of z.e (lanes = rows, codes broadcast), then dist = ||e||^2 - 2 z.e and a lane-wise running
//      minimum. Because lanes are rows, the argmin is vertical: a compare and two masked moves per
//      accumulator, no horizontal reduction. Codes are visited in increasing index and the compare
//      is a strict, ordered less-than, so ties keep the lowest index and a NaN distance never wins;
//   3. epilogue while the tile is hot: the exact error sum_d (x_d - e_d)^2 of the chosen code
//      (from the rows as they lie when x is row-major, else from the chosen codes packed like the
//      rows), indices, errors, z_q (a bit copy of the code, NaN where the error is not finite).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_internal.h"

namespace vqk {
namespace {

#define VQK_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int W = V::W;
constexpr int MR = MRV * W;

VQK_ALWAYS_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Element offsets of rows row0 .. row0 + cnt - 1 of a (B, S, D) view: one division for the tile,
// then increments (a 64-bit division per row costs more than a small tile's whole search). Not
// vqk::Rows::offset: that is an inline function of a shared header and must not be compiled here
// (see the note at the top).
VQK_ALWAYS_INLINE void row_offsets(int64_t row0, int64_t cnt, int64_t S, int64_t sb, int64_t ss,
                                   int64_t* off) {
  int64_t b = S ? row0 / S : 0, s = row0 - b * S;
  for (int64_t r = 0; r < cnt; ++r) {
    off[r] = b * sb + s * ss;
    if (++s == S) { s = 0; ++b; }
  }
}

// Offsets of the rows rowno[0 .. MR) (-1 where rowno < 0): a run of consecutive rows costs one
// division.
VQK_ALWAYS_INLINE void run_offsets(const int64_t* rowno, int64_t S, int64_t sb, int64_t ss,
                                   int64_t* off) {
  for (int r = 0; r < MR;) {
    if (rowno[r] < 0) { off[r++] = -1; continue; }
    int64_t n = 1;
    while (r + n < MR && rowno[r + n] == rowno[r] + n) ++n;
    row_offsets(rowno[r], n, S, sb, ss, off + r);
    r += (int)n;
  }
}

// Whether rows off[0 .. cnt) are consecutive elements (a vector load/store covers them).
VQK_ALWAYS_INLINE bool consecutive(const int64_t* off, int64_t cnt) {
  for (int64_t r = 1; r < cnt; ++r)
    if (off[r] != off[0] + r) return false;
  return true;
}

// Element types: storage, scalar load to fp32, and the NaN a z_q row gets.
// vload/vstore move W elements as one fp32 vector.
struct EF32 {
  using T = float;
  static constexpr uint32_t nan_bits = 0x7fc00000u;
  static VQK_ALWAYS_INLINE float load(const T* p) { return *p; }
  static VQK_ALWAYS_INLINE typename V::F vload(const T* p, int64_t n) { return V::load_f32(p, n); }
  static VQK_ALWAYS_INLINE void vstore(T* p, typename V::F v, int64_t n) { V::store_f32(p, v, n); }
};
struct EF16 {
  using T = uint16_t;
  static constexpr uint32_t nan_bits = 0x7e00u;
  static VQK_ALWAYS_INLINE float load(const T* p) { return V::half_to_float(*p); }
  static VQK_ALWAYS_INLINE typename V::F vload(const T* p, int64_t n) { return V::load_f16(p, n); }
  static VQK_ALWAYS_INLINE void vstore(T* p, typename V::F v, int64_t n) { V::store_f16(p, v, n); }
};
struct EBF16 {
  using T = uint16_t;
  static constexpr uint32_t nan_bits = 0x7fc0u;
  static VQK_ALWAYS_INLINE float load(const T* p) {
    const uint32_t bits = (uint32_t)*p << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
  static VQK_ALWAYS_INLINE typename V::F vload(const T* p, int64_t n) { return V::load_bf16(p, n); }
  // Only ever given bf16 values widened to fp32 (or NaN), so keeping the high half is exact.
  static VQK_ALWAYS_INLINE void vstore(T* p, typename V::F v, int64_t n) { V::store_bf16(p, v, n); }
};

// min(cnt, W) consecutive elements as fp32 (lanes past cnt are zero), and back.
template <class E>
VQK_ALWAYS_INLINE typename V::F load_elems(const typename E::T* p, int64_t cnt) {
  return E::vload(p, cnt < W ? cnt : W);
}

template <class E>
VQK_ALWAYS_INLINE void store_elems(typename E::T* p, typename V::F v, int64_t cnt) {
  E::vstore(p, v, cnt < W ? cnt : W);
}

// ---------------------------------------------------------------------------------------------
// Codebook packing: panels [D][NR] and norms, once per call.
template <class E>
void pack_codes(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  using T = typename E::T;
  const T* cb = static_cast<const T*>(job.codebook);
  const int64_t D = job.D, K = job.K;
  for (int64_t p = p_lo; p < p_hi; ++p) {
    float* panel = job.packed + p * D * NR;
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      if (k >= K) {
        for (int64_t d = 0; d < D; ++d) panel[d * NR + j] = 0.0f;
        job.norms[k] = __builtin_inff();  // padding: its distance is +inf, never below the best
        continue;
      }
      const T* e = cb + k * D;
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = E::load(e + d);
        panel[d * NR + j] = v;
        s += v * v;
      }
      job.norms[k] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile packing: dst[d * MR + r] = row r's element d as fp32, for one block of W rows given by their
// base pointers (null: a padding row, zero-filled) and the element stride along D.
template <class E>
void pack_block(const typename E::T* const* rp, int64_t stride, int64_t D, float* __restrict dst) {
  if (stride == 1 && W > 1) {
    // Rows contiguous along D: load W x W blocks and transpose them in registers.
    for (int64_t d0 = 0; d0 < D; d0 += W) {
      const int64_t dc = imin(W, D - d0);
      typename V::F v[W];
      for (int r = 0; r < W; ++r) v[r] = rp[r] ? load_elems<E>(rp[r] + d0, dc) : V::zero();
      V::transpose(v);
      for (int64_t i = 0; i < dc; ++i) V::store(dst + (d0 + i) * MR, v[i]);
    }
    return;
  }
  for (int r = 0; r < W; ++r) {
    const typename E::T* p = rp[r];
    if (!p) {
      for (int64_t d = 0; d < D; ++d) dst[d * MR + r] = 0.0f;
      continue;
    }
    for (int64_t d = 0; d < D; ++d) dst[d * MR + r] = E::load(p + d * stride);
  }
}

// The tile's rows of x: xt[d * MR + r] = x[row0 + r][d], zero for r >= rows.
template <class E>
void pack_rows(const cpu::FwdJob& job, int64_t row0, int64_t rows, float* __restrict xt) {
  using T = typename E::T;
  const T* x = static_cast<const T*>(job.x.ptr);
  const int64_t D = job.D, S = job.x.S, sb = job.x.sb, ss = job.x.ss, sd = job.x.sd;
  for (int blk = 0; blk < MRV; ++blk) {
    const int64_t r0 = blk * W;
    const int64_t cnt = rows - r0 < 0 ? 0 : imin(rows - r0, W);
    float* dst = xt + r0;
    int64_t off[W];
    row_offsets(row0 + r0, cnt, S, sb, ss, off);
    if (cnt > 0 && sd != 1 && W > 1 && consecutive(off, cnt)) {
      // Channel-first input: for a fixed d the block's rows are consecutive in memory.
      const T* base = x + off[0];
      for (int64_t d = 0; d < D; ++d) V::store(dst + d * MR, load_elems<E>(base + d * sd, cnt));
      continue;
    }
    const T* rp[W];
    for (int r = 0; r < W; ++r) rp[r] = r < cnt ? x + off[r] : nullptr;
    pack_block<E>(rp, sd, D, dst);
  }
}

// ---------------------------------------------------------------------------------------------
// The micro-kernel: MRV x NR accumulators in registers over the whole of D, then the vertical
// argmin. D is not blocked: blocking would need partial sums for every code of the tile (memory
// that grows with K). The tile (4 * MR * D bytes) streams from L1/L2 with sequential access, and
// each panel element feeds MR FMAs, so even the larger shapes stay compute-bound.
VQK_ALWAYS_INLINE void search_tile(const float* __restrict xt, const float* __restrict packed,
                                   const float* __restrict norms, int64_t panels, int64_t D,
                                   int32_t* __restrict out_idx) {
  using F = typename V::F;
  using I = typename V::I;
  using M = typename V::M;
  F best[MRV];
  I bidx[MRV];
  for (int i = 0; i < MRV; ++i) {
    best[i] = V::set1(__builtin_inff());
    bidx[i] = V::set1i(0);
  }
  const F two = V::set1(2.0f);
  for (int64_t p = 0; p < panels; ++p) {
    const float* b = packed + p * D * NR;
    F acc[MRV][NR];
#pragma GCC unroll 64
    for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) acc[i][j] = V::zero();
    const float* xp = xt;
    for (int64_t d = 0; d < D; ++d, xp += MR, b += NR) {
      F xv[MRV];
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) xv[i] = V::load(xp + i * W);
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) {
        const F bj = V::set1(b[j]);
#pragma GCC unroll 64
        for (int i = 0; i < MRV; ++i) acc[i][j] = V::fmadd(xv[i], bj, acc[i][j]);
      }
    }
    const float* nrm = norms + p * NR;
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) {
      const F nj = V::set1(nrm[j]);
      const I kj = V::set1i((int32_t)(p * NR + j));
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) {
        // ||e||^2 - 2 z.e in one rounding; ||z||^2 is the same for every code, so it is left out.
        const F dist = V::fnmadd(acc[i][j], two, nj);
        const M m = V::lt(dist, best[i]);
        best[i] = V::sel(m, dist, best[i]);
        bidx[i] = V::seli(m, kj, bidx[i]);
      }
    }
  }
  for (int i = 0; i < MRV; ++i) V::storei(out_idx + i * W, bidx[i]);
}

// ---------------------------------------------------------------------------------------------
// Epilogue: the chosen codes packed like the rows (et[d * MR + r]) from the original codebook, so
// the exact error is plain vertical arithmetic against xt (gathers would be simpler, but they run at
// a fraction of the load rate on current cores and cost more than the whole search at small K).
// Lane r holds row rowno[r]; rowno[r] < 0 marks a lane to leave alone (padding, or a row the bf16
// search hands to the fp32 re-search).
template <class E>
void finish_tile(const cpu::FwdJob& job, const int64_t* __restrict rowno, const float* __restrict xt,
                 float* __restrict et, const int32_t* __restrict idx) {
  using T = typename E::T;
  using F = typename V::F;
  const int64_t D = job.D;
  const T* cb = static_cast<const T*>(job.codebook);
  alignas(64) float err[MR];
  // Row-major input: the exact error straight from x's and the code's rows (vectors along D), no
  // transposition. Otherwise (channel-first, strided) from the two packed tiles, vertically.
  const bool rowwise = W > 1 && job.x.sd == 1;
  if (!rowwise || (job.zq.ptr && job.zq.sd != 1)) {
    for (int i = 0; i < MRV; ++i) {
      const T* rp[W];
      for (int r = 0; r < W; ++r) rp[r] = cb + (int64_t)idx[i * W + r] * D;
      pack_block<E>(rp, 1, D, et + i * W);
    }
  }
  if (rowwise) {
    const T* x = static_cast<const T*>(job.x.ptr);
    int64_t xoff[MR];
    run_offsets(rowno, job.x.S, job.x.sb, job.x.ss, xoff);
    for (int r = 0; r < MR; ++r) {
      if (rowno[r] < 0) continue;
      const T* xr = x + xoff[r];
      const T* er = cb + (int64_t)idx[r] * D;
      F acc = V::zero();
      for (int64_t d0 = 0; d0 < D; d0 += W) {
        const int64_t dc = imin(W, D - d0);
        const F diff = V::sub(load_elems<E>(xr + d0, dc), load_elems<E>(er + d0, dc));
        acc = V::fmadd(diff, diff, acc);
      }
      err[r] = V::hsum(acc);
    }
  } else {
    for (int i = 0; i < MRV; ++i) {
      F acc = V::zero();
      for (int64_t d = 0; d < D; ++d) {
        const F diff = V::sub(V::load(xt + d * MR + i * W), V::load(et + d * MR + i * W));
        acc = V::fmadd(diff, diff, acc);
      }
      V::store(err + i * W, acc);
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (rowno[r] < 0) continue;
    job.indices[rowno[r]] = idx[r];
    job.sqerr[rowno[r]] = err[r];
  }
  if (!job.zq.ptr) return;

  T* zq = static_cast<T*>(job.zq.ptr);
  const int64_t S = job.zq.S, sb = job.zq.sb, ss = job.zq.ss, sd = job.zq.sd;
  T nan;
  {
    const uint32_t bits = E::nan_bits;
    __builtin_memcpy(&nan, &bits, sizeof(T));  // little-endian: the low bytes hold the pattern
  }
  int64_t off[MR];
  run_offsets(rowno, S, sb, ss, off);
  if (sd == 1) {
    // Row-major output: each row is a straight copy of its code's bits.
    for (int r = 0; r < MR; ++r) {
      if (rowno[r] < 0) continue;
      T* __restrict dst = zq + off[r];
      const T* __restrict e = cb + (int64_t)idx[r] * D;
      if (__builtin_isfinite(err[r])) {
        for (int64_t d = 0; d < D; ++d) dst[d] = e[d];
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = nan;
      }
    }
    return;
  }
  for (int i = 0; i < MRV; ++i) {
    const int r0 = i * W;
    int cnt = 0;  // leading lanes to write; the vector path needs every later lane skipped
    while (cnt < W && rowno[r0 + cnt] >= 0) ++cnt;
    bool rest_skipped = true;
    for (int r = cnt; r < W; ++r) rest_skipped &= rowno[r0 + r] < 0;
    if (W > 1 && cnt > 0 && rest_skipped && consecutive(off + r0, cnt)) {
      // Channel-first output: a block's rows are consecutive for a fixed d. The fp32 values in et
      // were widened from `dtype` elements, so narrowing them back is exact.
      const typename V::M finite = V::lt(V::load(err + r0), V::set1(__builtin_inff()));
      const F qnan = V::set1(__builtin_nanf(""));
      T* dst = zq + off[r0];
      for (int64_t d = 0; d < D; ++d)
        store_elems<E>(dst + d * sd, V::sel(finite, V::load(et + d * MR + r0), qnan), cnt);
      continue;
    }
    for (int r = r0; r < r0 + W; ++r) {
      if (rowno[r] < 0) continue;
      T* dst = zq + off[r];
      const T* e = cb + (int64_t)idx[r] * D;
      const bool finite = __builtin_isfinite(err[r]);
      for (int64_t d = 0; d < D; ++d) dst[d * sd] = finite ? e[d] : nan;
    }
  }
}

// One packed tile (rows or chosen codes), rounded up to whole cache lines.
int64_t tile_floats(int64_t D) { return ((D > 0 ? D : 1) * MR + 15) / 16 * 16; }

template <class E>
void search_tiles(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  const int64_t N = job.x.B * job.x.S;
  alignas(64) int32_t idx[MR];
  int64_t rowno[MR];
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<E>(job, row0, rows, scratch);
    search_tile(scratch, job.packed, job.norms, job.panels, job.D, idx);
    finish_tile<E>(job, rowno, scratch, scratch + tile_floats(job.D), idx);
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch on dtype (f64 never reaches these kernels).
[[maybe_unused]] void pack_any(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  switch (job.dtype) {
    case DType::f16: return pack_codes<EF16>(job, p_lo, p_hi);
    case DType::bf16: return pack_codes<EBF16>(job, p_lo, p_hi);
    default: return pack_codes<EF32>(job, p_lo, p_hi);
  }
}

[[maybe_unused]] void search_any(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  switch (job.dtype) {
    case DType::f16: return search_tiles<EF16>(job, t_lo, t_hi, scratch);
    case DType::bf16: return search_tiles<EBF16>(job, t_lo, t_hi, scratch);
    default: return search_tiles<EF32>(job, t_lo, t_hi, scratch);
  }
}

[[maybe_unused]] int64_t scratch_floats(int64_t D) { return 2 * tile_floats(D); }

[[maybe_unused]] void flush_nothing(const cpu::FwdJob&, float*) {}

}  // namespace
}  // namespace vqk
