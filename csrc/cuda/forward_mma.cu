// float16 / bfloat16 search on tensor cores: mma.sync m16n8k16 with fp32 accumulation.
//
// Per row the best value, its code and the second best value are kept (the fast pass of issue
// 13); the epilogue (finish_row) either proves the best is the nearest code from the rounding
// bound of these tensor-core sums (derived in common.cuh, Bound<>), or flags the row for the
// exact re-search.
//
// Block tile 128 rows x 128 codes, depth chunks of 32. 8 warps as 2 (rows) x 4 (codes); each warp
// owns 64 x 32 = 4 x 4 mma tiles (64 fp32 accumulators per thread). Fragments come from shared
// memory by ldmatrix; rows are padded by 16 bytes so each 8x8 matrix read is conflict-free.
#include "search.cuh"

namespace vqk {
namespace cu {
namespace {

template <class S>
struct MmaMicro {
  static constexpr int BM = Cfg<S>::BM, BN = Cfg<S>::BN, BK = Cfg<S>::BK, STAGES = 3;
  static constexpr int WM = 64, WN = 32, MT = WM / 16, NT = WN / 8;
  static constexpr int kRows = MT * 2;  // rows per thread: g and g + 8 of each m16 tile
  static constexpr int kScratch = BM + (BN / WN) * BM;
  // Blocks per SM the registers must allow (search.cuh): two (16 warps) where x is resident or
  // staged by cp.async, so one block's barrier waits and tile epilogue overlap the other's MMAs
  // where shared memory allows two (review F8); 128 registers hold the 64 accumulators, the
  // top-2 state of 8 rows and the fragments without spilling (ptxas: 124-127). Strided x keeps
  // 16 elements per thread in flight through registers (search.cuh fetch_x) and stays at one
  // block (~185 registers).
  static constexpr int kMinBlocks = 1, kMinBlocksAsync = 2;
  static_assert((BM / WM) * (BN / WN) * 32 == kThreads, "8 warps tile the block");
  static_assert(BK % 16 == 0, "whole k16 steps per chunk");
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");

  float acc[MT][NT][4];
  float v1[kRows], v2[kRows];
  int i1[kRows];
  float nrm[NT * 2];
  int cbase;  // tile column of this lane's first accumulator (col())
  // Element offsets of this lane's ldmatrix rows in a chunk of x (m16 tile mt: + mt * astep) and
  // of the codebook (first n16 pair; the others are compile-time steps): computed once, so a step
  // adds only the buffer's base instead of redoing the products (review F8).
  int aoff, astep, boff;

  __device__ __forceinline__ void init(int tid, int xs, int cs) {
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = warp / (BN / WN), wn = warp % (BN / WN);
    cbase = wn * WN + 2 * (lane & 3);
    // matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 of m16 tile mt at aoff + mt * astep
    aoff = (wm * WM + (lane & 15)) * xs + (lane >> 4) * 8;
    astep = 16 * xs;
    // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    boff = (wn * WN + ((lane >> 4) << 3) + (lane & 7)) * cs + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int r = 0; r < kRows; ++r) { v1[r] = v2[r] = INFINITY; i1[r] = -1; }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  }

  // Code of accumulator column (nt, e) of this thread, relative to the tile.
  __device__ __forceinline__ int col(int nt, int e) const {
    return cbase + nt * 8 + e;
  }

  __device__ __forceinline__ void load_norms(const float* norms, int base, int K) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int k = base + col(nt, e);
        nrm[nt * 2 + e] = k < K ? norms[k] : INFINITY;  // past K: +inf or NaN, never wins
      }
  }

  __device__ __forceinline__ void compute(const S* xb, int /*xs, in aoff*/, const S* cb, int cs) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], xb + aoff + mt * astep + kk);
      uint32_t b[NT][2];
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, cb + boff + np * 16 * cs + kk);
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<S>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
    }
  }

  __device__ __forceinline__ void tile_done(int base) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)  // codes in increasing order per row: ties keep the first
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float d = fmaf(-2.f, acc[mt][nt][2 * h + e], nrm[nt * 2 + e]);
            const int r = mt * 2 + h;
            insert2(v1[r], i1[r], v2[r], d, base + col(nt, e));
            acc[mt][nt][2 * h + e] = 0.f;
          }
  }

  __device__ __forceinline__ void reduce(Cand<float>* scratch, int tid) {
    // The warp's place read afresh: kept from init, ptxas spills it across the step loop at
    // 128 registers (sm_80).
    const int t = thread_x_fresh(), lane = t & 31, warp = t >> 5;
    const int wm = warp / (BN / WN), wn = warp % (BN / WN);
    // A row's candidates sit in the 4 lanes of a quad (same lane >> 2) of each of the 4 code warps.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float w1 = __shfl_xor_sync(kFull, v1[r], off), w2 = __shfl_xor_sync(kFull, v2[r], off);
        const int j1 = __shfl_xor_sync(kFull, i1[r], off);
        merge2(v1[r], i1[r], v2[r], w1, j1, w2);
      }
      if ((lane & 3) == 0) {
        const int row = wm * WM + (r >> 1) * 16 + (lane >> 2) + (r & 1) * 8;
        scratch[BM + wn * BM + row] = Cand<float>{v1[r], v2[r], i1[r]};
      }
    }
    __syncthreads();
    for (int row = tid; row < BM; row += kThreads) {
      Cand<float> c = scratch[BM + row];
#pragma unroll
      for (int w = 1; w < BN / WN; ++w) merge2(c, scratch[BM + w * BM + row]);
      scratch[row] = c;
    }
    __syncthreads();
  }
};

}  // namespace

template <>
void launch_search<__half>(const FwdParams<__half>& p, int rowblocks, const DeviceInfo& dev,
                           cudaStream_t st) {
  launch_search_impl<__half, MmaMicro<__half>>(p, rowblocks, dev, st);
}

template <>
void launch_search<__nv_bfloat16>(const FwdParams<__nv_bfloat16>& p, int rowblocks,
                                  const DeviceInfo& dev, cudaStream_t st) {
  launch_search_impl<__nv_bfloat16, MmaMicro<__nv_bfloat16>>(p, rowblocks, dev, st);
}

}  // namespace cu
}  // namespace vqk
