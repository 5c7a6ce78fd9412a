// Pieces shared by the CUDA kernels: error checks, element traits, PTX wrappers (cp.async, ldmatrix,
// mma.sync), candidate lists for the argmin, and the per-row epilogue of the forward.
//
// Everything here is device code or plain host helpers; no torch header is included.
//
// VQK_CUDA_EMULATE: the same sources compile as plain C++ against tests/cuda_emu/cuda_emu.h (force
// included), which runs kernels on the CPU; only the PTX wrappers and the launch syntax differ.
#pragma once
#ifndef VQK_CUDA_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// Launch and dynamic shared memory, spelled so the emulator can replace them.
#define VQK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define VQK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "vqk/vqk.h"

namespace vqk {
namespace cu {

// ------------------------------------------------------------------------------------------------
// Host: every CUDA call and launch goes through these, so a failure reaches Python as a
// RuntimeError carrying CUDA's own message.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a sticky-free error so the next call starts clean
    throw std::runtime_error(std::string("vqkernels CUDA error in ") + what + ": " +
                             cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;  // every search/epilogue block: 8 warps

// ------------------------------------------------------------------------------------------------
// Element traits: storage type S, accumulation type A.
template <class S> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class S> __device__ __forceinline__ S from_acc(typename Acc<S>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <class S> __device__ __forceinline__ S zero_of();
template <> __device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <> __device__ __forceinline__ double zero_of<double>() { return 0.0; }
template <> __device__ __forceinline__ __half zero_of<__half>() { return __ushort_as_half(0); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() {
  return __ushort_as_bfloat16(0);
}

template <class A> __device__ __forceinline__ A inf_of() { return A(INFINITY); }
template <class A> __device__ __forceinline__ A nan_of() { return A(NAN); }

// Row n of a (B, S, D) view starts at b*sb + s*ss with n = b*S + s (all 64-bit).
__device__ __forceinline__ int64_t row_offset(int64_t n, int64_t S, int64_t sb, int64_t ss) {
  const int64_t b = n / S;
  return b * sb + (n - b * S) * ss;
}

#ifndef VQK_CUDA_EMULATE
// ------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared; bytes < 16 zero-fills the rest (0 reads nothing).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulation.
template <class S> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                                            uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                             uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4],
                                                                    const uint32_t (&a)[4],
                                                                    uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // VQK_CUDA_EMULATE

// ------------------------------------------------------------------------------------------------
// Candidates: the best two (distance, code) pairs seen, ordered by distance then index, so ties go
// to the lowest index wherever lists are merged. An empty slot is (+inf, -1): a distance is only
// ever inserted when it is strictly below a slot's, so +inf and NaN never enter and an empty slot
// sorts after every real one.
template <class A> struct Cand {
  A v1, v2;
  int i1, i2;
};

template <class A> __device__ __forceinline__ bool before(A va, int ia, A vb, int ib) {
  return va < vb || (va == vb && ia < ib);
}

// a <- best two of a and b (each already ordered).
template <class A>
__device__ __forceinline__ void merge2(A& v1, int& i1, A& v2, int& i2, A w1, int j1, A w2, int j2) {
  if (before(w1, j1, v1, i1)) {
    if (!before(v1, i1, w2, j2)) { v1 = w1; i1 = j1; v2 = w2; i2 = j2; return; }
    v2 = v1; i2 = i1; v1 = w1; i1 = j1;
  } else if (before(w1, j1, v2, i2)) {
    v2 = w1; i2 = j1;
  }
}

template <class A> __device__ __forceinline__ void merge2(Cand<A>& a, const Cand<A>& b) {
  merge2(a.v1, a.i1, a.v2, a.i2, b.v1, b.i1, b.v2, b.i2);
}

template <class A> __device__ __forceinline__ A warp_sum(A s) {
  // A butterfly: fp addition is commutative, so every lane ends with the bitwise same total.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  return s;
}

// ------------------------------------------------------------------------------------------------
// Block tiles of the search, per element type: BM rows x BN codes, codebook chunks BK deep. The
// host plans grids and workspace with these; the micro-kernels are built on them.
template <class S> struct Cfg;
template <> struct Cfg<float> { static constexpr int BM = 128, BN = 128, BK = 16; };
template <> struct Cfg<double> { static constexpr int BM = 64, BN = 64, BK = 8; };
template <> struct Cfg<__half> { static constexpr int BM = 128, BN = 128, BK = 32; };
template <> struct Cfg<__nv_bfloat16> { static constexpr int BM = 128, BN = 128, BK = 32; };

// ------------------------------------------------------------------------------------------------
// Forward parameters, shared by the search kernels and the epilogue.
template <class S> struct FwdParams {
  using A = typename Acc<S>::type;
  const S* x;
  int64_t N, D, xS, xsb, xss, xsd;  // rows of x as (B, S, D) views: B only enters via xS
  const S* cb;                      // the codebook as given (K x D, contiguous)
  const S* cbv;                     // the codebook the search streams: rows of Dv, 16-byte aligned
  int64_t Dv;
  int K;
  int Dp;                           // D rounded up to the chunk depth: x rows in shared memory
  const A* norms;                   // ||e_k||^2, K entries
  S* zq;                            // may be null
  int64_t zS, zsb, zss, zsd;
  int64_t* indices;
  A* sqerr;
  unsigned long long* counts;       // may be null
  Cand<A>* part;                    // split > 1: candidates per (split, row)
  int splits, tiles_per_split, ntiles;
  int recheck;                      // re-measure the second candidate exactly (tensor-core path)
};

// Exact sum (x_d - e_d)^2 over one row, by one warp; every lane returns the same value.
template <class S>
__device__ __forceinline__ typename Acc<S>::type warp_sqdist(const S* x, int64_t xsd, const S* e,
                                                             int64_t D, int lane) {
  using A = typename Acc<S>::type;
  A s = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const A t = to_acc(x[d * xsd]) - to_acc(e[d]);
    s = fma(t, t, s);
  }
  return warp_sum(s);
}

// The epilogue of one row, by one warp: the exact error of the candidate(s), the choice (a second
// candidate wins only on a strictly smaller exact error, or an equal one with a lower index), the
// index, error, count, and z_q (the code, or NaN where the error is not finite).
template <class S>
__device__ void finish_row(const FwdParams<S>& p, int64_t n, int64_t xoff, Cand<typename Acc<S>::type> c,
                           int lane) {
  using A = typename Acc<S>::type;
  int i1 = c.i1, i2 = p.recheck ? c.i2 : -1;
  if (i1 < 0 || i1 >= p.K) { i1 = 0; i2 = -1; }  // no finite distance at all: code 0
  if (i2 >= p.K) i2 = -1;
  const S* x = p.x + xoff;
  int k = i1;
  A err = warp_sqdist(x, p.xsd, p.cb + (int64_t)i1 * p.D, p.D, lane);
  if (i2 >= 0) {
    const A e2 = warp_sqdist(x, p.xsd, p.cb + (int64_t)i2 * p.D, p.D, lane);
    if (e2 < err || (e2 == err && i2 < i1)) { k = i2; err = e2; }
  }
  if (lane == 0) {
    p.indices[n] = k;
    p.sqerr[n] = err;
    if (p.counts) atomicAdd(p.counts + k, 1ull);
  }
  if (p.zq) {
    S* z = p.zq + row_offset(n, p.zS, p.zsb, p.zss);
    const S* e = p.cb + (int64_t)k * p.D;
    const bool finite = isfinite(err);
    const S bad = from_acc<S>(nan_of<A>());
    for (int64_t d = lane; d < p.D; d += 32) z[d * p.zsd] = finite ? e[d] : bad;
  }
}

// ------------------------------------------------------------------------------------------------
// Host-side launch helpers implemented per dtype family (forward_simt.cu, forward_mma.cu).
struct DeviceInfo {
  int smem_optin;  // largest dynamic shared memory a block may opt in to
};

template <class S>
void launch_search(const FwdParams<S>& p, int rowblocks, const DeviceInfo& dev, cudaStream_t st);

}  // namespace cu
}  // namespace vqk
