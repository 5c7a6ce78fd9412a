// float32 and float64 search on the FFMA (DFMA) pipes. Per row the best value of
// ||e||^2 - 2 x.e, its code and the second best value are kept (the fast pass of issue 13); the
// epilogue (finish_row) proves the best is the nearest code from the rounding bound of these FMA
// chains (common.cuh, Bound<>), or flags the row for the exact re-search.
//
// Register tiles: 256 threads as 16 x 16; thread (ty, tx) owns rows ty + 16 i (i < TM) and codes
// tx + 16 j (j < TN) of the block tile. Per 16-byte step along D it loads TM vectors of x (the 8
// threads of an LDS.128 phase share ty: a broadcast) and, one at a time, TN vectors of codes
// (8 consecutive codes at a padded 80-byte stride: conflict-free), then does TM*TN*VK FMAs. Every
// dot product adds its terms in the same order, so equal codes get bitwise equal distances and
// the strict '<' keeps the lowest index.
#include "search.cuh"

namespace vqk {
namespace cu {
namespace {

template <class S> struct Vec16;
template <> struct Vec16<float> { using type = float4; };
template <> struct Vec16<double> { using type = double2; };

__device__ __forceinline__ float lane_of(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ double lane_of(const double2& v, int i) { return i == 0 ? v.x : v.y; }

template <class S, int BM_, int BN_, int BK_, int TM, int TN, int MIN_BLOCKS>
struct SimtMicro {
  using A = typename Acc<S>::type;
  using V = typename Vec16<S>::type;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = 3;
  static constexpr int VK = 16 / (int)sizeof(S);
  static constexpr int GY = BM / TM, GX = BN / TN;  // thread grid
  static constexpr int kScratch = BM;
  static constexpr int kMinBlocks = MIN_BLOCKS, kMinBlocksAsync = MIN_BLOCKS;
  static_assert(GY * GX == kThreads, "one register tile per thread");
  static_assert(GX == 16, "the per-row reduction runs over 16 lanes of a half warp");

  A acc[TM][TN];
  A best[TM], best2[TM];  // per row: best and second best values
  int bidx[TM];
  A nrm[TN];
  int ty, tx;

  __device__ __forceinline__ void init(int tid, int /*xs*/, int /*cs*/) {
    ty = tid / GX;
    tx = tid % GX;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      best[i] = best2[i] = inf_of<A>();
      bidx[i] = -1;
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0;
    }
  }

  // Codes past K get +inf: their distance is +inf or NaN, which never wins.
  __device__ __forceinline__ void load_norms(const A* norms, int base, int K) {
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int k = base + tx + GX * j;
      nrm[j] = k < K ? norms[k] : inf_of<A>();
    }
  }

  __device__ __forceinline__ void compute(const S* xb, int xs, const S* cb, int cs) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += VK) {
      V xv[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) xv[i] = *reinterpret_cast<const V*>(xb + (ty + GY * i) * xs + kk);
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const V ev = *reinterpret_cast<const V*>(cb + (tx + GX * j) * cs + kk);
#pragma unroll
        for (int v = 0; v < VK; ++v)
#pragma unroll
          for (int i = 0; i < TM; ++i) acc[i][j] = fma(lane_of(xv[i], v), lane_of(ev, v), acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void tile_done(int base) {
#pragma unroll
    for (int j = 0; j < TN; ++j) {  // codes in increasing order: strict '<' keeps the first
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const A d = fma(A(-2), acc[i][j], nrm[j]);
        insert2(best[i], bidx[i], best2[i], d, base + tx + GX * j);
        acc[i][j] = 0;
      }
    }
  }

  __device__ __forceinline__ void reduce(Cand<A>* scratch, int tid) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      A v = best[i], v2 = best2[i];
      int k = bidx[i];
#pragma unroll
      for (int off = GX / 2; off > 0; off >>= 1) {  // lanes of a half warp share ty
        const A ov = __shfl_xor_sync(kFull, v, off), ov2 = __shfl_xor_sync(kFull, v2, off);
        const int ok = __shfl_xor_sync(kFull, k, off);
        merge2(v, k, v2, ov, ok, ov2);
      }
      if (tx == 0) scratch[ty + GY * i] = Cand<A>{v, v2, k};
    }
    __syncthreads();
  }
};

// fp32: 8 x 8 tiles want ~250 registers when the compiler hoists the shared loads of a whole
// chunk (capping at 128 for two blocks per SM spills), so one block of 8 warps per SM, each with
// 64 independent accumulators. fp64: 4 x 4 tiles fit two blocks per SM.
using MicroF32 = SimtMicro<float, Cfg<float>::BM, Cfg<float>::BN, Cfg<float>::BK, 8, 8, 1>;
using MicroF64 = SimtMicro<double, Cfg<double>::BM, Cfg<double>::BN, Cfg<double>::BK, 4, 4, 2>;

}  // namespace

template <>
void launch_search<float>(const FwdParams<float>& p, int rowblocks, const DeviceInfo& dev,
                          cudaStream_t st) {
  launch_search_impl<float, MicroF32>(p, rowblocks, dev, st);
}

template <>
void launch_search<double>(const FwdParams<double>& p, int rowblocks, const DeviceInfo& dev,
                           cudaStream_t st) {
  launch_search_impl<double, MicroF64>(p, rowblocks, dev, st);
}

}  // namespace cu
}  // namespace vqk
