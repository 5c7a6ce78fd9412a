// CPU nearest-code search and VQ backward: a plain, correct implementation.
//
// Distances use the FAISS form ||e||^2 - 2 x.e (||x||^2 is the same for every code of a row, so
// it is left out of the argmin) accumulated in fp32 (fp64 for f64 input). The chosen code's error
// is then recomputed exactly as sum (x - e)^2, because the expanded form cancels badly when x is
// close to e, and the losses are built from that exact error.
#include <cmath>
#include <limits>
#include <vector>

#include "vqk/common.h"
#include "vqk/vqk.h"

namespace vqk {
namespace {

template <class T>
void forward_impl(const ForwardArgs& a, int num_threads) {
  using S = typename T::store;
  using A = typename T::acc;
  const int64_t N = a.x.n(), D = a.x.D, K = a.K;
  const S* xp = static_cast<const S*>(a.x.ptr);
  const S* cb = static_cast<const S*>(a.codebook);
  S* zq = static_cast<S*>(a.zq.ptr);
  A* sqerr = static_cast<A*>(a.sqerr);

  // Codes converted once to the accumulation type, with their squared norms.
  std::vector<A> code(K * D), cnorm(K);
  parallel_for(K, 64, num_threads, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      A s = 0;
      for (int64_t d = 0; d < D; ++d) {
        const A v = T::load(cb + k * D + d);
        code[k * D + d] = v;
        s += v * v;
      }
      cnorm[k] = s;
    }
  });

  parallel_for(N, 16, num_threads, [&](int64_t lo, int64_t hi) {
    std::vector<A> row(D);
    for (int64_t n = lo; n < hi; ++n) {
      for (int64_t d = 0; d < D; ++d) row[d] = T::load(xp + a.x.offset(n, d));
      A best = std::numeric_limits<A>::infinity();
      int64_t arg = 0;
      for (int64_t k = 0; k < K; ++k) {
        const A* e = &code[k * D];
        A dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += row[d] * e[d];
        const A dist = cnorm[k] - 2 * dot;
        if (dist < best) { best = dist; arg = k; }  // strict: ties keep the lowest index
      }
      const A* e = &code[arg * D];
      A err = 0;
      for (int64_t d = 0; d < D; ++d) { const A t = row[d] - e[d]; err += t * t; }
      a.indices[n] = arg;
      sqerr[n] = err;
      if (zq) {
        const bool finite = std::isfinite(err);
        for (int64_t d = 0; d < D; ++d)
          T::put(zq + a.zq.offset(n, d), finite ? e[d] : std::numeric_limits<A>::quiet_NaN());
      }
    }
  });

  if (a.counts) {
    std::fill(a.counts, a.counts + K, int64_t(0));
    for (int64_t n = 0; n < N; ++n) ++a.counts[a.indices[n]];
  }
}

template <class T>
void backward_impl(const BackwardArgs& a, int num_threads) {
  using S = typename T::store;
  using A = typename T::acc;
  const int64_t N = a.x.n(), D = a.x.D, K = a.K;
  const S* xp = static_cast<const S*>(a.x.ptr);
  const S* cb = static_cast<const S*>(a.codebook);
  const S* gzq = static_cast<const S*>(a.grad_zq.ptr);
  const A* gcb = static_cast<const A*>(a.g_codebook);
  const A* gcm = static_cast<const A*>(a.g_commit);

  if (a.grad_x.ptr) {
    S* gx = static_cast<S*>(a.grad_x.ptr);
    parallel_for(N, 64, num_threads, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const S* e = cb + a.indices[n] * D;
        const A w = gcm ? 2 * gcm[n] : A(0);
        for (int64_t d = 0; d < D; ++d) {
          A g = gzq ? T::load(gzq + a.grad_zq.offset(n, d)) : A(0);
          if (w != 0) g += w * (T::load(xp + a.x.offset(n, d)) - T::load(e + d));
          T::put(gx + a.grad_x.offset(n, d), g);
        }
      }
    });
  }

  if (a.grad_cb) {
    // Deterministic scatter-add: a counting sort groups rows by code (stable, so each code's rows
    // stay in ascending order), then every code sums its own rows. The result is bitwise the same
    // for any thread count, and no atomics are needed.
    A* g = static_cast<A*>(a.grad_cb);
    std::vector<int64_t> start(K + 1, 0), order(N);
    for (int64_t n = 0; n < N; ++n) ++start[a.indices[n] + 1];
    for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t n = 0; n < N; ++n) order[fill[a.indices[n]]++] = n;
    }
    parallel_for(K, 16, num_threads, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        A* gk = g + k * D;
        std::fill(gk, gk + D, A(0));
        if (!gcb) continue;
        for (int64_t i = start[k]; i < start[k + 1]; ++i) {
          const int64_t n = order[i];
          const A w = 2 * gcb[n];
          for (int64_t d = 0; d < D; ++d)
            gk[d] += w * (T::load(cb + k * D + d) - T::load(xp + a.x.offset(n, d)));
        }
      }
    });
  }
}

}  // namespace

void cpu_forward(const ForwardArgs& a, int num_threads) {
  switch (a.dtype) {
    case DType::f32: return forward_impl<F32>(a, num_threads);
    case DType::f64: return forward_impl<F64>(a, num_threads);
    case DType::f16: return forward_impl<F16>(a, num_threads);
    case DType::bf16: return forward_impl<BF16>(a, num_threads);
  }
}

void cpu_backward(const BackwardArgs& a, int num_threads) {
  switch (a.dtype) {
    case DType::f32: return backward_impl<F32>(a, num_threads);
    case DType::f64: return backward_impl<F64>(a, num_threads);
    case DType::f16: return backward_impl<F16>(a, num_threads);
    case DType::bf16: return backward_impl<BF16>(a, num_threads);
  }
}

}  // namespace vqk
