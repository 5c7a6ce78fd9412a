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
// path whenever p.xvec, outside the step loop). Blocks per SM the registers must allow: the
// micro's kMinBlocksAsync where x is resident or arrives by cp.async, kMinBlocks where strided x
// passes through registers in the step loop.
template <class S, class M, bool XRES, bool XV>
__global__ void __launch_bounds__(kThreads, (XRES || XV) ? M::kMinBlocksAsync : M::kMinBlocks)
    search_kernel(const FwdParams<S> p) {
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

  constexpr int kVecs = BK / VK;             // 16-byte vectors per row of a chunk
  constexpr int kCbVecs = BN * kVecs / kThreads;  // per thread and step: codebook vectors,
  constexpr int kXVecs = BM * kVecs / kThreads;   // x vectors (cp.async staged x),
  constexpr int kXElems = BM * BK / kThreads;     // x elements (strided staged x)
  static_assert(BN * kVecs % kThreads == 0 && BM * kVecs % kThreads == 0 &&
                    kThreads % BM == 0,
                "every thread copies the same number of vectors and elements of every chunk");
  const int D = (int)p.D, Dv = (int)p.Dv;  // <= Dp < 2^31: 32-bit column arithmetic

  // Rows [0, BM) x depth [0, W) of x into the resident buffer by 16-byte cp.async (p.xvec: the
  // rows start on 16-byte boundaries, W is whole vectors); the vector that straddles D copies only
  // its part and zero-fills the rest, as do rows past N and vectors past D. Runs once. fp64:
  // the register tiles plus the top-2 state fill the 128 registers of two blocks per SM, so the
  // loop is not unrolled there (unrolled it spilled on sm_80).
  constexpr int kXUnroll = sizeof(S) == 8 ? 1 : 4;
  auto copy_x = [&](S* dst, int ld, int W) {
    const int vecs = W / VK;
#pragma unroll kXUnroll
    for (int v = tid; v < BM * vecs; v += kThreads) {
      const int r = v / vecs, seg = v - r * vecs;
      const int d = seg * VK;
      const int64_t off = rowoff[r];
      const int left = D - d;
      const int bytes = (off >= 0 && left > 0) ? min(left, VK) * (int)sizeof(S) : 0;
      cp_async16(dst + r * ld + seg * VK, bytes ? p.x + off + d : p.x, bytes);
    }
  };

  // The step loop's copies. Each thread copies the same vectors (row, segment) or elements of
  // every chunk, so the loops have fixed trip counts and 32-bit indices (code < K + BN <= 2^30 +
  // BN, d < Dp): a few instructions per vector instead of a generic strided loop with 64-bit
  // products (review F8).
  auto issue = [&](int tile, int c, int stage) {  // codebook chunk (tile, c) into buffer `stage`
    S* dst = cbuf + stage * (BN * CS);
    const int code0 = tile * BN, d0 = c * BK;
#pragma unroll
    for (int i = 0; i < kCbVecs; ++i) {
      const int v = tid + i * kThreads;
      const int r = v / kVecs, seg = v % kVecs;
      const int code = code0 + r, d = d0 + seg * VK;
      const bool ok = code < p.K && d < Dv;  // Dv is a multiple of VK: whole vectors only
      const S* src = ok ? p.cbv + ((uint64_t)(uint32_t)code * (uint32_t)Dv + (uint32_t)d) : p.cbv;
      cp_async16(dst + r * CS + seg * VK, src, ok ? 16 : 0);
    }
  };
  auto copy_x_chunk = [&](int c, int stage) {  // XV: x chunk c into buffer `stage`, as copy_x
    S* dst = xbuf + stage * (BM * CS);
#pragma unroll
    for (int i = 0; i < kXVecs; ++i) {
      const int v = tid + i * kThreads;
      const int r = v / kVecs, seg = v % kVecs;
      const int d = c * BK + seg * VK;
      const int64_t off = rowoff[r];
      const int left = D - d;
      const int bytes = (off >= 0 && left > 0) ? min(left, VK) * (int)sizeof(S) : 0;
      cp_async16(dst + r * CS + seg * VK, bytes ? p.x + off + d : p.x, bytes);
    }
  };

  // Strided x (channel-first input, or rows not 16-byte aligned): element by element, through
  // registers. fetch_x issues the loads of a chunk (rows [0, BM) x depth [d0, d0 + BK), zero
  // outside x) and put_x stores them to shared memory later: in the step loop after the step's
  // MMAs, so the loads' latency passes under the tensor-core work instead of stalling before it
  // (review F2); in the resident prologue a chunk at a time, kXElems loads in flight per thread
  // instead of one (F9). Threads walk the direction that is contiguous in memory: along D when it
  // is (xsd == 1), else along rows (channel-first: consecutive rows are adjacent).
  static_assert(kThreads % BK == 0 && kThreads % BM == 0, "fixed rows / columns per thread");
  S xr[kXElems];
  auto fetch_x = [&](int d0) {
    if (p.xsd == 1) {  // along D: thread column j, rows r0 + i * kThreads / BK
      const int d = d0 + tid % BK, r0 = tid / BK;
#pragma unroll
      for (int i = 0; i < kXElems; ++i) {
        const int64_t off = rowoff[r0 + i * (kThreads / BK)];
        xr[i] = (off >= 0 && d < D) ? p.x[off + d] : zero_of<S>();
      }
    } else {  // along rows: thread row r, columns j0 + i * kThreads / BM
      const int64_t off = rowoff[tid % BM];
      const int j0 = d0 + tid / BM;
      const S* src = p.x + (off >= 0 ? off + (int64_t)j0 * p.xsd : 0);
      const int64_t step = (int64_t)(kThreads / BM) * p.xsd;
#pragma unroll
      for (int i = 0; i < kXElems; ++i)
        xr[i] = (off >= 0 && j0 + i * (kThreads / BM) < D) ? src[i * step] : zero_of<S>();
    }
  };
  auto put_x = [&](S* dst, int ld) {
    if (p.xsd == 1) {
      dst += (tid / BK) * ld + tid % BK;
#pragma unroll
      for (int i = 0; i < kXElems; ++i) dst[i * (kThreads / BK) * ld] = xr[i];
    } else {
      dst += (tid % BM) * ld + tid / BM;
#pragma unroll
      for (int i = 0; i < kXElems; ++i) dst[i * (kThreads / BM)] = xr[i];
    }
  };

  // Resident x: by cp.async in the first commit group (waited for with step 0's chunk), or
  // through registers for strided x.
  if (XRES) {
    if (p.xvec) {
      copy_x(xbuf, XS, p.Dp);
    } else {
#pragma unroll 1
      for (int c = 0; c < nchunks; ++c) {
        fetch_x(c * BK);
        put_x(xbuf + c * BK, XS);
      }
    }
  }

  M m;
  m.init(tid, XS, CS);
  m.load_norms(p.norms, tile_begin * BN, p.K);

  // The step STAGES - 1 ahead of the one computed, as (tile, chunk); its stage is the one
  // before the computed step's (derived, not carried: one register fewer in the step loop).
  constexpr bool XR = !XRES && !XV;  // staged x through registers
  int itile = tile_begin, ic = 0;
  auto advance = [&]() {
    if (++ic == nchunks) { ic = 0; ++itile; }
  };
#pragma unroll 1
  for (int s = 0; s < STAGES - 1; ++s) {
    if (itile < tile_end) {
      issue(itile, ic, s);
      if (XV) copy_x_chunk(ic, s);
      if (XR) {
        fetch_x(ic * BK);
        put_x(xbuf + s * (BM * CS), CS);
      }
      advance();
    }
    cp_async_commit();  // empty groups too: the wait below counts groups
  }

  int stage = 0;
#pragma unroll 1
  for (int tile = tile_begin; tile < tile_end; ++tile) {
#pragma unroll 1
    for (int c = 0; c < nchunks; ++c) {
      cp_async_wait<STAGES - 2>();  // this thread's copies of this step have landed
      __syncthreads();              // ... everyone's, and everyone is done with the step before
      // Into the buffer of the step before (free after the barrier).
      const int istage = stage == 0 ? STAGES - 1 : stage - 1;
      int xstage = -1;
      if (itile < tile_end) {
        issue(itile, ic, istage);
        if (XV) copy_x_chunk(ic, istage);
        if (XR) {
          fetch_x(ic * BK);
          xstage = istage;
        }
        advance();
      }
      cp_async_commit();
      const S* xb = XRES ? xbuf + c * BK : xbuf + stage * BM * CS;
      m.compute(xb, XRES ? XS : CS, cbuf + stage * BN * CS, CS);
      // Strided x of step + STAGES - 1: its buffer was released by this step's barrier and is
      // read after STAGES - 1 more barriers.
      if (XR && xstage >= 0) put_x(xbuf + xstage * (BM * CS), CS);
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
