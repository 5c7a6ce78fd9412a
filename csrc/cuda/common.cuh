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
// threadIdx.x read afresh: the compiler may not reuse an earlier read, so values derived from
// it need not stay live in registers across a loop (the search epilogue, forward_mma.cu).
__device__ __forceinline__ int thread_x_fresh() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
}
#else
inline int thread_x_fresh() { return (int)threadIdx.x; }
#endif  // VQK_CUDA_EMULATE

// ------------------------------------------------------------------------------------------------
// The fast pass's state per row (issue 13): the best approximate value v1 = min_k a_k, its code
// i1 (lowest index on ties), and the SECOND best value v2 over all other codes (a duplicate of the
// best gives v2 == v1). a_k = ||e_k||^2 - 2 x.e_k as the kernel rounds it. Empty: (+inf, +inf,
// -1); a value is only ever inserted when it is strictly below v2, so +inf and NaN never enter.
template <class A> struct Cand {
  A v1, v2;
  int i1;
};

template <class A> __device__ __forceinline__ bool before(A va, int ia, A vb, int ib) {
  return va < vb || (va == vb && ia < ib);
}

// (v1, i1, v2) <- the best and second best values of both (w2 is the other's second value).
template <class A>
__device__ __forceinline__ void merge2(A& v1, int& i1, A& v2, A w1, int j1, A w2) {
  if (before(w1, j1, v1, i1)) {
    v2 = v1 < w2 ? v1 : w2;
    v1 = w1;
    i1 = j1;
  } else if (w1 < v2) {
    v2 = w1;
  }
}

template <class A> __device__ __forceinline__ void merge2(Cand<A>& a, const Cand<A>& b) {
  merge2(a.v1, a.i1, a.v2, b.v1, b.i1, b.v2);
}

// One more value of code k into a running (v1, i1, v2), codes arriving in increasing order (an
// equal value never displaces the earlier code).
template <class A> __device__ __forceinline__ void insert2(A& v1, int& i1, A& v2, A d, int k) {
  if (d < v2) {  // rare once the scan is under way: most values skip straight past
    if (d < v1) {
      v2 = v1;
      v1 = d;
      i1 = k;
    } else {
      v2 = d;
    }
  }
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
  bool xvec;                        // xsd == 1 and every row starts 16-byte aligned: cp.async x
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
  // Bits of two doubles (norms_kernel): [0] >= max ||e_k||^2 over the codes with only finite
  // entries, [1] max |e_d| over the finite entries.
  const unsigned long long* cbstat;
};

