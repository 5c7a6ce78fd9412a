// CUDA backward of the straight-through VQ op:
//   grad_x[n]   = grad_zq[n] + 2 g_commit[n] (x[n] - e[idx[n]])                (fused, elementwise)
//   grad_cb[k]  = sum over rows n with idx[n] = k of 2 g_codebook[n] (e[k] - x[n])
//
// grad_cb has two modes:
//   atomics (default): the row kernel adds each row's term into grad_cb as it writes grad_x.
//     Float atomics add in whatever order the hardware serves them, so the last bits can differ
//     from run to run.
//   deterministic: a stable radix sort (CUB) groups rows by code, keeping each code's rows in
//     ascending order, and a segmented sum adds them in that order. The sorted array is cut into
//     fixed chunks; a run of one code inside a chunk is summed by that chunk's warp, a run that
//     crosses chunks is summed per chunk and the chunk sums are added in chunk order, by whole
//     superchunks (kSuper chunks summed beforehand, in parallel) wherever a superchunk lies
//     entirely inside the run. Every sum has a fixed order that depends only on the sorted keys,
//     so the result is bitwise the same on every run; and a collapsed codebook (most rows on one
//     code) costs one warp N / (kChunk kSuper) serial steps instead of N / kChunk (review F3).
// Workspace for the deterministic mode comes from the caller (cuda_backward_workspace_bytes).
#ifndef VQK_CUDA_EMULATE
#include <cub/device/device_radix_sort.cuh>
#endif

#include <algorithm>
#include <climits>

#include "common.cuh"

