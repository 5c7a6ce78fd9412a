// CUDA forward: planning, workspace, and the launches around the search kernels.
//
// One forward is (on the caller's stream):
//   1. counts <- 0, E <- 0;
//   2. norms_kernel: ||e_k||^2 once per call into the workspace (and, when the codebook rows are
//      not whole 16-byte vectors, a zero-padded copy the search can stream with cp.async), and
//      the bound E^2 >= max ||e_k||^2 of the exactness check (common.cuh, Bound<>);
//   3. search_kernel (search.cuh): blocks of rows x a range of codebook tiles, the fast pass's
//      (v1, i1, v2) per row; with one split it finishes the rows itself (finish_row: the proven
//      rows get index, exact error, z_q, counts; the others are flagged);
//   4. finalize_kernel, only when the codebook was split across blocks: merges the splits'
//      (v1, i1, v2) and finishes the rows;
//   5. research_kernel: the flagged rows (rare on real data) searched exactly, in float64; blocks
//      whose rows are all proven leave at once. No host synchronisation anywhere (graph-safe).
// Workspace (temporary device memory) is allocated by the caller (torch) and passed in; its size
// comes from cuda_forward_workspace_bytes with the same arguments.
//
// Residual and grouped VQ (issue 17) are a stage loop in Python (vqkernels/residual.py) over this
// single-stage forward, one call per stage or group, not a fused kernel. The reason: a stage is
// all of the above (norms, split-K search, finalize merge, exact re-search launch); fusing stages
// would carry the residual through that whole sequence inside one kernel, a second copy of it.
// The loop's extra traffic is the residual written and read once per stage (2 N D values), small
// next to the K D codebook reads of each stage at the issue's shapes, and each stage keeps this
// kernel's exactness as it is (tests/test_cuda_emulated.py runs residual_vq and grouped_vq with
// backend "cuda" through the emulator, every stage judged against the float64 reference).
#include <algorithm>
#include <climits>

#include "common.cuh"