// ------------------------------------------------------------------------------------------------
// The rounding bound of the fast pass (issue 13).
//
// The fast pass ranks codes by a_k = fl(||e_k||^2 - 2 x.e_k). Let t_k be that value in exact
// arithmetic, so d_k = ||x||^2 + t_k, and let E >= max_k ||e_k|| (codes with finite entries),
// X >= ||x||. If |a_k - t_k| <= B for every k, a row with v2 - v1 > 2B has a provable answer: for
// any k != i1, t_k >= a_k - B >= v2 - B > v1 + B >= t_i1, so d_k > d_i1. Otherwise (the row is
// "flagged") the nearest code k* has t_k* <= t_i1 <= v1 + B, so a_k* <= v1 + 2B: the exact
// re-search only needs the codes whose approximate value is <= v1 + 2B, and since B bounds ANY
// evaluation with the error model below, it may re-evaluate a_k in its own order.
//
// u = unit roundoff of the accumulation (2^-24 fp32, 2^-53 fp64), gamma_n = n u / (1 - n u).
// * SIMT (FFMA / DFMA chains, fp32 / fp64): x.e is a chain of D fused multiply-adds (padding adds
//   exact zeros), |fl(x.e) - x.e| <= gamma_D sum|x_d e_d| <= gamma_D X E. ||e||^2 (norms_kernel:
//   a double sum, then rounded to the accumulation type) is within (u + gamma_{D+5}(2^-53)) E^2
//   (u alone for fp64 is not enough: there it is gamma_{D+5} E^2, chains of depth <= D + 5). The
//   last fma(-2, acc, nrm) rounds once more: u (E^2 + 2 X E)(1 + ...). Total, generously:
//     B_rel = (2D + 8) u (E^2 + 2 X E) * 1.01.
// * Tensor cores (mma.sync m16n8k16, bf16/fp16 products, fp32 accumulation): products of 16-bit
//   floats are exact in fp32, but the hardware adds the 16 products of a k-step and the running
//   accumulator with alignment to the largest term and truncation, not round-to-nearest (measured
//   behaviour on V100..H100; not specified by NVIDIA). Model each instruction as adding 17 terms
//   with every term but the largest truncated by < 1 ulp of the largest (2^-23 relative) and the
//   result rounded once more: error <= 17 * 2^-23 * (|c| + sum|p|) per k-step. Over the Dp / 16
//   <= (D + 31) / 16 chained steps (|c| <= the sum of all earlier |p|) the dot's error is at most
//   17 * 2^-23 * (D + 31) / 16 * X E ~= 2.1 (D + 31) u X E, i.e. ~4.3 (D + 31) u X E for 2 x.e.
//   With the fp32 norm and the final fma that is ~5.3 D + 140 units; we take three times that,
//     B_rel = 16 (D + 32) u (E^2 + 2 X E) * 1.01,
//   which also covers the exact re-search's own fp32 FFMA chain (the SIMT bound above).
// * Underflow: with gradual underflow every operation adds at most half the smallest subnormal;
//   flush-to-zero (inputs or results below 2^-126 read or written as 0) costs at most 2^-126 per
//   sum and 2^-126 max(|x_d|, |e_d|) per product (MMA units may flush subnormal operands). So
//     B_abs = (4D + 8) tiny (1 + E + X),  tiny = 2^-120 (fp32 accumulation) or 2^-1000 (fp64),
//   far above both. B = B_rel + B_abs.
// * Range: the bound needs every quantity of the fast pass finite. With E^2 < LE and X E < LX
//   (2^120 and 2^100 for fp32 accumulation, 2^1000 both for fp64) every ||e||^2, partial dot and
//   a_k is below the overflow threshold (|a_k| <= E^2 + 2 X E < 2^122, or < 2^1002). Rows beyond
//   that, and rows with a non-finite ||x||^2 or v1, are flagged with no threshold (the re-search
//   measures every code). (The contract's X E < 2^60 is stricter than needed; the wider limit
//   only lets the fast pass decide more rows of large-magnitude data, each still proven.) Rows
//   whose fp32 error of the candidate is not finite are flagged too, with the threshold: their
//   answer and error come from the float64 re-search, and z_q is not NaN'ed by an fp32 overflow.
// E and X are computed in double from the inputs and rounded up (norms_kernel, finish_row), so
// they are upper bounds: a double sum of D squares is within gamma_{D+5} (53-bit u), plus D
// halves of the smallest subnormal if squares underflow (fp64 inputs only).
template <class S> struct Bound {
  static constexpr double u = 0x1p-24, tiny = 0x1p-120, lim_e2 = 0x1p120, lim_xe = 0x1p100;
  __device__ static double rel(int64_t D) { return 2.0 * (double)D + 8.0; }
};
template <> struct Bound<double> {
  static constexpr double u = 0x1p-53, tiny = 0x1p-1000, lim_e2 = 0x1p1000, lim_xe = 0x1p1000;
  __device__ static double rel(int64_t D) { return 2.0 * (double)D + 8.0; }
};
template <> struct Bound<__half> {
  static constexpr double u = 0x1p-24, tiny = 0x1p-120, lim_e2 = 0x1p120, lim_xe = 0x1p100;
  __device__ static double rel(int64_t D) { return 16.0 * ((double)D + 32.0); }
};
template <> struct Bound<__nv_bfloat16> : Bound<__half> {};

