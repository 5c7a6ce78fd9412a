// The int16 first pass of residual VQ, shared by the x86 int16 builds: avx2_i16
// (search_avx2_i16.cpp) and avx512_i16 / avx512_vnni_i16 (search_avx512_i16.cpp). Nothing here
// depends on the vector width: the proof is per lane (one row) and per code, and the fp32 search
// it falls back to, and whose output it must equal bit for bit, is the same unit's (search_impl.h
// on the same tile: the avx2 build's or the avx512 build's residual path).
//
// Include after search_i16_common.h, once the unit has defined, in its anonymous namespace,
//   collect_lane_i16(job, xb, r, tau, lim, cap, out, lp)   the codes k with a_k' <= lim for lane r
//        of the int16 tile (search_tile_i16's a_k' bit for bit), in increasing k, written for the
//        unit's packed layout [panel][ceil(D/2)][NR] words; lp is lane_pair_floats(D) of aligned
//        scratch for the lane's pairs.
#pragma once

#include <cstdint>

namespace vqk {
namespace {

// Residual VQ (issue 17) with the int16 first pass: search_impl.h's residual_tiles, each stage's
// search of the tile first done on int16 pairs. The answer must be bitwise the fp32 residual
// path's (indices, errors, z_q), and that path's answer for a lane depends on two things only:
// the exact nearest code (every path finds that one), and whether its fp32 search proves the row
// (error = the fp32 sum of squares of the tile, finish below) or flags it (error = the float64
// distance of the exact re-search). So per stage and lane:
//   1. the int16 pass and its direct proof (search_tiles_i16's: v2' - v1' > (4 dd + 6 B)(1 + 2^-10)
//      or its quick form) -- then the fp32 search would have proven the same code too
//      (search_i16_common.h): the code, unflagged;
//   2. otherwise, for a finite lane in range, the candidates of neon_dot's argument
//      (search_neon_dot.cpp, "Candidates"): with Df = 2 dd (1 + 2^-20) + 2 B >= |a_k' - a_k^f|
//      for every code, every code with a_k' > v2' + 2 Df is worse in fp32 than two other codes, so
//      the fp32 search's v1, its index (lowest on ties) and v2 are those of the candidates
//      C = {k : a_k' <= lim}. lim is taken 3 B larger, v2' + (4 dd + 7 B)(1 + 2^-10), so that C
//      also holds every code the fp32 exact re-search would measure (a_k^f <= thr =
//      v1_fp32 + 2 B (1 + 2^-20), hence a_k' <= v1' + 2 Df + 2.0001 B <= lim). One vectorised int16
//      pass over the codebook for that lane alone lists C (the same integers and the same float
//      operations as search_tile_i16: bitwise the same a_k'. Below D = kResTop3MinD the tile pass
//      keeps only the best two per lane, as the single-stage search does: a version that also kept
//      the third value and the runner-up's index, to skip this pass when only two codes reach lim,
//      was 1.1-1.3x slower at D = 8-16 on an Ice Lake Xeon and up to 2x with avx2_i16, for 1-2%
//      of rows missing the direct proof on random residuals; from D = 64 it keeps them and skips
//      the pass when v3 > lim, see "Top three" below); each candidate's fp32 value is
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

// Top three (2026-12-03). From D = kResTop3MinD the tile pass also keeps each lane's runner-up
// index k2 and third value v3 (search_tile_q with Top3): a lane that misses the direct proof and whose v3
// exceeds lim has C = {k1, k2} (every other code has a_k' >= v3 > lim), so no candidate pass. The
// unproven rows' candidate passes took 39 of 116 ms of an EnCodec-like call (N 16384, 8 stages,
// K 1024, D 128, ~9% of rows unproven per stage; VQK_DEBUG_APPROX_ONLY=1 skipping them: 77 ms) on
// an Ice Lake Xeon (family 6 model 106, AVX-512 VNNI, 2 threads); the wider epilogue costs ~10% of the tile pass at D = 128, more at small D,
// where the variant was measured slower (D = 8-16, above).
constexpr int64_t kResTop3MinD = 64;

// Stages whose int16 take-up each thread tracks (later stages share the last counter).
constexpr int kResStages = 64;
struct ResidualI16Header {
  int64_t seen[kResStages], missed[kResStages];
  bool fp32_only[kResStages];
};
constexpr int64_t kResHeaderFloats = (int64_t)(sizeof(ResidualI16Header) + 63) / 64 * 16;
// Candidates per lane, at most (more: the lane takes the fp32 tile search).
constexpr int kResMaxCand = 64;

// The lane's int16 pairs laid out for collect_lane_i16: step h holds pairs 2h (x NR) and 2h + 1
// (x NR), one vector of the unit's widest integer type per step or two.
int64_t lane_pair_floats(int64_t D) { return (((D + 1) / 2 + 1) / 2 * 2 * NR + 15) / 16 * 16; }

int64_t residual_i16_scratch_floats(int64_t D) {
  return kResHeaderFloats + residual_scratch_floats(D) + pair_floats(D) + lane_pair_floats(D);
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
  const int64_t D = rj.stages[0].D, D2 = (D + 1) / 2;
  ResidualI16Header& hdr = *reinterpret_cast<ResidualI16Header*>(scratch);
  float* __restrict xt = scratch + kResHeaderFloats;
  float* __restrict qt = xt + tile_floats(D);
  float* __restrict et = qt + tile_floats(D);
  float* __restrict un = et + tile_floats(D);
  uint32_t* __restrict xb = reinterpret_cast<uint32_t*>(un + tile_floats(D));
  uint32_t* __restrict lp = xb + pair_floats(D);
  const float* __restrict st = rj.cosine ? un : xt;
  const int32_t Q = quant_max(D);
  // The best three from D = kResTop3MinD (see "Top three" above).
  const bool top3 = D >= kResTop3MinD;
  residual_tile_loop(rj, t_lo, t_hi, xt, qt, un,
                     [&](const cpu::FwdJob& job, int64_t s, const int64_t* rowno, const bool* on,
                         int live) {
    const int hs = (int)imin(s, kResStages - 1);
    alignas(64) float xx[MR];
    lane_sqnorms(st, D, xx);
    int32_t idx[MR];
    bool flag[MR], need32[MR];
    double thr[MR], xerr[MR];
    bool any32 = false;
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
      if (top3)
        search_tile_i16(xb, job.packed_bf16, job.norms, job.code_aux, tau, job.panels, D2, top);
      else  // the best two only: k2 and v3 are left unset and never read
        search_tile_i16(xb, job.packed_bf16, job.norms, job.code_aux, tau, job.panels, D2,
                        static_cast<Top2&>(top));
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
            if (top3 && top.v3[r] > lf) {
              // Every code but k1 and k2 has a_k' >= v3 > lim: C is those two, in increasing k.
              cand[0] = top.k1[r] < top.k2[r] ? top.k1[r] : top.k2[r];
              cand[1] = top.k1[r] < top.k2[r] ? top.k2[r] : top.k1[r];
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
              // residual_tiles' test on the fp32 search's own values.
              double th;
              if (fp32_proves(job, b1, b2, xx[r], &th))
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
        if (fp32_proves(job, top.v1[r], top.v2[r], xx[r], &thr[r])) continue;
        f32[r] = flag[r] = anyf = true;
      }
      if (anyf) residual_exact(job, st, f32, thr, idx, xerr);
    }
    // From here residual_tiles' own steps (search_impl.h).
    residual_finish_stage(job, st, on, rowno, idx, flag, xerr, xt, qt, et);
  });
}

}  // namespace
}  // namespace vqk