namespace vqk {
namespace cu {
namespace {

// Splitting the codebook across blocks gives small-N, large-K searches enough blocks to fill the
// GPU: aim for about this many blocks (a few waves even on the largest parts) ...
constexpr int64_t kTargetBlocks = 1024;
// ... while every split keeps enough pipeline steps (tiles x depth chunks) to overlap its
// copies with math, and at least one tile.
constexpr int64_t kMinStepsPerSplit = 16;
constexpr int64_t kMaxSplits = 64;
// Code indices are int32 inside the kernels, with room for a tile past the end.
constexpr int64_t kMaxK = int64_t(1) << 30;
// The norms kernel's grid: enough blocks to stream the codebook at full bandwidth, few enough
// that their atomics on the codebook bound stay cheap.
constexpr int64_t kNormBlocks = 1024;

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

struct FwdPlan {
  int64_t rowblocks = 0, ntiles = 0, Dv = 0, Dp = 0;
  int splits = 1, tiles_per_split = 0;
  bool padcopy = false;
  size_t off_cbstat = 0, off_norms = 0, off_cbpad = 0, off_part = 0, total = 0;
};

template <class S>
FwdPlan plan_forward(int64_t N, int64_t K, int64_t D, std::uintptr_t cb) {
  using A = typename Acc<S>::type;
  constexpr int BM = Cfg<S>::BM, BN = Cfg<S>::BN, BK = Cfg<S>::BK;
  constexpr int64_t vec = 16 / sizeof(S);
  FwdPlan q;
  q.rowblocks = (N + BM - 1) / BM;
  q.ntiles = (K + BN - 1) / BN;
  q.Dp = (D + BK - 1) / BK * BK;
  int64_t splits = 1;
  if (q.rowblocks > 0 && q.rowblocks < kTargetBlocks) {
    const int64_t want = (kTargetBlocks + q.rowblocks - 1) / q.rowblocks;
    const int64_t steps = q.ntiles * (q.Dp / BK);
    const int64_t most = std::max<int64_t>(1, std::min(q.ntiles, steps / kMinStepsPerSplit));
    splits = std::min({want, most, kMaxSplits});
  }
  q.tiles_per_split = (int)((q.ntiles + splits - 1) / splits);
  q.splits = (int)((q.ntiles + q.tiles_per_split - 1) / q.tiles_per_split);  // none left empty
  q.padcopy = (D % vec) != 0 || (cb % 16) != 0;
  q.Dv = q.padcopy ? (D + vec - 1) / vec * vec : D;
  size_t off = 0;
  q.off_cbstat = off;
  off = align_up(off + 2 * sizeof(unsigned long long), 256);
  q.off_norms = off;
  off = align_up(off + (size_t)K * sizeof(A), 256);
  q.off_cbpad = off;
  if (q.padcopy) off = align_up(off + (size_t)K * q.Dv * sizeof(S), 256);
  q.off_part = off;
  if (q.splits > 1) off = align_up(off + (size_t)q.splits * N * sizeof(Cand<A>), 256);
  q.total = N > 0 ? off : 0;
  return q;
}

void validate_sizes(int64_t N, int64_t K, int64_t D, const char* who) {
  if (D < 1) throw std::invalid_argument(std::string(who) + ": D must be positive");
  if (D > (int64_t(1) << 30))
    throw std::invalid_argument(std::string(who) + ": D = " + std::to_string(D) +
                                " is more than the CUDA kernels support (2^30)");
  if (K < 1) throw std::invalid_argument(std::string(who) + ": K must be positive");
  if (K > kMaxK)
    throw std::invalid_argument(std::string(who) + ": K = " + std::to_string(K) +
                                " codes is more than the CUDA kernels support (2^30)");
  if (N < 0) throw std::invalid_argument(std::string(who) + ": N must be non-negative");
}

// One warp per code: ||e||^2 summed in double in a fixed order (equal codes get equal norms) and
// rounded to the accumulation type for the search, and the zero-padded copy when asked for. Also
// two codebook statistics for the exactness check, merged over blocks by integer atomicMax on the
// bits (non-negative doubles order like their bits) into cbstat:
//   [0] an upper bound on max ||e_k||^2 over the codes whose entries are all finite (a code with a
//       NaN or inf is never the answer for a finite row, and its approximate value is NaN or +inf,
//       never a candidate), rounded up (sum_sq_up). Adding e_d * 0 makes the sum NaN exactly when
//       an entry is NaN or +-inf, while a sum of finite fp64 entries that overflows stays +inf (so
//       E = inf, and every row is re-searched);
//   [1] max |e_d| over the finite entries: the float64 re-search's scale (research_kernel).
template <class S>
__global__ void __launch_bounds__(kThreads) norms_kernel(const S* cb, int64_t K, int64_t D,
                                                          typename Acc<S>::type* norms, S* cbpad,
                                                          int64_t Dv, unsigned long long* cbstat) {
  using A = typename Acc<S>::type;
  VQK_DYNAMIC_SMEM(smem_raw);
  double* red = reinterpret_cast<double*>(smem_raw);  // 2 x kThreads
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t wpb = kThreads / 32;
  double emax = 0, amax = 0;
  for (int64_t k = (int64_t)blockIdx.x * wpb + warp; k < K; k += (int64_t)gridDim.x * wpb) {
    const S* e = cb + k * D;
    double s = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const double v = (double)to_acc(e[d]);
      s = fma(v, v, s + v * 0.0);
      const double a = fabs(v);
      amax = a < INFINITY && a > amax ? a : amax;
    }
    s = warp_sum(s);
    if (s == s) {
      const double up = sum_sq_up(s, D);
      emax = up > emax ? up : emax;
    }
    if (lane == 0) norms[k] = (A)s;
    if (cbpad)
      for (int64_t d = lane; d < Dv; d += 32) cbpad[k * Dv + d] = d < D ? e[d] : zero_of<S>();
  }
  red[threadIdx.x] = emax;
  red[kThreads + threadIdx.x] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int t = 1; t < kThreads; ++t) {
      emax = red[t] > emax ? red[t] : emax;
      amax = red[kThreads + t] > amax ? red[kThreads + t] : amax;
    }
    if (emax > 0) atomicMax(cbstat, (unsigned long long)__double_as_longlong(emax));
    if (amax > 0) atomicMax(cbstat + 1, (unsigned long long)__double_as_longlong(amax));
  }
}

