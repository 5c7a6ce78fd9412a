// The nearest-code search: one block takes BM rows of x and streams a range of codebook tiles
// (BN codes each) through shared memory, keeping the best candidates per row in registers. The
// micro-kernel M (FFMA register tiles, or mma.sync on tensor cores) does the arithmetic; this file
// is the part both share: staging, the cp.async pipeline, and the epilogue.
//
// Pipeline: the work of a block is a flat sequence of steps, step t = (tile t / nchunks, depth
// chunk t % nchunks); a step's codebook chunk (BN x BK) sits in one of STAGES shared buffers. The
// loads of step t + STAGES - 1 are issued before step t is computed, so copies overlap the math.
// x stays resident in shared memory for all of D when it fits (XRES); otherwise its chunk is
// staged with the codebook chunk, step by step. When x's rows are contiguous and 16-byte aligned
// (FwdParams::xvec) x arrives by 16-byte cp.async too, in the same commit group as the codebook:
// the resident rows in the first group, a staged chunk with its step's codebook chunk (XV). Else
// (strided x: channel-first input) it is loaded element by element (review F2, F9).
//
// The step loop carries its tile, chunk and stage counters as 32-bit integers incremented with
// wrap-around: a division of the 64-bit step number is a ~25-instruction subroutine call on the
// GPU, three of them per step before (review F8). The SASS checks in tests/test_cuda_build.py
// (python -m vqkernels.triton.aot --cuda) hold these properties.
#pragma once
#include <mutex>
#include <unordered_map>

#include "common.cuh"

namespace vqk {
namespace cu {

template <class S, class M, bool XRES>
struct SearchSmem {
  static constexpr int BM = M::BM, BN = M::BN, BK = M::BK, STAGES = M::STAGES;
  static constexpr int VK = 16 / (int)sizeof(S);  // elements per 16-byte vector
  // Row stride of a chunk buffer: 16 bytes of padding put the 8 rows an ldmatrix phase (or an
  // 8-thread LDS.128 phase) reads into 8 distinct 16-byte bank groups.
  static constexpr int CS = BK + VK;
  __host__ __device__ static int xs(int Dp) { return XRES ? Dp + VK : CS; }
  static size_t bytes(int Dp) {
    const size_t rowoff = BM * sizeof(int64_t);
    const size_t cb = (size_t)STAGES * BN * CS * sizeof(S);
    const size_t x = XRES ? (size_t)BM * xs(Dp) * sizeof(S) : (size_t)STAGES * BM * CS * sizeof(S);
    return rowoff + cb + x;
  }
};

// XV: x staged by 16-byte cp.async (only with !XRES and p.xvec; the resident x takes the vector
// path whenever p.xvec, outside the step loop).
template <class S, class M, bool XRES, bool XV>
__global__ void __launch_bounds__(kThreads, M::kMinBlocks) search_kernel(const FwdParams<S> p) {
  using A = typename Acc<S>::type;
  using L = SearchSmem<S, M, XRES>;
  constexpr int BM = M::BM, BN = M::BN, BK = M::BK, STAGES = M::STAGES, VK = L::VK, CS = L::CS;
  static_assert(STAGES >= 2, "the pipeline needs two buffers at least");
  static_assert((size_t)STAGES * BN * CS * sizeof(S) >= M::kScratch * sizeof(Cand<A>),
                "the epilogue scratch must fit in the codebook buffers it reuses");
  static_assert(BK % VK == 0, "chunks are whole 16-byte vectors");

  VQK_DYNAMIC_SMEM(smem_raw);
  int64_t* rowoff = reinterpret_cast<int64_t*>(smem_raw);
  S* cbuf = reinterpret_cast<S*>(smem_raw + BM * sizeof(int64_t));
  S* xbuf = cbuf + STAGES * BN * CS;
  const int XS = L::xs(p.Dp);

  const int tid = threadIdx.x;
  const int64_t row0 = (int64_t)blockIdx.x * BM;
  const int split = blockIdx.y;
  const int tile_begin = split * p.tiles_per_split;
  const int tile_end = min(p.ntiles, tile_begin + p.tiles_per_split);
  const int nchunks = p.Dp / BK;  // the host never makes empty splits: >= 1 tile here

  // Where each row of the block starts in x (-1 past the end): one 64-bit division per row.
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t n = row0 + r;
    rowoff[r] = n < p.N ? row_offset(n, p.xS, p.xsb, p.xss) : -1;
  }
  __syncthreads();

