// pybind11 module vqkernels._C. Everything crosses as integers: data pointers, sizes, element
// strides, and (for CUDA) the stream. No torch header is included, so the module builds without
// torch and keeps working across torch upgrades.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "vqk/vqk.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace py = pybind11;
using View = std::array<int64_t, 7>;  // (ptr, B, S, D, sb, ss, sd)

namespace {

vqk::DType to_dtype(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("vqkernels._C: unknown dtype code");
  return static_cast<vqk::DType>(code);
}
vqk::Rows rows(const View& v) {
  return {reinterpret_cast<const void*>(v[0]), v[1], v[2], v[3], v[4], v[5], v[6]};
}
vqk::RowsOut rows_out(const View& v) {
  return {reinterpret_cast<void*>(v[0]), v[1], v[2], v[3], v[4], v[5], v[6]};
}
template <class T> T* ptr(int64_t p) { return reinterpret_cast<T*>(p); }

vqk::ForwardArgs forward_args(int dtype, const View& x, int64_t codebook, int64_t K,
                              const View& zq, int64_t indices, int64_t sqerr, int64_t counts) {
  if (K <= 0) throw std::invalid_argument("vqkernels._C: K must be positive");
  return {to_dtype(dtype), rows(x), ptr<const void>(codebook), K, rows_out(zq),
          ptr<int64_t>(indices), ptr<void>(sqerr), ptr<int64_t>(counts), nullptr, 0, 0};
}

vqk::BackwardArgs backward_args(int dtype, const View& x, int64_t codebook, int64_t K,
                                int64_t indices, const View& grad_zq, int64_t g_codebook,
                                int64_t g_commit, const View& grad_x, int64_t grad_cb) {
  if (K <= 0) throw std::invalid_argument("vqkernels._C: K must be positive");
  return {to_dtype(dtype), rows(x), ptr<const void>(codebook), K, ptr<const int64_t>(indices),
          rows(grad_zq), ptr<const void>(g_codebook), ptr<const void>(g_commit),
          rows_out(grad_x), ptr<void>(grad_cb), nullptr, 0, 0};
}

// Asks Linux to back the whole 2 MiB pages inside [p, p + nbytes) with transparent huge pages
// when they are first touched (MADV_HUGEPAGE; the system's THP mode must be "madvise" or
// "always"). For a fresh output buffer about to be written in full, one fault per 2 MiB replaces
// 512: on this project's VMs, where a first touch costs ~2 us per 4 KiB page, writing a new 64 MiB
// z_q took 32 ms with 4 KiB pages and 6 ms with huge pages. Only whole aligned huge pages inside
// the buffer are advised, so no page outside it changes and no memory is added. Returns whether
// the advice was given (false off Linux, for a range holding no whole huge page, or if refused).
bool advise_hugepages(int64_t p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (p == 0 || nbytes <= 0) return false;
  const uintptr_t lo = (uintptr_t(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (uintptr_t(p) + uintptr_t(nbytes)) & ~(kHuge - 1);
  if (hi <= lo) return false;
  return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)nbytes;
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vqkernels native kernels (CPU, and CUDA when built with nvcc)";

  m.def("cpu_forward",
        [](int dtype, View x, int64_t codebook, int64_t K, View zq, int64_t indices,
           int64_t sqerr, int64_t counts, int num_threads) {
          auto a = forward_args(dtype, x, codebook, K, zq, indices, sqerr, counts);
          py::gil_scoped_release nogil;
          vqk::cpu_forward(a, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("codebook"), py::arg("K"), py::arg("zq"),
        py::arg("indices"), py::arg("sqerr"), py::arg("counts"), py::arg("num_threads"));

  m.def("cpu_backward",
        [](int dtype, View x, int64_t codebook, int64_t K, int64_t indices, View grad_zq,
           int64_t g_codebook, int64_t g_commit, View grad_x, int64_t grad_cb, int num_threads) {
          auto a = backward_args(dtype, x, codebook, K, indices, grad_zq, g_codebook, g_commit,
                                 grad_x, grad_cb);
          py::gil_scoped_release nogil;
          vqk::cpu_backward(a, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("codebook"), py::arg("K"), py::arg("indices"),
        py::arg("grad_zq"), py::arg("g_codebook"), py::arg("g_commit"), py::arg("grad_x"),
        py::arg("grad_cb"), py::arg("num_threads"));

  m.def("cpu_residual_forward",
        [](View x, std::vector<int64_t> codebooks, std::vector<int64_t> Ks, int64_t active,
           int64_t zq, int64_t indices, int64_t sqerr, int num_threads, bool cosine) {
          if (codebooks.size() != Ks.size() || codebooks.empty())
            throw std::invalid_argument("vqkernels._C: one K per codebook, at least one stage");
          std::vector<const float*> cbs;
          for (int64_t p : codebooks) cbs.push_back(ptr<const float>(p));
          vqk::ResidualArgs a{rows(x), (int64_t)cbs.size(), cbs.data(), Ks.data(),
                              ptr<const int64_t>(active), ptr<float>(zq), ptr<int64_t>(indices),
                              ptr<float>(sqerr), cosine ? 1 : 0};
          py::gil_scoped_release nogil;
          vqk::cpu_residual_forward(a, num_threads);
        },
        py::arg("x"), py::arg("codebooks"), py::arg("Ks"), py::arg("active"), py::arg("zq"),
        py::arg("indices"), py::arg("sqerr"), py::arg("num_threads"), py::arg("cosine") = false,
        "Residual VQ forward, fp32: all stages per row tile (see vqk.h, ResidualArgs).");

  m.def("cpu_residual_backward",
        [](int64_t N, int64_t D, int64_t x, std::vector<int64_t> codebooks, std::vector<int64_t> Ks,
           int64_t indices, int64_t grad_zq, int64_t g_codebook, int64_t g_commit, int64_t grad_x,
           std::vector<int64_t> grad_cb, int num_threads, bool cosine) {
          if (codebooks.size() != Ks.size() || codebooks.size() != grad_cb.size() || codebooks.empty())
            throw std::invalid_argument("vqkernels._C: one K and one grad_cb per codebook, at least one stage");
          std::vector<const float*> cbs;
          std::vector<float*> gcbs;
          for (int64_t p : codebooks) cbs.push_back(ptr<const float>(p));
          for (int64_t p : grad_cb) gcbs.push_back(ptr<float>(p));
          vqk::ResidualBackwardArgs a{N, D, (int64_t)cbs.size(), ptr<const float>(x), cbs.data(),
                                      Ks.data(), ptr<const int64_t>(indices), ptr<const float>(grad_zq),
                                      ptr<const float>(g_codebook), ptr<const float>(g_commit),
                                      ptr<float>(grad_x), gcbs.data(), cosine};
          py::gil_scoped_release nogil;
          vqk::cpu_residual_backward(a, num_threads);
        },
        py::arg("N"), py::arg("D"), py::arg("x"), py::arg("codebooks"), py::arg("Ks"),
        py::arg("indices"), py::arg("grad_zq"), py::arg("g_codebook"), py::arg("g_commit"),
        py::arg("grad_x"), py::arg("grad_cb"), py::arg("num_threads"), py::arg("cosine") = false,
        "Residual VQ backward, fp32, contiguous: every stage in one call (see vqk.h, "
        "ResidualBackwardArgs).");

  m.def("cpu_residual_stats",
        [](int64_t N, int64_t D, int64_t x, std::vector<int64_t> codebooks, std::vector<int64_t> Ks,
           int64_t indices, int64_t take, bool cosine, std::vector<int64_t> sums,
           std::vector<int64_t> counts, int num_threads, bool grouped, std::vector<int64_t> cand_rows,
           std::vector<int64_t> cand_n, std::vector<int64_t> cand) {
          if (codebooks.size() != Ks.size() || codebooks.size() != sums.size() ||
              codebooks.size() != counts.size() || codebooks.empty())
            throw std::invalid_argument("vqkernels._C: one K, one sums and one counts per codebook, at least one stage");
          std::vector<const float*> cbs;
          std::vector<float*> sp;
          std::vector<int64_t*> cp;
          for (int64_t p : codebooks) cbs.push_back(ptr<const float>(p));
          for (int64_t p : sums) sp.push_back(ptr<float>(p));
          for (int64_t p : counts) cp.push_back(ptr<int64_t>(p));
          const bool with_cands = !cand_rows.empty();
          if (with_cands && (cand_rows.size() != Ks.size() || cand_n.size() != Ks.size() ||
                             cand.size() != Ks.size()))
            throw std::invalid_argument("vqkernels._C: cand_rows, cand_n and cand: one per codebook, or none");
          std::vector<const int64_t*> crp;
          std::vector<float*> cdp;
          for (int64_t p : cand_rows) crp.push_back(ptr<const int64_t>(p));
          for (int64_t p : cand) cdp.push_back(ptr<float>(p));
          vqk::ResidualStatsArgs a{N, D, (int64_t)cbs.size(), ptr<const float>(x), cbs.data(), Ks.data(),
                                   ptr<const int64_t>(indices), ptr<const bool>(take), cosine, sp.data(),
                                   cp.data(), grouped, with_cands ? crp.data() : nullptr,
                                   with_cands ? cand_n.data() : nullptr, with_cands ? cdp.data() : nullptr};
          py::gil_scoped_release nogil;
          vqk::cpu_residual_stats(a, num_threads);
        },
        py::arg("N"), py::arg("D"), py::arg("x"), py::arg("codebooks"), py::arg("Ks"),
        py::arg("indices"), py::arg("take"), py::arg("cosine"), py::arg("sums"), py::arg("counts"),
        py::arg("num_threads"), py::arg("grouped") = false,
        py::arg("cand_rows") = std::vector<int64_t>{}, py::arg("cand_n") = std::vector<int64_t>{},
        py::arg("cand") = std::vector<int64_t>{},
        "Residual VQ codebook statistics, fp32: every stage's counts and index_add_ sums of its "
        "inputs in one call, and optionally its restart candidates' rows (see vqk.h, "
        "ResidualStatsArgs).");

  m.def("cpu_grouped_forward",
        [](View x, std::vector<int64_t> codebooks, std::vector<int64_t> Ks, View zq,
           int64_t indices, int64_t sqerr, int num_threads, int64_t counts) {
          if (codebooks.size() != Ks.size() || codebooks.empty())
            throw std::invalid_argument("vqkernels._C: one K per codebook, at least one group");
          std::vector<const float*> cbs;
          for (int64_t p : codebooks) cbs.push_back(ptr<const float>(p));
          vqk::GroupedArgs a{rows(x), (int64_t)cbs.size(), cbs.data(), Ks.data(), rows_out(zq),
                             ptr<int64_t>(indices), ptr<float>(sqerr), ptr<int64_t>(counts)};
          py::gil_scoped_release nogil;
          vqk::cpu_grouped_forward(a, num_threads);
        },
        py::arg("x"), py::arg("codebooks"), py::arg("Ks"), py::arg("zq"), py::arg("indices"),
        py::arg("sqerr"), py::arg("num_threads"), py::arg("counts") = 0,
        "Grouped VQ forward, fp32: every group's own codebook in one call (see vqk.h, "
        "GroupedArgs).");

  m.def("cpu_grouped_backward",
        [](int dtype, View x, std::vector<int64_t> codebooks, std::vector<int64_t> Ks,
           int64_t indices, View grad_zq, int64_t g_codebook, int64_t gcb_sn, int64_t gcb_sg,
           int64_t g_commit, int64_t gcm_sn, int64_t gcm_sg, View grad_x,
           std::vector<int64_t> grad_cb, int num_threads) {
          if (codebooks.size() != Ks.size() || codebooks.size() != grad_cb.size() || codebooks.empty())
            throw std::invalid_argument("vqkernels._C: one K and one grad_cb per codebook, at least one group");
          std::vector<const void*> cbs;
          std::vector<void*> gcbs;
          for (int64_t p : codebooks) cbs.push_back(ptr<const void>(p));
          for (int64_t p : grad_cb) gcbs.push_back(ptr<void>(p));
          vqk::GroupedBackwardArgs a{to_dtype(dtype), rows(x), (int64_t)cbs.size(), cbs.data(),
                                     Ks.data(), ptr<const int64_t>(indices), rows(grad_zq),
                                     ptr<const void>(g_codebook), gcb_sn, gcb_sg,
                                     ptr<const void>(g_commit), gcm_sn, gcm_sg, rows_out(grad_x),
                                     gcbs.data()};
          py::gil_scoped_release nogil;
          vqk::cpu_grouped_backward(a, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("codebooks"), py::arg("Ks"), py::arg("indices"),
        py::arg("grad_zq"), py::arg("g_codebook"), py::arg("gcb_sn"), py::arg("gcb_sg"),
        py::arg("g_commit"), py::arg("gcm_sn"), py::arg("gcm_sg"), py::arg("grad_x"),
        py::arg("grad_cb"), py::arg("num_threads"),
        "Grouped VQ backward: every group's cpu_backward in one call (see vqk.h, "
        "GroupedBackwardArgs).");

  m.def("advise_hugepages", &advise_hugepages, py::arg("ptr"), py::arg("nbytes"),
        "MADV_HUGEPAGE on the whole 2 MiB pages inside a fresh buffer (Linux; else False)");
  m.def("cpu_isa", [] { return std::string(vqk::cpu_isa()); },
        "The CPU search kernels a large search uses: 'avx512bf16', 'avx512', 'avx512_i16', "
        "'avx512_vnni_i16', 'avx512_vnni_i8', 'avx2_i16', 'avx2_i8', 'avx2', 'neon' or 'neon_dot' "
        "(aarch64) or 'scalar' (VQK_CPU_ISA=auto|avx512bf16|avx512|avx512_i16|avx512_vnni_i16|"
        "avx512_vnni_i8|avx2|avx2_i16|avx2_i8|neon|neon_dot|scalar forces one).");
  m.def("cpu_use_openmp",
        [](const std::string& path, bool fall_back) {
          return vqk::cpu_use_openmp(path.c_str(), fall_back);
        },
        py::arg("path"), py::arg("fall_back") = false,
        "Run the CPU kernels' parallel regions on the OpenMP runtime already loaded from `path` "
        "(torch's; '' goes back to the own pool). fall_back: the own pool for a while after a late "
        "team (see vqk.h). Returns whether it was found.");
  m.def("cpu_pool", [] { return std::string(vqk::cpu_pool()); },
        "'own' (the module's thread pool), 'own (falling back)' or the path of the OpenMP runtime "
        "in use.");
  m.def("cpu_exact_rows", &vqk::cpu_exact_rows,
        "Rows the CPU forward has searched again exactly (the fast pass could not prove their "
        "nearest code) since the module loaded, over all calls.");
  m.def("cpu_set_aside_rows", &vqk::cpu_set_aside_rows,
        "Rows a reduced-precision first pass (avx512bf16, avx2_i16) could not prove and handed to "
        "the fp32 search, since the module loaded, over all calls.");
  m.def("cpu_int8_rows", &vqk::cpu_int8_rows,
        "Rows the int8 tier (avx2_i8, avx512_vnni_i8) proved from int8 dot products and finished "
        "itself (the others go to the int16 pass), since the module loaded, over all calls.");

#ifdef VQK_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = VQK_CUDA_ARCHS_STR;
  // Temporary device memory is the caller's: ask *_workspace_bytes, allocate, pass it in.
  m.def("cuda_forward_workspace_bytes",
        [](int dtype, int64_t N, int64_t K, int64_t D, int64_t codebook) {
          return vqk::cuda_forward_workspace_bytes(to_dtype(dtype), N, K, D,
                                                   static_cast<std::uintptr_t>(codebook));
        },
        py::arg("dtype"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("codebook"));
  m.def("cuda_backward_workspace_bytes",
        [](int dtype, int64_t N, int64_t K, int64_t D, bool deterministic) {
          return vqk::cuda_backward_workspace_bytes(to_dtype(dtype), N, K, D, deterministic);
        },
        py::arg("dtype"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("deterministic"));
  m.def("cuda_forward",
        [](int dtype, View x, int64_t codebook, int64_t K, View zq, int64_t indices,
           int64_t sqerr, int64_t counts, int64_t workspace, int64_t workspace_bytes,
           uint64_t stream) {
          auto a = forward_args(dtype, x, codebook, K, zq, indices, sqerr, counts);
          a.workspace = ptr<void>(workspace);
          a.workspace_bytes = workspace_bytes;
          py::gil_scoped_release nogil;
          vqk::cuda_forward(a, stream);
        },
        py::arg("dtype"), py::arg("x"), py::arg("codebook"), py::arg("K"), py::arg("zq"),
        py::arg("indices"), py::arg("sqerr"), py::arg("counts"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"));
  m.def("cuda_backward",
        [](int dtype, View x, int64_t codebook, int64_t K, int64_t indices, View grad_zq,
           int64_t g_codebook, int64_t g_commit, View grad_x, int64_t grad_cb, int64_t workspace,
           int64_t workspace_bytes, bool deterministic, uint64_t stream) {
          auto a = backward_args(dtype, x, codebook, K, indices, grad_zq, g_codebook, g_commit,
                                 grad_x, grad_cb);
          a.workspace = ptr<void>(workspace);
          a.workspace_bytes = workspace_bytes;
          a.deterministic = deterministic ? 1 : 0;
          py::gil_scoped_release nogil;
          vqk::cuda_backward(a, stream);
        },
        py::arg("dtype"), py::arg("x"), py::arg("codebook"), py::arg("K"), py::arg("indices"),
        py::arg("grad_zq"), py::arg("g_codebook"), py::arg("g_commit"), py::arg("grad_x"),
        py::arg("grad_cb"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("deterministic"), py::arg("stream"));
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