// One warp per row: merge the splits' (v1, i1, v2) (the merge is order-free: the best value with
// the lowest index, and the second smallest of all values), then finish the row.
template <class S>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FwdParams<S> p) {
  using A = typename Acc<S>::type;
  const int lane = threadIdx.x & 31;
  const int64_t wpb = kThreads / 32;
  for (int64_t n = (int64_t)blockIdx.x * wpb + threadIdx.x / 32; n < p.N;
       n += (int64_t)gridDim.x * wpb) {
    Cand<A> c = p.part[n];
    for (int s = 1; s < p.splits; ++s) merge2(c, p.part[(int64_t)s * p.N + n]);
    finish_row(p, n, row_offset(n, p.xS, p.xsb, p.xss), c, lane);
  }
}

// The exact re-search of the rows finish_row flagged (indices[n] < 0, threshold in sqerr[n]).
// A block takes kThreads rows; each thread reads one row's flag into shared memory, and a block
// with no flagged row is done after that. Each flagged row is then searched by the whole block,
// thread t taking codes t, t + kThreads, ...:
//   * unless the threshold is +inf or NaN, the code's approximate value a_k = ||e_k||^2 - 2 x.e_k
//     is recomputed (an FMA chain in the accumulation type, within the same bound B) and the code
//     is skipped when a_k > v1 + 2B (it cannot be the nearest, common.cuh);
//   * otherwise its exact distance sum (x_d - e_d)^2 in double (a NaN counts as +inf).
// The lowest code with the least distance wins (each thread's codes rise, and the block reduction
// orders by (distance, code)); its float64 distance is the error (cast), z_q is the code unless
// that distance is not finite.
// float64 input: squares overflow past 2^511 and lose bits below 2^-511, so, as the reference does
// (reference.py, _search_scale), rows and codes are measured multiplied by one power of two when
// the largest finite magnitude m (of the row and the whole codebook) is beyond 2^+-480: m scaled
// to [2^479, 2^480) (or [2^-481, 2^-480)). Exact, so the order of distances and ties are kept; z_q
// is NaN where the scaled distance is not finite, and the error is the unscaled one (+inf where
// it overflows).
template <class S>
__global__ void __launch_bounds__(kThreads) research_kernel(const FwdParams<S> p) {
  using A = typename Acc<S>::type;
  VQK_DYNAMIC_SMEM(smem_raw);
  int64_t* rows = reinterpret_cast<int64_t*>(smem_raw);
  double* wd = reinterpret_cast<double*>(rows + kThreads);
  int* wk = reinterpret_cast<int*>(wd + kThreads);
  const int tid = threadIdx.x;
  for (int64_t base = (int64_t)blockIdx.x * kThreads; base < p.N;
       base += (int64_t)gridDim.x * kThreads) {
    {
      const int64_t n = base + tid;
      rows[tid] = n < p.N && p.indices[n] < 0 ? n : -1;
    }
    __syncthreads();
#pragma unroll 1
    for (int r = 0; r < kThreads; ++r) {
      const int64_t n = rows[r];  // the same for the whole block
      if (n < 0) continue;
      const S* x = p.x + row_offset(n, p.xS, p.xsb, p.xss);
      const A thr = p.sqerr[n];
      const bool every = !(thr < inf_of<A>());  // +inf or NaN: no filter
      double sc = 1.0;
      if (sizeof(S) == 8) {
        double m = 0;
        for (int64_t d = tid; d < p.D; d += kThreads) {
          const double a = fabs((double)to_acc(x[d * p.xsd]));
          m = a < INFINITY && a > m ? a : m;
        }
        wd[tid] = m;
        __syncthreads();
        m = __longlong_as_double((long long)p.cbstat[1]);
        for (int t = 0; t < kThreads; ++t) m = wd[t] > m ? wd[t] : m;
        __syncthreads();
        int ex = 0;
        frexp(m, &ex);
        if (m > 0x1p480) sc = ldexp(1.0, 480 - ex);
        else if (m > 0.0 && m < 0x1p-480) sc = ldexp(1.0, -480 - ex);
      }
      double best = INFINITY, raw = INFINITY;
      int bk = INT_MAX;
      for (int k = tid; k < p.K; k += kThreads) {
        const S* e = p.cb + (int64_t)k * p.D;
        if (!every) {
          A dot = 0;
          for (int64_t d = 0; d < p.D; ++d) dot = fma(to_acc(x[d * p.xsd]), to_acc(e[d]), dot);
          if (!(fma(A(-2), dot, p.norms[k]) <= thr)) continue;
        }
        double s = 0;
        for (int64_t d = 0; d < p.D; ++d) {
          const double t = (double)to_acc(x[d * p.xsd]) * sc - (double)to_acc(e[d]) * sc;
          s = fma(t, t, s);
        }
        const double key = s < INFINITY ? s : INFINITY;  // NaN -> +inf
        if (before(key, k, best, bk)) { best = key; raw = s; bk = k; }
      }
      // The block's best (distance, code): every thread reads all candidates (one barrier).
      wd[tid] = best;
      wk[tid] = bk;
      __syncthreads();
      double v = wd[0];
      int k = wk[0];
      for (int t = 1; t < kThreads; ++t)
        if (before(wd[t], wk[t], v, k)) { v = wd[t]; k = wk[t]; }
      __syncthreads();  // wd / wk are free for the next row
      if (k >= p.K) k = 0;  // unreachable: every code is measured when no threshold applies
      if (k == bk) {        // the thread that measured the winner
        if (sc != 1.0) {    // its unscaled error
          const S* e = p.cb + (int64_t)k * p.D;
          raw = 0;
          for (int64_t d = 0; d < p.D; ++d) {
            const double t = (double)to_acc(x[d * p.xsd]) - (double)to_acc(e[d]);
            raw = fma(t, t, raw);
          }
        }
        p.indices[n] = k;
        p.sqerr[n] = (A)raw;
        if (p.counts) atomicAdd(p.counts + k, 1ull);
      } else if (bk == INT_MAX && k == 0 && tid == 0) {
        p.indices[n] = 0;
        p.sqerr[n] = nan_of<A>();
        if (p.counts) atomicAdd(p.counts, 1ull);
      }
      if (p.zq) {
        S* z = p.zq + row_offset(n, p.zS, p.zsb, p.zss);
        const S* e = p.cb + (int64_t)k * p.D;
        const bool finite = v < INFINITY;
        const S bad = from_acc<S>(nan_of<A>());
        for (int64_t d = tid; d < p.D; d += kThreads) z[d * p.zsd] = finite ? e[d] : bad;
      }
    }
    __syncthreads();  // rows[] is rewritten for the next group
  }
}