  // Rows [0, BM) x depth [d0, d0 + W) of x into dst (row stride ld), zero outside x. Threads walk
  // the direction that is contiguous in memory: along D when it is (sd == 1), else along rows
  // (channel-first input, where consecutive rows are adjacent).
  // fp64 staged: the register tiles plus the top-2 state fill the 128 registers of two blocks per
  // SM, so this loop is not unrolled there (unrolled it spills on sm_80/86).
  constexpr int kXUnroll = sizeof(S) == 8 ? 1 : 4;
  auto load_x = [&](S* dst, int ld, int64_t d0, int W) {
    const bool along_d = p.xsd == 1;
#pragma unroll kXUnroll
    for (int e = tid; e < BM * W; e += kThreads) {
      const int r = along_d ? e / W : e % BM;
      const int j = along_d ? e % W : e / BM;
      const int64_t d = d0 + j;
      const int64_t off = rowoff[r];
      dst[r * ld + j] = (off >= 0 && d < p.D) ? p.x[off + d * p.xsd] : zero_of<S>();
    }
  };

  // Rows [0, BM) x depth [d0, d0 + W) of x into dst by 16-byte cp.async (p.xvec: the rows start on
  // 16-byte boundaries, d0 and W are whole vectors); the vector that straddles D copies only its
  // part and zero-fills the rest, as do rows past N and vectors past D.
  auto copy_x = [&](S* dst, int ld, int64_t d0, int W) {
    const int vecs = W / VK;
#pragma unroll kXUnroll
    for (int v = tid; v < BM * vecs; v += kThreads) {
      const int r = v / vecs, seg = v - r * vecs;
      const int64_t d = d0 + (int64_t)seg * VK;
      const int64_t off = rowoff[r];
      const int64_t left = p.D - d;
      const int bytes = (off >= 0 && left > 0) ? (int)(left < VK ? left : VK) * (int)sizeof(S) : 0;
      cp_async16(dst + r * ld + seg * VK, bytes ? p.x + off + d : p.x, bytes);
    }
  };

  auto issue = [&](int tile, int c, int stage) {
    S* dst = cbuf + stage * BN * CS;
    constexpr int kVecs = BK / VK;
    for (int v = tid; v < BN * kVecs; v += kThreads) {
      const int r = v / kVecs, seg = v % kVecs;
      const int64_t code = (int64_t)tile * BN + r;
      const int64_t d = (int64_t)c * BK + seg * VK;
      const bool ok = code < p.K && d < p.Dv;  // Dv is a multiple of VK: whole vectors only
      const S* src = ok ? p.cbv + code * p.Dv + d : p.cbv;
      cp_async16(dst + r * CS + seg * VK, src, ok ? 16 : 0);
    }
    if (!XRES) {
      if (XV) copy_x(xbuf + stage * BM * CS, CS, (int64_t)c * BK, BK);
      else load_x(xbuf + stage * BM * CS, CS, (int64_t)c * BK, BK);
    }
  };

  // Resident x: by cp.async in the first commit group (waited for with step 0's chunk), or
  // element by element for strided x.
  if (XRES) {
    if (p.xvec) copy_x(xbuf, XS, 0, p.Dp);
    else load_x(xbuf, XS, 0, p.Dp);
  }

  M m;
  m.init(tid);
  m.load_norms(p.norms, tile_begin * BN, p.K);

