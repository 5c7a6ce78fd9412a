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
//      of z.e (lanes = rows, codes broadcast), then the approximate a_k = ||e||^2 - 2 z.e and a
//      lane-wise running best two: the best value v1 with its index and the second value v2.
//      Because lanes are rows, this is vertical: two compares and masked moves per accumulator,
//      no horizontal reduction. Codes are visited in increasing index with strict, ordered
//      compares, so ties keep the lowest index and a NaN never wins;
//   3. the proof (see `decide`): a rigorous bound B on the rounding of every a_k; when
//      v2 - v1 > 2B the best code is certainly the exact nearest one. Rows without that proof
//      (near ties, far-from-origin data where the expansion cancels, extreme magnitudes, NaN) are
//      set aside and searched again exactly (`run_exact`): float64 distances by direct
//      differences to every code whose a_k could still be the minimum. Rare on real data;
//   4. epilogue while the tile is hot: the exact error sum_d (x_d - e_d)^2 of the chosen code
//      (from the rows as they lie when x is row-major, else from the chosen codes packed like the
//      rows), indices, errors, z_q (a bit copy of the code, NaN where the error is not finite).
//
// The answer (issue 13, the same on every backend): the lowest k minimising the exact distance
// sum_d (x_d - e_d)^2 as float64 computes it, a NaN distance counting as +inf. So a row with NaN or
// inf gets index 0; a code with NaN or inf is never chosen for a finite row (pack_codes gives it a
// NaN norm, which loses every compare) unless every code is non-finite (index 0).
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
// Codebook packing: panels [D][NR] and norms, once per call. The NR codes of a panel are walked
// together (d outer, code inner): each code's norm is still summed in d order, the same operations
// as one code at a time, but NR independent chains hide the add latency that one chain waits on
// (packing was ~15 cycles per element, a few percent of a call at K = 512, D = 256).
template <class E>
void pack_codes(const cpu::FwdJob& job, int64_t p_lo, int64_t p_hi) {
  using T = typename E::T;
  const T* cb = static_cast<const T*>(job.codebook);
  const int64_t D = job.D, K = job.K;
  for (int64_t p = p_lo; p < p_hi; ++p) {
    float* panel = job.packed + p * D * NR;
    const T* e[NR];
    float s[NR];
    bool finite[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      e[j] = k < K ? cb + k * D : nullptr;
      s[j] = 0.0f;
      finite[j] = true;
    }
    for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const float v = e[j] ? E::load(e[j] + d) : 0.0f;
        panel[d * NR + j] = v;
        s[j] += v * v;
        finite[j] &= (v - v) == 0.0f;  // false for NaN and +-inf
      }
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      // Padding: its distance is +inf, never below the best. A code with NaN or inf is never
      // chosen (policy above): a NaN norm loses every compare and is no candidate of the exact
      // search. A finite code whose norm overflows keeps +inf: it makes max||e|| infinite, so
      // every row is searched exactly (see `decide`).
      job.norms[k] = k >= K ? __builtin_inff() : finite[j] ? s[j] : __builtin_nanf("");
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
// The micro-kernel: MRV x NR accumulators in registers over the whole of D. D is not blocked:
// blocking would need partial sums for every code of the tile (memory that grows with K). The tile
// (4 * MR * D bytes) streams from L1/L2 with sequential access, and each panel element feeds MR
// FMAs, so even the larger shapes stay compute-bound. The same code serves the search and the
// candidate pass of the exact re-search, so both see bitwise the same a_k.
VQK_ALWAYS_INLINE void panel_dots(const float* __restrict xt, const float* __restrict b, int64_t D,
                                  typename V::F (&acc)[MRV][NR]) {
#pragma GCC unroll 64
  for (int i = 0; i < MRV; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) acc[i][j] = V::zero();
#if defined(VQK_PANEL_DOTS)
  // The ISA's own loop (simd_avx2.h: one asm statement, so no accumulator can be spilled).
  static_assert((MRV == 3 || MRV == 2) && NR == 4,
                "VQK_PANEL_DOTS is written for 3 x 4 and 2 x 4 accumulators");
  VQK_PANEL_DOTS(xt, b, D, acc);
#else
  using F = typename V::F;
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
#endif
}

// Per lane: the index of the best approximate distance (lowest on ties), its value v1, and the
// second value v2 over all other codes (v2 == v1 on a tie).
struct Top2 {
  alignas(64) int32_t k1[MR];
  alignas(64) float v1[MR];
  alignas(64) float v2[MR];
};

// One code's values `dist` (index kj) into a lane vector's best two (b1, its index k1, and b2):
// codes come in increasing order and the compares are strict, so ties keep the lowest index.
// With x86's min/max (the second operand where either is NaN) the same values take one compare
// and one select fewer: b1 <= b2 always, so b2' = min(max(b1, dist), b2) is b1 where dist < b1,
// dist where b1 <= dist < b2, else b2 -- the selects' values (an equal pair returns the second
// operand, so at most a zero's sign can differ, which no comparison or difference sees); a NaN
// dist gives max(b1, NaN) = NaN, then min(NaN, b2) = b2 and min(NaN, b1) = b1: untouched, as
// before.
// (A template, so that the branch a traits type has no min/max for is never instantiated.)
template <class T = V>
VQK_ALWAYS_INLINE void top2_update(typename T::F dist, typename T::I kj, typename T::F& b1,
                                   typename T::F& b2, typename T::I& k1) {
  const typename T::M m1 = T::lt(dist, b1);
  if constexpr (T::kNanSecondMinMax) {
    b2 = T::min(T::max(b1, dist), b2);
    b1 = T::min(dist, b1);
  } else {
    const typename T::M m2 = T::lt(dist, b2);  // implied by m1
    b2 = T::sel(m1, b1, T::sel(m2, dist, b2));
    b1 = T::sel(m1, dist, b1);
  }
  k1 = T::seli(m1, kj, k1);
}

// The panel-minimum form (units that define VQK_PANEL_MIN to 1, on calls whose codes are all
// finite): per row vector and panel, the minimum m of the panel's NR values first (NR - 1 mins),
// then one best-two update with m and the panel's index, instead of NR updates. What it leaves:
// v1 = the least a_k, k1 = the first panel holding it, and v2 = the second least of the panels'
// minima. Then, per lane, `panel_fixup` computes that panel's NR values again -- the same FMAs in
// the same order (acc = fma(x_d, e_d, acc) from 0 over d, then fma(-acc, 2, ||e||^2)), so bitwise
// the micro-kernel's -- and takes the first index of the minimum in it and its second least value;
// v2 = min(the panels' v2, that). Both are exactly what NR updates per panel leave (the same k1,
// v1 and v2; a tie within or across panels leaves v2 == v1), so the proof and everything after it
// are unchanged. Why finite codes only: a non-finite code's NaN norm gives a NaN value, and x86's
// min returns its second operand when either is NaN, so in a panel minimum a NaN could hide the
// values beside it. With finite codes a finite row inside `decide`'s range (||x||^2 < 2^100,
// max ||e|| < 2^50) has no NaN or inf value, and every other row is searched exactly anyway.
#ifndef VQK_PANEL_MIN
#define VQK_PANEL_MIN 0
#endif

#if VQK_PANEL_MIN
VQK_ALWAYS_INLINE void panel_fixup(const float* __restrict xt, const float* __restrict packed,
                                   const float* __restrict norms, int64_t D, Top2& out) {
  for (int r = 0; r < MR; ++r) {
    const int64_t p = out.k1[r];
    const float* b = packed + p * D * NR;
    // NR independent chains (d outer), so the lanes' chains overlap rather than wait on each other.
    float acc[NR] = {}, a[NR];
    for (int64_t d = 0; d < D; ++d) {
      const float xd = xt[d * MR + r];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[j] = __builtin_fmaf(xd, b[d * NR + j], acc[j]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) a[j] = __builtin_fmaf(-acc[j], 2.0f, norms[p * NR + j]);
    float w1 = __builtin_inff(), w2 = __builtin_inff();
    int j1 = 0;
    for (int j = 0; j < NR; ++j) {
      if (a[j] < w1) {
        w2 = w1;
        w1 = a[j];
        j1 = j;
      } else if (a[j] < w2) {
        w2 = a[j];
      }
    }
    out.k1[r] = (int32_t)(p * NR + j1);
    if (w2 < out.v2[r]) out.v2[r] = w2;
  }
}
#endif

VQK_ALWAYS_INLINE void search_tile(const float* __restrict xt, const float* __restrict packed,
                                   const float* __restrict norms, int64_t panels, int64_t D,
                                   Top2& out, bool panel_min = false) {
  using F = typename V::F;
  using I = typename V::I;
  F b1[MRV], b2[MRV];
  I k1[MRV];
  for (int i = 0; i < MRV; ++i) {
    b1[i] = b2[i] = V::set1(__builtin_inff());
    k1[i] = V::set1i(0);
  }
  const F two = V::set1(2.0f);
#if VQK_PANEL_MIN
  if (panel_min) {
    for (int64_t p = 0; p < panels; ++p) {
      F acc[MRV][NR];
      panel_dots(xt, packed + p * D * NR, D, acc);
      const float* nrm = norms + p * NR;
      F m[MRV];
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) {
        const F nj = V::set1(nrm[j]);
#pragma GCC unroll 64
        for (int i = 0; i < MRV; ++i) {
          const F a = V::fnmadd(acc[i][j], two, nj);
          m[i] = j == 0 ? a : V::min(m[i], a);
        }
      }
      const I kp = V::set1i((int32_t)p);
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) top2_update(m[i], kp, b1[i], b2[i], k1[i]);
    }
  } else
#else
  (void)panel_min;
#endif
  for (int64_t p = 0; p < panels; ++p) {
    F acc[MRV][NR];
    panel_dots(xt, packed + p * D * NR, D, acc);
    const float* nrm = norms + p * NR;
#pragma GCC unroll 64
    for (int j = 0; j < NR; ++j) {
      const F nj = V::set1(nrm[j]);
      const I kj = V::set1i((int32_t)(p * NR + j));
#pragma GCC unroll 64
      for (int i = 0; i < MRV; ++i) {
        // ||e||^2 - 2 z.e in one rounding; ||z||^2 is the same for every code, so it is left out.
        top2_update(V::fnmadd(acc[i][j], two, nj), kj, b1[i], b2[i], k1[i]);
      }
    }
  }
  for (int i = 0; i < MRV; ++i) {
    V::storei(out.k1 + i * W, k1[i]);
    V::store(out.v1 + i * W, b1[i]);
    V::store(out.v2 + i * W, b2[i]);
  }
#if VQK_PANEL_MIN
  if (panel_min) panel_fixup(xt, packed, norms, D, out);  // k1: from the best panel to its code
#endif
}