namespace vqk {
namespace cu {
namespace {

constexpr int64_t kChunk = 128;  // sorted positions per warp in the segmented sum
constexpr int64_t kSuper = 32;   // chunks per superchunk: the second level of the sum's tree
constexpr uint32_t kNoKey = 0xffffffffu;

template <class S> struct BwdParams {
  using A = typename Acc<S>::type;
  const S* x;
  int64_t N, D, xS, xsb, xss, xsd;
  const S* cb;
  int64_t K;
  const int64_t* idx;
  const S* gzq;  // may be null
  int64_t gS, gsb, gss, gsd;
  const A* gcb;  // may be null
  const A* gcm;  // may be null
  S* gx;         // may be null
  int64_t oS, osb, oss, osd;
  A* gcbout;     // may be null
};

// Rows by groups of G lanes (G a power of two <= 32, about D), so short rows still fill a warp.
template <class S, bool CB_ATOMIC>
__global__ void __launch_bounds__(kThreads) rows_kernel(const BwdParams<S> p, int G) {
  using A = typename Acc<S>::type;
  const int lane = threadIdx.x & 31;
  const int sub = lane / G, gl = lane % G, rows_per_warp = 32 / G;
  const int64_t wpb = kThreads / 32;
  const int64_t warp = (int64_t)blockIdx.x * wpb + threadIdx.x / 32;
  const int64_t step = (int64_t)gridDim.x * wpb * rows_per_warp;
  for (int64_t n = warp * rows_per_warp + sub; n < p.N; n += step) {
    const int64_t k = p.idx[n];
    const bool ok = k >= 0 && k < p.K;  // a bad index poisons grad_x and adds nothing to grad_cb
    const S* xr = p.x + row_offset(n, p.xS, p.xsb, p.xss);
    const S* e = p.cb + (ok ? k : 0) * p.D;
    const A wc = p.gcm ? A(2) * p.gcm[n] : A(0);
    const A wb = p.gcb ? A(2) * p.gcb[n] : A(0);
    const S* g = p.gzq ? p.gzq + row_offset(n, p.gS, p.gsb, p.gss) : nullptr;
    S* o = p.gx ? p.gx + row_offset(n, p.oS, p.osb, p.oss) : nullptr;
    for (int64_t d = gl; d < p.D; d += G) {
      const A diff = to_acc(xr[d * p.xsd]) - (ok ? to_acc(e[d]) : nan_of<A>());
      if (o) {
        A v = g ? to_acc(g[d * p.gsd]) : A(0);
        if (p.gcm) v += wc * diff;
        o[d * p.osd] = from_acc<S>(v);
      }
      if (CB_ATOMIC && ok && p.gcb) atomicAdd(p.gcbout + k * p.D + d, -wb * diff);
    }
  }
}

// Sort keys: the code (K for an out-of-range index, which is then skipped), and the row; and
// where each row of x starts, so the segmented sum needs no 64-bit division (a division is a
// call on the GPU, and calls in its inner loop made ptxas spill).
__global__ void __launch_bounds__(kThreads) keys_kernel(const int64_t* idx, int64_t N, int64_t K,
                                                         int64_t xS, int64_t xsb, int64_t xss,
                                                         uint32_t* keys, uint32_t* rows,
                                                         int64_t* xoff) {
  for (int64_t n = (int64_t)blockIdx.x * kThreads + threadIdx.x; n < N;
       n += (int64_t)gridDim.x * kThreads) {
    const int64_t k = idx[n];
    keys[n] = (k >= 0 && k < K) ? (uint32_t)k : (uint32_t)K;
    rows[n] = (uint32_t)n;
    xoff[n] = row_offset(n, xS, xsb, xss);
  }
}

// Where pass A puts the sum of one run (see below); lanes past D and bad-index runs write nothing.
template <class A>
__device__ __forceinline__ void flush_run(A acc, uint32_t key, bool is_first, bool is_last,
                                          bool cont_in, bool cont_out, uint32_t K, int64_t c,
                                          int64_t d, int64_t D, A* first_part, A* last_part,
                                          A* grad_cb) {
  if (d >= D || key >= K) return;
  if (is_first && cont_in) first_part[c * D + d] = acc;
  else if (is_last && cont_out) last_part[c * D + d] = acc;
  else grad_cb[(int64_t)key * D + d] = acc;
}

// Pass A, one warp per chunk of kChunk sorted positions, lanes over D. A run of one code is
//   - complete inside the chunk: its sum goes straight to grad_cb (no other chunk has that code);
//   - the chunk's first run, continuing from the chunk before: its sum goes to first_part[c];
//   - the chunk's last run, continuing into the next chunk (and starting here): last_part[c].
template <class S>
__global__ void __launch_bounds__(kThreads) segsum_kernel(const BwdParams<S> p, const uint32_t* sk,
                                                           const uint32_t* sr, const int64_t* xoff,
                                                           typename Acc<S>::type* first_part,
                                                           typename Acc<S>::type* last_part) {
  using A = typename Acc<S>::type;
  const int lane = threadIdx.x & 31;
  const int64_t wpb = kThreads / 32;
  const int64_t nchunks = (p.N + kChunk - 1) / kChunk;
  const uint32_t K = (uint32_t)p.K;
  for (int64_t c = (int64_t)blockIdx.x * wpb + threadIdx.x / 32; c < nchunks;
       c += (int64_t)gridDim.x * wpb) {
    const int64_t s = c * kChunk, e = min(p.N, s + kChunk);
    const uint32_t kfirst = sk[s], klast = sk[e - 1];
    const bool cont_in = s > 0 && sk[s - 1] == kfirst;
    const bool cont_out = e < p.N && sk[e] == klast;
    for (int64_t d0 = 0; d0 < p.D; d0 += 32) {
      const int64_t d = d0 + lane;
      const bool active = d < p.D;
      A acc = 0;
      uint32_t cur = kfirst;
      bool first = true;
      // Not unrolled: the run breaks make unrolled copies branchy, and ptxas spilled them on sm_80.
#pragma unroll 1
      for (int64_t i = s; i < e; ++i) {
        const uint32_t key = sk[i];
        if (key != cur) {
          flush_run(acc, cur, first, false, cont_in, cont_out, K, c, d, p.D, first_part, last_part,
                    p.gcbout);
          acc = 0;
          cur = key;
          first = false;
        }
        if (active && key < K) {
          const int64_t n = sr[i];
          const A wb = A(2) * p.gcb[n];
          const A diff = to_acc(p.x[xoff[n] + d * p.xsd]) -
                         to_acc(p.cb[(int64_t)key * p.D + d]);
          acc += -wb * diff;
        }
      }
      flush_run(acc, cur, first, true, cont_in, cont_out, K, c, d, p.D, first_part, last_part,
                p.gcbout);
    }
  }
}

// Pass A2, one warp per superchunk (kSuper consecutive chunks) lying entirely inside one run:
// the first_part of its chunks (each the chunk's whole sum then) added in chunk order, and the
// run's key; kNoKey for any other superchunk. Keys are sorted, so "entirely inside" is: the
// position before it, its first and its last position all hold the same valid key.
template <class S>
__global__ void __launch_bounds__(kThreads) supersum_kernel(const BwdParams<S> p, const uint32_t* sk,
                                                             const typename Acc<S>::type* first_part,
                                                             typename Acc<S>::type* super_part,
                                                             uint32_t* super_key) {
  using A = typename Acc<S>::type;
  const int lane = threadIdx.x & 31;
  const int64_t wpb = kThreads / 32;
  const int64_t nchunks = (p.N + kChunk - 1) / kChunk;
  const int64_t nsuper = nchunks / kSuper;  // a partial superchunk at the end is never summed
  for (int64_t g = (int64_t)blockIdx.x * wpb + threadIdx.x / 32; g < nsuper;
       g += (int64_t)gridDim.x * wpb) {
    const int64_t c0 = g * kSuper, s = c0 * kChunk, e = min(p.N, (c0 + kSuper) * kChunk);
    const uint32_t key = sk[s];
    const bool inside = s > 0 && sk[s - 1] == key && sk[e - 1] == key && key < (uint32_t)p.K;
    if (lane == 0) super_key[g] = inside ? key : kNoKey;
    if (!inside) continue;
    for (int64_t d = lane; d < p.D; d += 32) {
      A tot = first_part[c0 * p.D + d];
#pragma unroll 1
      for (int64_t c = c0 + 1; c < c0 + kSuper; ++c) tot += first_part[c * p.D + d];
      super_part[g * p.D + d] = tot;
    }
  }
}

// Pass B, one warp per chunk that starts a run crossing into later chunks: its last_part plus the
// first_part of every chunk the run reaches, in chunk order, a whole superchunk's sum at once
// where pass A2 made one for this key.
template <class S>
__global__ void __launch_bounds__(kThreads) segjoin_kernel(const BwdParams<S> p, const uint32_t* sk,
                                                            const typename Acc<S>::type* first_part,
                                                            const typename Acc<S>::type* last_part,
                                                            const typename Acc<S>::type* super_part,
                                                            const uint32_t* super_key) {
  using A = typename Acc<S>::type;
  const int lane = threadIdx.x & 31;
  const int64_t wpb = kThreads / 32;
  const int64_t nchunks = (p.N + kChunk - 1) / kChunk;
  for (int64_t c = (int64_t)blockIdx.x * wpb + threadIdx.x / 32; c < nchunks;
       c += (int64_t)gridDim.x * wpb) {
    const int64_t s = c * kChunk, e = min(p.N, s + kChunk);
    const uint32_t kfirst = sk[s], klast = sk[e - 1];
    const bool cont_out = e < p.N && sk[e] == klast;
    const bool cont_in = s > 0 && sk[s - 1] == kfirst;
    if (!cont_out || (kfirst == klast && cont_in) || klast >= (uint32_t)p.K) continue;
    for (int64_t d = lane; d < p.D; d += 32) {
      A tot = last_part[c * p.D + d];
      for (int64_t c2 = c + 1;;) {
        int64_t last;  // the last chunk added in this step
        if (c2 % kSuper == 0 && c2 / kSuper < nchunks / kSuper && super_key[c2 / kSuper] == klast) {
          tot += super_part[(c2 / kSuper) * p.D + d];
          last = c2 + kSuper - 1;
        } else {
          tot += first_part[c2 * p.D + d];
          last = c2;
        }
        const int64_t e2 = min(p.N, (last + 1) * kChunk);
        const bool through = sk[e2 - 1] == klast && e2 < p.N && sk[e2] == klast;
        if (!through) break;
        c2 = last + 1;
      }
      p.gcbout[(int64_t)klast * p.D + d] = tot;
    }
  }
}

unsigned grid_for(int64_t items, int64_t per_block, int64_t cap = 1 << 16) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(cap, (items + per_block - 1) / per_block));
}

int end_bit_for(int64_t K) {  // keys run over [0, K]: K itself marks a bad index
  int bits = 1;
  while (bits < 32 && (int64_t(1) << bits) <= K) ++bits;
  return bits;
}

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

struct DetLayout {
  size_t keys, rows, skeys, srows, xoff, first, last, super_part, super_key, temp, temp_bytes,
      total;
};

template <class A>
DetLayout det_layout(int64_t N, int64_t K, int64_t D) {
  DetLayout l{};
  if (N > INT_MAX || N >= (int64_t(1) << 32))
    throw std::invalid_argument("vqkernels cuda_backward: the deterministic mode sorts at most "
                                "2^31 - 1 rows");
  size_t temp = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, temp, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                        (const uint32_t*)nullptr, (uint32_t*)nullptr, (int)N, 0,
                                        end_bit_for(K)),
        "cub::DeviceRadixSort::SortPairs (workspace size)");
  const size_t u = (size_t)N * sizeof(uint32_t);
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  const size_t part = (size_t)nchunks * D * sizeof(A);
  const size_t nsuper = (size_t)(nchunks / kSuper);
  size_t off = 0;
  l.keys = off; off = align_up(off + u, 256);
  l.rows = off; off = align_up(off + u, 256);
  l.skeys = off; off = align_up(off + u, 256);
  l.srows = off; off = align_up(off + u, 256);
  l.xoff = off; off = align_up(off + (size_t)N * sizeof(int64_t), 256);
  l.first = off; off = align_up(off + part, 256);
  l.last = off; off = align_up(off + part, 256);
  l.super_part = off; off = align_up(off + nsuper * D * sizeof(A), 256);
  l.super_key = off; off = align_up(off + nsuper * sizeof(uint32_t), 256);
  l.temp = off; off = align_up(off + temp, 256);
  l.temp_bytes = temp;
  l.total = off;
  return l;
}