  // The step STAGES - 1 ahead of the one computed, as (tile, chunk, stage).
  int itile = tile_begin, ic = 0, istage = 0;
  auto advance = [&]() {
    if (++ic == nchunks) { ic = 0; ++itile; }
    if (++istage == STAGES) istage = 0;
  };
#pragma unroll 1
  for (int s = 0; s < STAGES - 1; ++s) {
    if (itile < tile_end) { issue(itile, ic, istage); advance(); }
    cp_async_commit();  // empty groups too: the wait below counts groups
  }

  int stage = 0;
#pragma unroll 1
  for (int tile = tile_begin; tile < tile_end; ++tile) {
#pragma unroll 1
    for (int c = 0; c < nchunks; ++c) {
      cp_async_wait<STAGES - 2>();  // this thread's copies of this step have landed
      __syncthreads();              // ... everyone's, and everyone is done with the step before
      if (itile < tile_end) { issue(itile, ic, istage); advance(); }  // into that step's buffer
      cp_async_commit();
      const S* xb = XRES ? xbuf + c * BK : xbuf + stage * BM * CS;
      m.compute(xb, XRES ? XS : CS, cbuf + stage * BN * CS, CS);
      if (++stage == STAGES) stage = 0;
    }
    m.tile_done(tile * BN);
    if (tile + 1 < tile_end) m.load_norms(p.norms, (tile + 1) * BN, p.K);
  }

  cp_async_wait_all();
  __syncthreads();
  // Best candidates per row, merged over the block's threads, into scratch[0, BM) (reusing the
  // codebook buffers; the reduction synchronizes before and after).
  Cand<A>* scratch = reinterpret_cast<Cand<A>*>(cbuf);
  m.reduce(scratch, tid);

  if (p.splits == 1) {
    const int warp = tid >> 5, lane = tid & 31;
    for (int r = warp; r < BM; r += kThreads / 32) {
      const int64_t n = row0 + r;
      if (n < p.N) finish_row(p, n, rowoff[r], scratch[r], lane);
    }
  } else {
    for (int r = tid; r < BM; r += kThreads) {
      const int64_t n = row0 + r;
      if (n < p.N) p.part[(int64_t)split * p.N + n] = scratch[r];
    }
  }
}

template <class S, class M, bool XRES, bool XV>
void launch_search_variant(const FwdParams<S>& p, int rowblocks, const DeviceInfo& dev,
                           cudaStream_t st) {
  const size_t smem = SearchSmem<S, M, XRES>::bytes(p.Dp);
  auto kernel = search_kernel<S, M, XRES, XV>;
  // The kernel's dynamic shared-memory limit is raised to the device's opt-in maximum, once per
  // device (again only if that maximum changes), never to one launch's size: two host threads
  // launching with different D could otherwise lower it between the other's set and launch, and
  // that launch would fail (review F14). Every thread sets the same value, under a lock.
  static std::mutex mu;
  static std::unordered_map<int, int> opted;  // device -> the limit set
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = opted.find(dev.device);
    if (it == opted.end() || it->second != dev.smem_optin) {
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 dev.smem_optin),
            "cudaFuncSetAttribute(search kernel shared memory)");
      opted[dev.device] = dev.smem_optin;
    }
  }
  VQK_LAUNCH(kernel, dim3((unsigned)rowblocks, (unsigned)p.splits), kThreads, smem, st, p);
  check_launch("search kernel launch");
}

// x resident when it fits the device's shared memory, else staged chunk by chunk.
template <class S, class M>
void launch_search_impl(const FwdParams<S>& p, int rowblocks, const DeviceInfo& dev,
                        cudaStream_t st) {
  if (SearchSmem<S, M, true>::bytes(p.Dp) <= (size_t)dev.smem_optin)
    return launch_search_variant<S, M, true, false>(p, rowblocks, dev, st);
  if (SearchSmem<S, M, false>::bytes(p.Dp) > (size_t)dev.smem_optin)
    throw std::runtime_error("vqkernels CUDA: the search kernel needs more shared memory than "
                             "this device allows per block");
  if (p.xvec) return launch_search_variant<S, M, false, true>(p, rowblocks, dev, st);
  launch_search_variant<S, M, false, false>(p, rowblocks, dev, st);
}

}  // namespace cu
}  // namespace vqk