// ||x||^2 of every lane of a packed tile, in fp32 (only used inside the bound, which allows for
// its rounding).
VQK_ALWAYS_INLINE void lane_sqnorms(const float* __restrict xt, int64_t D, float* __restrict out) {
  using F = typename V::F;
  F s[MRV];
  for (int i = 0; i < MRV; ++i) s[i] = V::zero();
  for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 64
    for (int i = 0; i < MRV; ++i) {
      const F v = V::load(xt + d * MR + i * W);
      s[i] = V::fmadd(v, v, s[i]);
    }
  for (int i = 0; i < MRV; ++i) V::store(out + i * W, s[i]);
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

// ---------------------------------------------------------------------------------------------
// The proof, and the exact re-search of the rows without one.
//
// Bound. For a row x and a code e (fp32 values: f16/bf16 inputs widen exactly), u = 2^-24:
//   acc = fl(sum_d x_d e_d), an FMA chain (separate multiply and add in the scalar build):
//       |acc - x.e| <= gamma_{D+1} sum_d |x_d e_d| <= gamma_{D+1} ||x|| ||e||,  gamma_n = nu/(1-nu);
//   n = fl(sum_d e_d^2) (pack_codes):  |n - ||e||^2| <= gamma_{2D} ||e||^2;
//   a = fl(n - 2 acc), one rounding:   |a - (n - 2 acc)| <= u |n - 2 acc|.
// Together |a - (||e||^2 - 2 x.e)| <= (2D + 4) u (1 + O(Du)) (||e||^2 + 2 ||x|| ||e||), which B below
// exceeds: (2D + 8) u * 1.01, E = max ||e|| over the finite codes and ||x|| both taken from their
// fp32 squares enlarged by those squares' own rounding (and by D 2^-126 against underflow). Products
// and sums in the subnormal range -- or flushed to zero, when a caller turned on FTZ/DAZ -- add at
// most 2^-126 (|x_d| + |e_d| + 1) per operation: the 2^-120 term. The (D + 2) 2^-50 ||x||^2 term
// covers float64's own rounding of the exact distances, so the fast answer is also the float64
// evaluation's. None of this overflows while ||x||^2 < 2^100 and E < 2^50.
// Proof. With d_k the exact squared distance and k1 the row's approximate best (value v1, runner-up
// value v2 over every other code): d_k - d_k1 >= (a_k - a_k1) - 2B >= v2 - v1 - 2B for all k != k1.
// So v2 - v1 > 2B proves k1 the unique nearest code. Otherwise the nearest code k* has
// a_k* <= d_k* - ||x||^2 + B <= d_k1 - ||x||^2 + B <= v1 + 2B: the exact re-search measures only
// codes with a_k <= v1 + 2B (`thr`; the same a_k, from the same micro-kernel). Rows outside that
// range, or with NaN or inf anywhere (v1 not finite), are measured against every code.
VQK_ALWAYS_INLINE bool decide(const cpu::FwdJob& job, float v1f, float v2f, float xxf, double* thr) {
  const double v1 = v1f, v2 = v2f, xx = xxf, D = (double)job.D, E = job.max_code_norm;
  const double u = 0x1p-24;
  *thr = __builtin_inf();
  if (job.approx_only) return true;  // VQK_DEBUG_APPROX_ONLY: tests show the re-search is needed
  if (!(v1 - v1 == 0.0) || !(xx < 0x1p100) || !(E < 0x1p50)) return false;
  const double xn = __builtin_sqrt(xx + D * 0x1p-126) * (1.0 + (D + 2.0) * u);
  const double B = (2.0 * D + 8.0) * u * 1.01 * (E * E + 2.0 * xn * E) +
                   (D + 2.0) * 0x1p-50 * xn * xn + (4.0 * D + 8.0) * 0x1p-120 * (1.0 + E + xn);
  if (v2 - v1 > 2.0 * B) return true;
  *thr = v1 + 2.0 * B * (1.0 + 0x1p-20);
  return false;
}

// Rows set aside for the exact re-search, packed like a tile (xe[d * MR + slot]).
struct Exact {
  int64_t count;
  int64_t rowno[MR];
  double thr[MR];
};
constexpr int64_t kExactFloats = (int64_t)(sizeof(Exact) + 63) / 64 * 16;

// Per-thread scratch (zeroed at the start of a call): [Exact][xt][et][xe].
struct Scratch {
  Exact* ex;
  float *xt, *et, *xe;
  Scratch(float* s, int64_t D)
      : ex(reinterpret_cast<Exact*>(s)), xt(s + kExactFloats), et(xt + tile_floats(D)),
        xe(et + tile_floats(D)) {}
};

[[maybe_unused]] int64_t scratch_floats(int64_t D) { return kExactFloats + 3 * tile_floats(D); }

// The exact distance: float64 differences of the values as stored (the row from its packed fp32
// copy, exact; the code from the codebook), summed in order.
template <class E>
VQK_ALWAYS_INLINE double exact_dist(const cpu::FwdJob& job, const float* xcol, int64_t k) {
  const typename E::T* e = static_cast<const typename E::T*>(job.codebook) + k * job.D;
  double s = 0.0;
  for (int64_t d = 0; d < job.D; ++d) {
    const double t = (double)xcol[d * MR] - (double)E::load(e + d);
    s += t * t;
  }
  return s;
}

// One row's outputs from the exact search: index, error (float64, rounded once), z_q.
template <class E>
void write_row(const cpu::FwdJob& job, int64_t row, int64_t k, double err) {
  using T = typename E::T;
  job.indices[row] = k;
  job.sqerr[row] = (float)err;
  if (!job.zq.ptr) return;
  T* zq = static_cast<T*>(job.zq.ptr);
  int64_t off;
  row_offsets(row, 1, job.zq.S, job.zq.sb, job.zq.ss, &off);
  const T* e = static_cast<const T*>(job.codebook) + k * job.D;
  T nan;
  {
    const uint32_t bits = E::nan_bits;
    __builtin_memcpy(&nan, &bits, sizeof(T));
  }
  const bool finite = err - err == 0.0;
  for (int64_t d = 0; d < job.D; ++d) zq[off + d * job.zq.sd] = finite ? e[d] : nan;
}

// The exact search of the set-aside rows: candidates by the micro-kernel's own a_k, then float64
// distances, visited in increasing k with a strict compare (ties to the lowest index; NaN never
// wins, so a row with no finite distance keeps index 0).
template <class E>
void run_exact(const cpu::FwdJob& job, const Scratch& s) {
  using F = typename V::F;
  Exact& ex = *s.ex;
  const int64_t c = ex.count;
  if (c == 0) return;
  const int64_t D = job.D, K = job.K;
  for (int64_t r = c; r < MR; ++r) {
    ex.rowno[r] = -1;
    ex.thr[r] = -__builtin_inf();
    for (int64_t d = 0; d < D; ++d) s.xe[d * MR + r] = 0.0f;
  }
  __atomic_fetch_add(&cpu::g_exact_rows, c, __ATOMIC_RELAXED);
  double best[MR];
  int64_t bk[MR];
  bool some_bounded = false, some_all = false;
  for (int r = 0; r < MR; ++r) {
    best[r] = __builtin_inf();
    bk[r] = 0;
    if (ex.rowno[r] < 0) continue;
    if (ex.thr[r] - ex.thr[r] == 0.0) some_bounded = true;
    else some_all = true;
  }
  if (some_bounded) {
    alignas(64) float dist[NR][MR];
    const F two = V::set1(2.0f);
    for (int64_t p = 0; p < job.panels; ++p) {
      F acc[MRV][NR];
      panel_dots(s.xe, job.packed + p * D * NR, D, acc);
      for (int j = 0; j < NR; ++j) {
        const F nj = V::set1(job.norms[p * NR + j]);
        for (int i = 0; i < MRV; ++i) V::store(dist[j] + i * W, V::fnmadd(acc[i][j], two, nj));
      }
      for (int j = 0; j < NR && p * NR + j < K; ++j)
        for (int r = 0; r < MR; ++r) {
          // Only lanes with a finite threshold: unbounded ones are measured against every code.
          if (!((double)dist[j][r] <= ex.thr[r]) || !(ex.thr[r] < __builtin_inf())) continue;
          const double dk = exact_dist<E>(job, s.xe + r, p * NR + j);
          if (dk < best[r]) { best[r] = dk; bk[r] = p * NR + j; }
        }
    }
  }
  if (some_all)
    for (int r = 0; r < MR; ++r) {
      if (ex.rowno[r] < 0 || ex.thr[r] - ex.thr[r] == 0.0) continue;
      for (int64_t k = 0; k < K; ++k) {
        const double dk = exact_dist<E>(job, s.xe + r, k);
        if (dk < best[r]) { best[r] = dk; bk[r] = k; }
      }
    }
  for (int r = 0; r < MR; ++r) {
    if (ex.rowno[r] < 0) continue;
    const double err = best[r] < __builtin_inf() ? best[r] : exact_dist<E>(job, s.xe + r, bk[r]);
    write_row<E>(job, ex.rowno[r], bk[r], err);
  }
  ex.count = 0;
}

// The fp32 search's proof of one lane from its best two values (v1, v2) and fp32 ||x||^2: the quick
// form (vq_cpu.cpp, quick_bound: no square root, no double; false for NaN, an infinite v1 or
// v2 - v1, and rows outside decide's range), then `decide`, which sets *thr (the exact
// re-search's threshold) when it cannot prove the lane.
VQK_ALWAYS_INLINE bool fp32_proves(const cpu::FwdJob& job, float v1, float v2, float xx, double* thr) {
  const float gap = v2 - v1;
  if (v1 - v1 == 0.0f && xx < 0x1p100f && gap < __builtin_inff() && gap > job.quick_a + job.quick_b * xx)
    return true;
  return decide(job, v1, v2, xx, thr);
}

// The z_q rows of a residual tile: the running sums qt of the tile's rows, written out.
VQK_ALWAYS_INLINE void write_residual_zq(const cpu::ResidualJob& rj, const int64_t* rowno,
                                         const float* __restrict qt, int64_t D) {
  if (!rj.zq) return;
  for (int r = 0; r < MR; ++r) {
    if (rowno[r] < 0) continue;
    float* __restrict dst = rj.zq + rowno[r] * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = qt[d * MR + r];
  }
}

// One packed tile of rows (lanes rowno[r] >= 0), searched, proven or set aside, and finished.
// rowno is modified (set-aside lanes become -1).
template <class E>
void search_block(const cpu::FwdJob& job, int64_t* rowno, const float* xt, const Scratch& s) {
  const int64_t D = job.D;
  Top2 t;
  search_tile(xt, job.packed, job.norms, job.panels, D, t, job.codes_finite);
  alignas(64) float xx[MR];
  lane_sqnorms(xt, D, xx);
  const float qa = job.quick_a, qb = job.quick_b;
  for (int r = 0; r < MR; ++r) {
    if (rowno[r] < 0) continue;
    // The quick form of the proof (vq_cpu.cpp, quick_bound): no square root, no double; false
    // for NaN, an infinite v1 or v2 - v1, and rows outside decide's range.
    const float v1 = t.v1[r], gap = t.v2[r] - v1;
    if (v1 - v1 == 0.0f && xx[r] < 0x1p100f && gap < __builtin_inff() && gap > qa + qb * xx[r])
      continue;
    double thr;
    if (decide(job, v1, t.v2[r], xx[r], &thr)) continue;
    Exact& ex = *s.ex;
    for (int64_t d = 0; d < D; ++d) s.xe[d * MR + ex.count] = xt[d * MR + r];
    ex.rowno[ex.count] = rowno[r];
    ex.thr[ex.count] = thr;
    ++ex.count;
    rowno[r] = -1;
    if (ex.count == MR) run_exact<E>(job, s);
  }
  finish_tile<E>(job, rowno, xt, s.et, t.k1);
}

template <class E>
void search_tiles(const cpu::FwdJob& job, int64_t t_lo, int64_t t_hi, float* scratch) {
  const int64_t N = job.x.B * job.x.S;
  const Scratch s(scratch, job.D);
  int64_t rowno[MR];
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<E>(job, row0, rows, s.xt);
    search_block<E>(job, rowno, s.xt, s);
  }
}