unsigned grid_for(int64_t items, int64_t per_block, int64_t cap = 1 << 16) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(cap, (items + per_block - 1) / per_block));
}

template <class S>
void forward_t(const ForwardArgs& a, cudaStream_t st) {
  using A = typename Acc<S>::type;
  const int64_t N = a.x.n(), K = a.K, D = a.x.D;
  validate_sizes(N, K, D, "vqkernels cuda_forward");
  if (a.x.B < 0 || a.x.S < 0) throw std::invalid_argument("vqkernels cuda_forward: bad x view");
  if (a.counts) check(cudaMemsetAsync(a.counts, 0, (size_t)K * sizeof(int64_t), st), "cudaMemsetAsync(counts)");
  if (N == 0) return;
  if (!a.x.ptr || !a.codebook || !a.indices || !a.sqerr)
    throw std::invalid_argument("vqkernels cuda_forward: x, codebook, indices and sqerr are required");
  if (a.zq.ptr && (a.zq.B * a.zq.S != N || a.zq.D != D))
    throw std::invalid_argument("vqkernels cuda_forward: z_q view does not match x");

  const FwdPlan q = plan_forward<S>(N, K, D, reinterpret_cast<std::uintptr_t>(a.codebook));
  if (q.rowblocks > INT_MAX) throw std::invalid_argument("vqkernels cuda_forward: too many rows");
  if (!a.workspace || a.workspace_bytes < (int64_t)q.total)
    throw std::invalid_argument("vqkernels cuda_forward: workspace of " +
                                std::to_string(a.workspace_bytes) + " bytes, needs " +
                                std::to_string(q.total) + " (cuda_forward_workspace_bytes)");
  char* ws = static_cast<char*>(a.workspace);
  A* norms = reinterpret_cast<A*>(ws + q.off_norms);
  S* cbpad = q.padcopy ? reinterpret_cast<S*>(ws + q.off_cbpad) : nullptr;
  const S* cb = static_cast<const S*>(a.codebook);

  auto* cbstat = reinterpret_cast<unsigned long long*>(ws + q.off_cbstat);
  check(cudaMemsetAsync(cbstat, 0, 2 * sizeof(*cbstat), st), "cudaMemsetAsync(codebook bounds)");
  // At most kNormBlocks blocks: each merges its bound with one atomic.
  auto norms_k = norms_kernel<S>;
  VQK_LAUNCH(norms_k, grid_for(K, kThreads / 32, kNormBlocks), kThreads,
             2 * kThreads * sizeof(double), st, cb, K, D, norms, cbpad, q.Dv, cbstat);
  check_launch("norms kernel launch");

  FwdParams<S> p{};
  p.x = static_cast<const S*>(a.x.ptr);
  p.N = N; p.D = D; p.xS = a.x.S; p.xsb = a.x.sb; p.xss = a.x.ss; p.xsd = a.x.sd;
  {
    // Row n starts at b * sb + s * ss elements: 16-byte aligned for every n when the base is and
    // each stride that varies is a whole number of 16-byte vectors.
    constexpr int64_t vec = 16 / sizeof(S);
    p.xvec = p.xsd == 1 && reinterpret_cast<std::uintptr_t>(p.x) % 16 == 0 &&
             (a.x.B == 1 || a.x.sb % vec == 0) && (a.x.S == 1 || a.x.ss % vec == 0);
  }
  p.cb = cb;
  p.cbv = q.padcopy ? cbpad : cb;
  p.Dv = q.Dv;
  p.K = (int)K;
  p.Dp = (int)q.Dp;
  p.norms = norms;
  p.zq = static_cast<S*>(a.zq.ptr);
  p.zS = a.zq.S; p.zsb = a.zq.sb; p.zss = a.zq.ss; p.zsd = a.zq.sd;
  p.indices = a.indices;
  p.sqerr = static_cast<A*>(a.sqerr);
  p.counts = reinterpret_cast<unsigned long long*>(a.counts);
  p.part = q.splits > 1 ? reinterpret_cast<Cand<A>*>(ws + q.off_part) : nullptr;
  p.splits = q.splits;
  p.tiles_per_split = q.tiles_per_split;
  p.ntiles = (int)q.ntiles;
  p.cbstat = cbstat;

  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  DeviceInfo info{};
  info.device = dev;
  check(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "cudaDeviceGetAttribute(max shared memory per block)");
  launch_search<S>(p, (int)q.rowblocks, info, st);

  if (q.splits > 1) {
    auto finalize_k = finalize_kernel<S>;
    VQK_LAUNCH(finalize_k, grid_for(N, kThreads / 32), kThreads, 0, st, p);
    check_launch("finalize kernel launch");
  }

  auto research_k = research_kernel<S>;
  const size_t research_smem = kThreads * (sizeof(int64_t) + sizeof(double) + sizeof(int));
  VQK_LAUNCH(research_k, grid_for(N, kThreads), kThreads, research_smem, st, p);
  check_launch("research kernel launch");
}