void validate(int64_t N, int64_t K, int64_t D) {
  if (D < 1) throw std::invalid_argument("vqkernels cuda_backward: D must be positive");
  if (K < 1) throw std::invalid_argument("vqkernels cuda_backward: K must be positive");
  if (N < 0) throw std::invalid_argument("vqkernels cuda_backward: N must be non-negative");
}

template <class S>
void backward_t(const BackwardArgs& a, cudaStream_t st) {
  using A = typename Acc<S>::type;
  const int64_t N = a.x.n(), K = a.K, D = a.x.D;
  validate(N, K, D);
  A* gcbout = static_cast<A*>(a.grad_cb);
  if (gcbout) check(cudaMemsetAsync(gcbout, 0, (size_t)K * D * sizeof(A), st), "cudaMemsetAsync(grad_codebook)");
  if (N == 0) return;
  if (!a.x.ptr || !a.codebook || !a.indices)
    throw std::invalid_argument("vqkernels cuda_backward: x, codebook and indices are required");
  if (a.grad_x.ptr && (a.grad_x.B * a.grad_x.S != N || a.grad_x.D != D))
    throw std::invalid_argument("vqkernels cuda_backward: grad_x view does not match x");
  if (a.grad_zq.ptr && (a.grad_zq.B * a.grad_zq.S != N || a.grad_zq.D != D))
    throw std::invalid_argument("vqkernels cuda_backward: grad_zq view does not match x");

  BwdParams<S> p{};
  p.x = static_cast<const S*>(a.x.ptr);
  p.N = N; p.D = D; p.xS = a.x.S; p.xsb = a.x.sb; p.xss = a.x.ss; p.xsd = a.x.sd;
  p.cb = static_cast<const S*>(a.codebook);
  p.K = K;
  p.idx = a.indices;
  p.gzq = static_cast<const S*>(a.grad_zq.ptr);
  p.gS = a.grad_zq.S; p.gsb = a.grad_zq.sb; p.gss = a.grad_zq.ss; p.gsd = a.grad_zq.sd;
  p.gcb = static_cast<const A*>(a.g_codebook);
  p.gcm = static_cast<const A*>(a.g_commit);
  p.gx = static_cast<S*>(a.grad_x.ptr);
  p.oS = a.grad_x.S; p.osb = a.grad_x.sb; p.oss = a.grad_x.ss; p.osd = a.grad_x.sd;
  p.gcbout = gcbout;

  const bool cb_terms = gcbout && p.gcb;  // without g_codebook the codebook gradient is zero
  const bool det = cb_terms && a.deterministic;
  int G = 1;
  while (G < 32 && G < D) G <<= 1;
  const int64_t rows_per_block = (kThreads / 32) * (32 / G);
  if (p.gx || (cb_terms && !det)) {
    auto rows_k = (cb_terms && !det) ? rows_kernel<S, true> : rows_kernel<S, false>;
    VQK_LAUNCH(rows_k, grid_for(N, rows_per_block), kThreads, 0, st, p, G);
    check_launch("backward rows kernel launch");
  }
  if (!det) return;

  const DetLayout l = det_layout<A>(N, K, D);
  if (!a.workspace || a.workspace_bytes < (int64_t)l.total)
    throw std::invalid_argument("vqkernels cuda_backward: workspace of " +
                                std::to_string(a.workspace_bytes) + " bytes, the deterministic "
                                "mode needs " + std::to_string(l.total) +
                                " (cuda_backward_workspace_bytes)");
  char* ws = static_cast<char*>(a.workspace);
  auto* keys = reinterpret_cast<uint32_t*>(ws + l.keys);
  auto* rows = reinterpret_cast<uint32_t*>(ws + l.rows);
  auto* skeys = reinterpret_cast<uint32_t*>(ws + l.skeys);
  auto* srows = reinterpret_cast<uint32_t*>(ws + l.srows);
  auto* xoff = reinterpret_cast<int64_t*>(ws + l.xoff);
  auto* first = reinterpret_cast<A*>(ws + l.first);
  auto* last = reinterpret_cast<A*>(ws + l.last);
  auto* super_part = reinterpret_cast<A*>(ws + l.super_part);
  auto* super_key = reinterpret_cast<uint32_t*>(ws + l.super_key);
  VQK_LAUNCH(keys_kernel, grid_for(N, kThreads), kThreads, 0, st, a.indices, N, K, a.x.S, a.x.sb,
             a.x.ss, keys, rows, xoff);
  check_launch("backward keys kernel launch");
  size_t temp_bytes = l.temp_bytes;
  check(cub::DeviceRadixSort::SortPairs(ws + l.temp, temp_bytes, keys, skeys, rows, srows, (int)N, 0,
                                        end_bit_for(K), st),
        "cub::DeviceRadixSort::SortPairs");
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  auto segsum_k = segsum_kernel<S>;
  VQK_LAUNCH(segsum_k, grid_for(nchunks, kThreads / 32), kThreads, 0, st, p, skeys, srows, xoff, first, last);
  check_launch("backward segment-sum kernel launch");
  if (nchunks >= kSuper) {
    auto supersum_k = supersum_kernel<S>;
    VQK_LAUNCH(supersum_k, grid_for(nchunks / kSuper, kThreads / 32), kThreads, 0, st, p, skeys,
               first, super_part, super_key);
    check_launch("backward superchunk-sum kernel launch");
  }
  auto segjoin_k = segjoin_kernel<S>;
  VQK_LAUNCH(segjoin_k, grid_for(nchunks, kThreads / 32), kThreads, 0, st, p, skeys, first, last,
             super_part, super_key);
  check_launch("backward segment-join kernel launch");
}