// An upper bound on sqrt(s) for a double sum s of D squares (see above), +inf stays +inf.
__device__ __forceinline__ double sum_sq_up(double s, int64_t D) {
  return s * (1.0 + ((double)D + 40.0) * 0x1p-52) + ((double)D + 40.0) * 0x1p-1074;
}
__device__ __forceinline__ double sqrt_up(double s) { return sqrt(s) * (1.0 + 0x1p-50); }

// The epilogue of one row, by one warp. It measures the candidate i1 exactly (in the
// accumulation type: the fp32 error of the fast paths) and ||x||^2 (in double, for the bound),
// then either finishes the row -- index i1, its error, count, z_q -- or flags it for the exact
// re-search (research_kernel): indices[n] = -1 and sqerr[n] = the threshold v1 + 2B (+inf: every
// code), which the re-search reads and then overwrites.
template <class S>
__device__ void finish_row(const FwdParams<S>& p, int64_t n, int64_t xoff, Cand<typename Acc<S>::type> c,
                           int lane) {
  using A = typename Acc<S>::type;
  using Bd = Bound<S>;
  const int i1 = (c.i1 < 0 || c.i1 >= p.K) ? 0 : c.i1;  // no finite value at all: flagged below
  const S* x = p.x + xoff;
  const S* e = p.cb + (int64_t)i1 * p.D;
  A err = 0;
  double xx = 0;
  for (int64_t d = lane; d < p.D; d += 32) {
    const A xv = to_acc(x[d * p.xsd]);
    const A t = xv - to_acc(e[d]);
    err = fma(t, t, err);
    xx = fma((double)xv, (double)xv, xx);
  }
  err = warp_sum(err);
  xx = warp_sum(xx);

  const double E2 = __longlong_as_double((long long)p.cbstat[0]);
  const double E = sqrt_up(E2), X = sqrt_up(sum_sq_up(xx, p.D));
  const double v1 = (double)c.v1, v2 = (double)c.v2;
  const double B = Bd::rel(p.D) * Bd::u * (E2 + 2.0 * X * E) * 1.01 +
                   (4.0 * (double)p.D + 8.0) * Bd::tiny * (1.0 + E + X);
  // Ordered compares: a NaN anywhere flags the row.
  const bool in_range = v1 < INFINITY && v1 > -INFINITY && E2 < Bd::lim_e2 &&
                        X * E < Bd::lim_xe && xx < INFINITY;
  bool flagged = !(in_range && v2 - v1 > 2.02 * B && isfinite(err));
#ifdef VQK_CUDA_EMULATE
  if (flagged && lane == 0) ++vqk_emu_flagged_rows;
  if (emu::no_research()) flagged = false;
#endif
  if (flagged) {
    // v1 + 2B, with room for this sum's own rounding and the cast (0.5 B covers both).
    if (lane == 0) {
      p.indices[n] = -1;
      p.sqerr[n] = in_range ? (A)(v1 + 2.5 * B) : inf_of<A>();
    }
    return;
  }
  if (lane == 0) {
    p.indices[n] = i1;
    p.sqerr[n] = err;
    if (p.counts) atomicAdd(p.counts + i1, 1ull);
  }
  if (p.zq) {
    S* z = p.zq + row_offset(n, p.zS, p.zsb, p.zss);
    const bool finite = isfinite(err);  // always, but for the emulator's no-research mode
    const S bad = from_acc<S>(nan_of<A>());
    for (int64_t d = lane; d < p.D; d += 32) z[d * p.zsd] = finite ? e[d] : bad;
  }
}

// ------------------------------------------------------------------------------------------------
// Host-side launch helpers implemented per dtype family (forward_simt.cu, forward_mma.cu).
struct DeviceInfo {
  int smem_optin;  // largest dynamic shared memory a block may opt in to
  int device;      // its index
};

template <class S>
void launch_search(const FwdParams<S>& p, int rowblocks, const DeviceInfo& dev, cudaStream_t st);

}  // namespace cu
}  // namespace vqk