// ---------------------------------------------------------------------------------------------
// Residual VQ (issue 17): every stage of a row tile in one go. The tile's rows are packed once
// (xt, fp32) and become the residual in place: stage s searches xt exactly as the single-stage
// search would (search_tile, the same proof `decide`, an exact re-search of the rows it cannot
// prove), then subtracts the chosen codes from xt and adds them to the running sum qt. Nothing
// of the residual goes back to memory between stages; only the indices, the per-stage errors
// and, at the end, the summed z_q are written. fp32 input only (the caller widens 16-bit input:
// the residual is defined in fp32 either way).
//
// Exactness per stage: the residual a stage searches is fl32(r - e) lane by lane, which is what
// the reference computes in fp32 torch, so each stage's index is the exact argmin for the same
// residual (the contract of issue 13), and so are all later stages' inputs. Cosine (rj.cosine):
// stage s searches the unit rows of r_s (unit_tile) against codes the caller normalised, and
// subtracts the chosen unit code from r_s; its error is that of the unit row.

// The exact re-search of the flagged lanes of the tile (flag[r]): the same candidates as
// run_exact (a_k <= thr from the same micro-kernel; every code when thr is not finite), float64
// distances straight from the residual tile, the lowest index on ties. Writes idx and the exact
// error (float64) of each flagged lane.
VQK_ALWAYS_INLINE void residual_exact(const cpu::FwdJob& job, const float* __restrict xt,
                                      const bool* flag, const double* thr, int32_t* idx,
                                      double* xerr) {
  using F = typename V::F;
  const int64_t D = job.D, K = job.K;
  double best[MR];
  int64_t bk[MR];
  bool some_bounded = false;
  for (int r = 0; r < MR; ++r) {
    best[r] = __builtin_inf();
    bk[r] = 0;
    if (flag[r] && thr[r] < __builtin_inf()) some_bounded = true;
  }
  int64_t flagged = 0;
  for (int r = 0; r < MR; ++r) flagged += flag[r];
  __atomic_fetch_add(&cpu::g_exact_rows, flagged, __ATOMIC_RELAXED);
  if (some_bounded) {
    alignas(64) float dist[NR][MR];
    const F two = V::set1(2.0f);
    for (int64_t p = 0; p < job.panels; ++p) {
      F acc[MRV][NR];
      panel_dots(xt, job.packed + p * D * NR, D, acc);
      for (int j = 0; j < NR; ++j) {
        const F nj = V::set1(job.norms[p * NR + j]);
        for (int i = 0; i < MRV; ++i) V::store(dist[j] + i * W, V::fnmadd(acc[i][j], two, nj));
      }
      for (int j = 0; j < NR && p * NR + j < K; ++j)
        for (int r = 0; r < MR; ++r) {
          if (!flag[r] || !(thr[r] < __builtin_inf()) || !((double)dist[j][r] <= thr[r])) continue;
          const double dk = exact_dist<EF32>(job, xt + r, p * NR + j);
          if (dk < best[r]) { best[r] = dk; bk[r] = p * NR + j; }
        }
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (!flag[r]) continue;
    if (!(thr[r] < __builtin_inf()))
      for (int64_t k = 0; k < K; ++k) {
        const double dk = exact_dist<EF32>(job, xt + r, k);
        if (dk < best[r]) { best[r] = dk; bk[r] = k; }
      }
    idx[r] = (int32_t)bk[r];
    xerr[r] = best[r] < __builtin_inf() ? best[r] : exact_dist<EF32>(job, xt + r, bk[r]);
  }
}

// Scratch per thread: the residual tile, the running sum, the chosen codes, and (cosine) the
// normalised residual tile.
[[maybe_unused]] int64_t residual_scratch_floats(int64_t D) { return 4 * tile_floats(D); }

// Cosine residual VQ: the unit residual u = r / max(fl32(sqrt(sum_d r_d^2)), 1e-12f) of every lane
// of the tile: the sum of squares in float64 in d order (each square is exact in float64), its
// square root rounded to fp32, one correctly rounded fp32 division per element.
// vqkernels.residual._unit_rows computes the same, in the same order, bit for bit.
// A non-finite residual gives a non-finite norm and so NaN (or 0 / inf) lanes, searched as such
// (index 0 and a NaN code by the single-stage rule when any element is NaN).
VQK_ALWAYS_INLINE void unit_tile(const float* __restrict xt, int64_t D, float* __restrict un) {
  // Lanes inner in every loop, so that each is one vector operation per d (the sums, the
  // divisions) rather than a scalar chain per lane: per lane the same operations in the same order.
  // (fma(v, v, ss) and ss + v * v agree: the square of a float is exact in float64.)
  alignas(64) double ss[MR];
  alignas(64) float n[MR];
  for (int r = 0; r < MR; ++r) ss[r] = 0.0;
  for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 64
    for (int r = 0; r < MR; ++r) {
      const double v = (double)xt[d * MR + r];
      ss[r] += v * v;
    }
  for (int r = 0; r < MR; ++r) {
    const float m = (float)__builtin_sqrt(ss[r]);
    n[r] = !(m >= 1e-12f) && m == m ? 1e-12f : m;  // clamp_min(eps) keeps NaN as NaN
  }
  for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 64
    for (int r = 0; r < MR; ++r) un[d * MR + r] = xt[d * MR + r] / n[r];
}

// The end of one residual stage for a tile, shared by residual_tiles and the int16 build's
// residual_tiles_i16 (search_avx2_i16.cpp): the chosen codes idx packed like the tile into et
// (zero for lanes that sit this stage out, so the updates leave them as they are: x - 0 and q + 0
// are x and q exactly), each lane's error (the fp32 sum of squares of st - e, or the float64 one
// of the exact re-search where flag[r]), the writes of index and error, and the residual update
// xt -= e, qt += e. st is the tile the stage searched (xt itself, or its unit rows).
VQK_ALWAYS_INLINE void residual_finish_stage(const cpu::FwdJob& job, const float* __restrict st,
                                             const bool* on, const int64_t* rowno,
                                             const int32_t* idx, const bool* flag,
                                             const double* xerr, float* __restrict xt,
                                             float* __restrict qt, float* __restrict et) {
  using F = typename V::F;
  const int64_t D = job.D;
  const float* cb = static_cast<const float*>(job.codebook);
  for (int i = 0; i < MRV; ++i) {
    const float* rp[W];
    for (int r = 0; r < W; ++r) rp[r] = on[i * W + r] ? cb + (int64_t)idx[i * W + r] * D : nullptr;
    pack_block<EF32>(rp, 1, D, et + i * W);
  }
  alignas(64) float err[MR];
  for (int i = 0; i < MRV; ++i) {
    F acc = V::zero();
    for (int64_t d = 0; d < D; ++d) {
      const F diff = V::sub(V::load(st + d * MR + i * W), V::load(et + d * MR + i * W));
      acc = V::fmadd(diff, diff, acc);
    }
    V::store(err + i * W, acc);
  }
  for (int r = 0; r < MR; ++r) {
    if (rowno[r] < 0) continue;
    if (!on[r]) { job.indices[rowno[r]] = -1; job.sqerr[rowno[r]] = 0.0f; continue; }
    const double e = flag[r] ? xerr[r] : (double)err[r];
    job.indices[rowno[r]] = idx[r];
    job.sqerr[rowno[r]] = flag[r] ? (float)xerr[r] : err[r];
    // The single-stage rule: the code is NaN where its exact error is not finite (a proven
    // row's fp32 error cannot overflow: decide's range keeps it far below 2^128).
    if (!(e - e == 0.0))
      for (int64_t d = 0; d < D; ++d) et[d * MR + r] = __builtin_nanf("");
  }
  for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 64
    for (int i = 0; i < MRV; ++i) {
      const int64_t o = d * MR + i * W;
      V::store(xt + o, V::sub(V::load(xt + o), V::load(et + o)));
      V::store(qt + o, V::add(V::load(qt + o), V::load(et + o)));
    }
}

// Which lanes of the tile run stage s (on[r]: a row, and s below its active count); their number.
// When none does (every row of the tile has stopped: quantizer dropout), there is nothing to
// search: the stage's index -1 and error 0 are written for the tile's rows here.
VQK_ALWAYS_INLINE int stage_lanes(const cpu::ResidualJob& rj, const cpu::FwdJob& job, int64_t s,
                                  const int64_t* rowno, bool* on) {
  int live = 0;
  for (int r = 0; r < MR; ++r) {
    on[r] = rowno[r] >= 0 && (!rj.active || s < rj.active[rowno[r]]);
    live += on[r];
  }
  if (live == 0)
    for (int r = 0; r < MR; ++r)
      if (rowno[r] >= 0) { job.indices[rowno[r]] = -1; job.sqerr[rowno[r]] = 0.0f; }
  return live;
}

// The tile loop of both residual searches (residual_tiles below, residual_tiles_i16 in
// search_i16_residual.h): per tile of MR rows, the rows packed into xt (the running residual) and
// the running sum qt zeroed; per stage its lanes (stage_lanes: none live, the stage is skipped) and,
// for cosine, the residual's unit rows in un; then stage(job, s, rowno, on, live) searches the
// stage and ends it (residual_finish_stage); after the last stage the tile's z_q.
template <class Stage>
VQK_ALWAYS_INLINE void residual_tile_loop(const cpu::ResidualJob& rj, int64_t t_lo, int64_t t_hi,
                                          float* __restrict xt, float* __restrict qt,
                                          float* __restrict un, Stage&& stage) {
  const cpu::FwdJob& first = rj.stages[0];
  const int64_t N = first.x.B * first.x.S, D = first.D;
  int64_t rowno[MR];
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t row0 = t * MR, rows = imin(MR, N - row0);
    for (int r = 0; r < MR; ++r) rowno[r] = r < rows ? row0 + r : -1;
    pack_rows<EF32>(first, row0, rows, xt);
    for (int64_t i = 0; i < D * MR; ++i) qt[i] = 0.0f;
    for (int64_t s = 0; s < rj.S; ++s) {
      const cpu::FwdJob& job = rj.stages[s];
      bool on[MR];
      const int live = stage_lanes(rj, job, s, rowno, on);
      if (live == 0) continue;
      if (rj.cosine) unit_tile(xt, D, un);
      stage(job, s, rowno, on, live);
    }
    write_residual_zq(rj, rowno, qt, D);
  }
}