template <class S>
int64_t backward_ws(int64_t N, int64_t K, int64_t D, bool deterministic) {
  validate(N, K, D);
  if (!deterministic || N == 0) return 0;
  return (int64_t)det_layout<typename Acc<S>::type>(N, K, D).total;
}

}  // namespace
}  // namespace cu

void cuda_backward(const BackwardArgs& a, std::uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::f32: return cu::backward_t<float>(a, st);
    case DType::f64: return cu::backward_t<double>(a, st);
    case DType::f16: return cu::backward_t<__half>(a, st);
    case DType::bf16: return cu::backward_t<__nv_bfloat16>(a, st);
  }
  throw std::invalid_argument("vqkernels cuda_backward: unknown dtype");
}

int64_t cuda_backward_workspace_bytes(DType dtype, int64_t N, int64_t K, int64_t D,
                                      bool deterministic) {
  switch (dtype) {
    case DType::f32: return cu::backward_ws<float>(N, K, D, deterministic);
    case DType::f64: return cu::backward_ws<double>(N, K, D, deterministic);
    case DType::f16: return cu::backward_ws<__half>(N, K, D, deterministic);
    case DType::bf16: return cu::backward_ws<__nv_bfloat16>(N, K, D, deterministic);
  }
  throw std::invalid_argument("vqkernels cuda_backward_workspace_bytes: unknown dtype");
}

}  // namespace vqk