template <class S>
int64_t forward_ws(int64_t N, int64_t K, int64_t D, std::uintptr_t cb) {
  validate_sizes(N, K, D, "vqkernels cuda_forward_workspace_bytes");
  return (int64_t)plan_forward<S>(N, K, D, cb).total;
}

}  // namespace
}  // namespace cu

void cuda_forward(const ForwardArgs& a, std::uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::f32: return cu::forward_t<float>(a, st);
    case DType::f64: return cu::forward_t<double>(a, st);
    case DType::f16: return cu::forward_t<__half>(a, st);
    case DType::bf16: return cu::forward_t<__nv_bfloat16>(a, st);
  }
  throw std::invalid_argument("vqkernels cuda_forward: unknown dtype");
}

int64_t cuda_forward_workspace_bytes(DType dtype, int64_t N, int64_t K, int64_t D,
                                     std::uintptr_t codebook) {
  switch (dtype) {
    case DType::f32: return cu::forward_ws<float>(N, K, D, codebook);
    case DType::f64: return cu::forward_ws<double>(N, K, D, codebook);
    case DType::f16: return cu::forward_ws<__half>(N, K, D, codebook);
    case DType::bf16: return cu::forward_ws<__nv_bfloat16>(N, K, D, codebook);
  }
  throw std::invalid_argument("vqkernels cuda_forward_workspace_bytes: unknown dtype");
}

}  // namespace vqk