[[maybe_unused]] void residual_tiles(const cpu::ResidualJob& rj, int64_t t_lo, int64_t t_hi,
                                     float* scratch) {
  const int64_t D = rj.stages[0].D;
  float* __restrict xt = scratch;
  float* __restrict qt = xt + tile_floats(D);
  float* __restrict et = qt + tile_floats(D);
  // The tile a stage searches: the residual itself, or (cosine) its unit rows.
  float* __restrict un = et + tile_floats(D);
  const float* __restrict st = rj.cosine ? un : xt;
  residual_tile_loop(rj, t_lo, t_hi, xt, qt, un,
                     [&](const cpu::FwdJob& job, int64_t, const int64_t* rowno, const bool* on,
                         int) {
    Top2 top;
    search_tile(st, job.packed, job.norms, job.panels, D, top, job.codes_finite);
    alignas(64) float xx[MR];
    lane_sqnorms(st, D, xx);
    int32_t idx[MR];
    bool flag[MR];
    double thr[MR], xerr[MR];
    bool any = false;
    for (int r = 0; r < MR; ++r) {
      idx[r] = top.k1[r];
      flag[r] = false;
      thr[r] = __builtin_inf();
      if (!on[r]) continue;
      // The same proof as search_block.
      if (fp32_proves(job, top.v1[r], top.v2[r], xx[r], &thr[r])) continue;
      flag[r] = any = true;
    }
    if (any) residual_exact(job, st, flag, thr, idx, xerr);
    residual_finish_stage(job, st, on, rowno, idx, flag, xerr, xt, qt, et);
  });
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

// Called once by each thread after its last tile: the rows still set aside.
[[maybe_unused]] void flush_exact(const cpu::FwdJob& job, float* scratch) {
  const Scratch s(scratch, job.D);
  switch (job.dtype) {
    case DType::f16: return run_exact<EF16>(job, s);
    case DType::bf16: return run_exact<EBF16>(job, s);
    default: return run_exact<EF32>(job, s);
  }
}

}  // namespace
}  // namespace vqk
