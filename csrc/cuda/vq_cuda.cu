// CUDA nearest-code search and VQ backward: a plain, correct implementation (one thread per row).
// It proves the CUDA side of the build and gives the cuda backend real semantics; the tiled
// tensor-core kernels replace it in their own change.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "vqk/vqk.h"

namespace vqk {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("vqkernels CUDA error in ") + what + ": " +
                             cudaGetErrorString(e));
}

template <class S> struct Elt;
template <> struct Elt<float> { using acc = float;
  __device__ static float load(const float* p) { return *p; }
  __device__ static void put(float* p, float v) { *p = v; } };
template <> struct Elt<double> { using acc = double;
  __device__ static double load(const double* p) { return *p; }
  __device__ static void put(double* p, double v) { *p = v; } };
template <> struct Elt<__half> { using acc = float;
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void put(__half* p, float v) { *p = __float2half_rn(v); } };
template <> struct Elt<__nv_bfloat16> { using acc = float;
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); } };

__device__ __forceinline__ int64_t row_offset(int64_t n, int64_t S, int64_t sb, int64_t ss) {
  const int64_t b = n / S;
  return b * sb + (n - b * S) * ss;
}

template <class S>
__global__ void forward_kernel(ForwardArgs a) {
  using E = Elt<S>;
  using A = typename E::acc;
  const int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t N = a.x.B * a.x.S, D = a.x.D;
  if (n >= N) return;
  const S* x = static_cast<const S*>(a.x.ptr) + row_offset(n, a.x.S, a.x.sb, a.x.ss);
  const S* cb = static_cast<const S*>(a.codebook);
  A best = INFINITY;
  int64_t arg = 0;
  for (int64_t k = 0; k < a.K; ++k) {
    A dot = 0, nrm = 0;
    for (int64_t d = 0; d < D; ++d) {
      const A e = E::load(cb + k * D + d);
      dot += E::load(x + d * a.x.sd) * e;
      nrm += e * e;
    }
    const A dist = nrm - 2 * dot;
    if (dist < best) { best = dist; arg = k; }  // strict: ties keep the lowest index
  }
  A err = 0;
  for (int64_t d = 0; d < D; ++d) {
    const A t = E::load(x + d * a.x.sd) - E::load(cb + arg * D + d);
    err += t * t;
  }
  a.indices[n] = arg;
  static_cast<A*>(a.sqerr)[n] = err;
  if (a.counts) atomicAdd(reinterpret_cast<unsigned long long*>(a.counts + arg), 1ull);
  if (a.zq.ptr) {
    S* zq = static_cast<S*>(a.zq.ptr) + row_offset(n, a.zq.S, a.zq.sb, a.zq.ss);
    const bool finite = isfinite(err);
    for (int64_t d = 0; d < D; ++d)
      E::put(zq + d * a.zq.sd, finite ? E::load(cb + arg * D + d) : A(NAN));
  }
}

template <class S>
__global__ void backward_kernel(BackwardArgs a) {
  using E = Elt<S>;
  using A = typename E::acc;
  const int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t N = a.x.B * a.x.S, D = a.x.D;
  if (n >= N) return;
  const S* x = static_cast<const S*>(a.x.ptr) + row_offset(n, a.x.S, a.x.sb, a.x.ss);
  const int64_t k = a.indices[n];
  const S* e = static_cast<const S*>(a.codebook) + k * D;
  const A wc = a.g_commit ? 2 * static_cast<const A*>(a.g_commit)[n] : A(0);
  const A wb = a.g_codebook ? 2 * static_cast<const A*>(a.g_codebook)[n] : A(0);
  const S* gzq = a.grad_zq.ptr
      ? static_cast<const S*>(a.grad_zq.ptr) + row_offset(n, a.grad_zq.S, a.grad_zq.sb, a.grad_zq.ss)
      : nullptr;
  S* gx = a.grad_x.ptr
      ? static_cast<S*>(a.grad_x.ptr) + row_offset(n, a.grad_x.S, a.grad_x.sb, a.grad_x.ss)
      : nullptr;
  A* gcb = static_cast<A*>(a.grad_cb);
  for (int64_t d = 0; d < D; ++d) {
    const A diff = E::load(x + d * a.x.sd) - E::load(e + d);
    if (gx) E::put(gx + d * a.grad_x.sd, (gzq ? E::load(gzq + d * a.grad_zq.sd) : A(0)) + wc * diff);
    if (gcb && wb != 0) atomicAdd(gcb + k * D + d, -wb * diff);
  }
}

template <class S>
void launch_forward(const ForwardArgs& a, cudaStream_t st) {
  const int64_t N = a.x.n();
  if (a.counts) check(cudaMemsetAsync(a.counts, 0, a.K * sizeof(int64_t), st), "memset(counts)");
  if (N == 0) return;
  const int threads = 128;
  forward_kernel<S><<<(unsigned)((N + threads - 1) / threads), threads, 0, st>>>(a);
  check(cudaGetLastError(), "forward launch");
}

template <class S>
void launch_backward(const BackwardArgs& a, cudaStream_t st) {
  const int64_t N = a.x.n();
  const size_t acc = sizeof(typename Elt<S>::acc);
  if (a.grad_cb) check(cudaMemsetAsync(a.grad_cb, 0, a.K * a.x.D * acc, st), "memset(grad_cb)");
  if (N == 0) return;
  const int threads = 128;
  backward_kernel<S><<<(unsigned)((N + threads - 1) / threads), threads, 0, st>>>(a);
  check(cudaGetLastError(), "backward launch");
}

}  // namespace

void cuda_forward(const ForwardArgs& a, std::uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::f32: return launch_forward<float>(a, st);
    case DType::f64: return launch_forward<double>(a, st);
    case DType::f16: return launch_forward<__half>(a, st);
    case DType::bf16: return launch_forward<__nv_bfloat16>(a, st);
  }
}

void cuda_backward(const BackwardArgs& a, std::uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::f32: return launch_backward<float>(a, st);
    case DType::f64: return launch_backward<double>(a, st);
    case DType::f16: return launch_backward<__half>(a, st);
    case DType::bf16: return launch_backward<__nv_bfloat16>(a, st);
  }
}

}  // namespace vqk
