// Declarations shared by the native kernels. Plain C++ types only: no torch headers, so the module
// builds without torch (pip's isolated build) and never breaks on a torch upgrade.
#pragma once
#include <cstdint>

namespace vqk {

// Element type of z / codebook / z_q. Accumulation is fp32 for f32/f16/bf16 and fp64 for f64.
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Rows of a tensor seen as (B, S, D) with element strides. Row n = b * S + s. This covers a
// row-major (N, D) matrix (B = 1) and a channel-first (B, D, H, W) map (S = H*W, sd = H*W) without
// a copy. All sizes and strides are 64-bit: N = B*S may exceed 2^31.
struct Rows {
  const void* ptr;
  int64_t B, S, D;
  int64_t sb, ss, sd;
  int64_t n() const { return B * S; }
  int64_t offset(int64_t row, int64_t d) const {
    const int64_t b = S ? row / S : 0, s = S ? row - b * S : 0;
    return b * sb + s * ss + d * sd;
  }
};

struct RowsOut {
  void* ptr;
  int64_t B, S, D;
  int64_t sb, ss, sd;
  int64_t offset(int64_t row, int64_t d) const {
    const int64_t b = S ? row / S : 0, s = S ? row - b * S : 0;
    return b * sb + s * ss + d * sd;
  }
};

// Forward: for every row x of `x`, the nearest code e_k of `codebook` (K x D, row-major,
// contiguous) in squared L2, ties to the lowest index. Writes:
//   indices[n]  int64, the chosen code (a row whose distances are all NaN gets 0);
//   sqerr[n]    exact sum_d (x_d - e_d)^2 of the chosen code (float, or double for f64);
//   zq          (optional, ptr may be null) the chosen code; NaN where sqerr is not finite;
//   counts[k]   (optional, may be null) how many rows chose code k (int64, zeroed by the callee).
struct ForwardArgs {
  DType dtype;
  Rows x;
  const void* codebook;
  int64_t K;
  RowsOut zq;
  int64_t* indices;
  void* sqerr;
  int64_t* counts;
  // Temporary device memory owned by the caller (CUDA: sized by cuda_forward_workspace_bytes);
  // kernels that need none ignore these. The forward is deterministic in every mode.
  void* workspace;
  int64_t workspace_bytes;
  int deterministic;
};

// Backward (z_q is a straight-through copy of x; the two error terms are routed separately):
//   grad_x[n]   = grad_zq[n] + 2 * g_commit[n] * (x[n] - e[idx[n]])
//   grad_cb[k] += 2 * g_codebook[n] * (e[k] - x[n])     for every n with idx[n] = k
// grad_zq may be null (treated as zero); g_commit / g_codebook are per-row weights in the
// accumulation type (float, or double for f64) and may be null (zero). grad_cb is K x D in the
// accumulation type, contiguous, and is overwritten (zeroed by the callee).
struct BackwardArgs {
  DType dtype;
  Rows x;
  const void* codebook;
  int64_t K;
  const int64_t* indices;
  Rows grad_zq;          // ptr may be null
  const void* g_codebook;  // may be null
  const void* g_commit;    // may be null
  RowsOut grad_x;        // ptr may be null (grad of x not needed)
  void* grad_cb;         // may be null (grad of the codebook not needed)
  // Temporary device memory owned by the caller (CUDA: sized by cuda_backward_workspace_bytes),
  // and whether grad_cb must be bitwise repeatable (CUDA: sorted segment sums instead of atomics).
  // Kernels that are deterministic anyway and need no workspace ignore these.
  void* workspace;
  int64_t workspace_bytes;
  int deterministic;
};

// Residual VQ forward (issue 17), fp32 rows: S stages, stage s searching codebooks[s] (Ks[s] x D,
// row-major, contiguous fp32) for the residual r_s = fl32(r_{s-1} - e_{s-1}), r_0 = x. Every
// stage's index is the exact nearest code of its residual (ForwardArgs' rule). Writes:
//   indices[s * N + n]  int64 (-1 where row n sits stage s out: s >= active[n]);
//   sqerr[s * N + n]    float, the exact error of stage s (0 where it sits out);
//   zq                  (may be null) N x D row-major floats: fl32 sum of the chosen codes in stage
//                       order, NaN from a stage whose exact error is not finite.
// active (may be null: all stages) is int64 per row.
struct ResidualArgs {
  Rows x;
  int64_t S;
  const float* const* codebooks;
  const int64_t* Ks;
  const int64_t* active;
  float* zq;
  int64_t* indices;
  float* sqerr;
  // Cosine (nonzero): stage s searches the unit rows u_s = r_s / max(fl32(||r_s||), 1e-12)
  // (||.|| summed in float64 in d order) against codebooks the caller normalised; sqerr is
  // ||u_s - e||^2 and r_{s+1} = fl32(r_s - e_s).
  int cosine = 0;
};

// Grouped VQ forward (issue 17), fp32: x is N x (G d) (Rows with D = G d); group g's columns
// [g d, (g + 1) d) are searched against codebooks[g] (Ks[g] x d, row-major, contiguous fp32), all
// groups in one call. Writes indices[g * N + n], sqerr[g * N + n] (the exact error, ForwardArgs'
// rule per group) and, when zq.ptr is set, the chosen codes into zq's N x (G d) view. counts (may
// be null): how many rows chose each code, group after group (group g's K_g counts start at
// Ks[0] + ... + Ks[g - 1]), as ForwardArgs' counts per group.
struct GroupedArgs {
  Rows x;
  int64_t G;
  const float* const* codebooks;
  const int64_t* Ks;
  RowsOut zq;
  int64_t* indices;
  float* sqerr;
  int64_t* counts = nullptr;
};

// Residual VQ backward (issue 17), fp32, every array row-major and contiguous: the stage loop of
// vqkernels.residual._ResidualFn.backward in one call, bit for bit (each stage is cpu_backward on
// that stage's residual, with the codebook sums in cpu_backward's order). For s = 0 .. S - 1, with
// r_0 = x, r_{s+1} = fl(r_s - e_s) (unchanged where row n sits stage s out, indices -1), and the
// weights of those rows taken as 0:
//   grad_x (N x D, may be null) = grad_zq (null: 0) + sum_s 2 g_commit[s][n] (r_s - e_s), added in
//                                 stage order (g_commit may be null);
//   grad_cb[s] (Ks[s] x D, each may be null: not wanted; overwritten) = sum over rows choosing k
//                                 of 2 g_codebook[s][n] (e_k - r_s) (g_codebook may be null: 0).
// Extra memory: the residual (N x D floats) and stage s's row order (N + K_s + 1 integers).
struct ResidualBackwardArgs {
  int64_t N, D, S;
  const float* x;
  const float* const* codebooks;
  const int64_t* Ks;
  const int64_t* indices;   // S x N
  const float* grad_zq;     // N x D or null
  const float* g_codebook;  // S x N or null
  const float* g_commit;    // S x N or null
  float* grad_x;            // N x D or null
  float* const* grad_cb;    // S entries, each Ks[s] x D or null
  // Cosine residual VQ (ResidualArgs::cosine): stage s searched u_s = r_s / max(fl(||r_s||),
  // 1e-12) (the forward's unit rows, bit for bit), so its codebook gradient is taken at u_s, and
  // its commitment term reaches z through the normalisation: for g_u = 2 g_commit[s] (u_s - e_s),
  //   grad_x += (g_u - u_s p) / max(||r_s||, 1e-12),  p = fl(sum_d u_s[d] g_u[d]) in float64, d
  // order (p = 0 where ||r_s|| <= 1e-12), each operation rounded once (no fused multiply-add).
  bool cosine = false;
};

// Grouped VQ backward (issue 17): x, grad_zq and grad_x are N x (G d) views in `dtype` (grad_zq
// and grad_x: ptr may be null); group g's columns [g d, (g + 1) d) go with codebooks[g] (Ks[g] x
// d, contiguous, `dtype`) and indices[g * N + n]. Exactly G calls of cpu_backward, one per
// group's column views, bit for bit (for any thread count), in one call. The weights are in the
// accumulation dtype (fp32 for 16-bit, else dtype), row n of group g at g_codebook[n * gcb_sn +
// g * gcb_sg] (g_commit likewise; either may be null); grad_cb[g] (Ks[g] x d, accumulation
// dtype) may be null where codebook g needs no gradient.
struct GroupedBackwardArgs {
  DType dtype;
  Rows x;
  int64_t G;
  const void* const* codebooks;
  const int64_t* Ks;
  const int64_t* indices;  // G x N
  Rows grad_zq;
  const void* g_codebook;
  int64_t gcb_sn, gcb_sg;
  const void* g_commit;
  int64_t gcm_sn, gcm_sg;
  RowsOut grad_x;
  void* const* grad_cb;  // G entries
};

// Residual VQ codebook statistics (issue 17: the quantizer modules' EMA upkeep), fp32. For each
// stage s: counts[s][k] = the number of rows n with take[s * N + n] and indices[s * N + n] == k,
// and sums[s] (Ks[s] x D) the sum of those rows' stage inputs -- r_s, or its unit row
// r_s / max(fl(||r_s||), 1e-12) when cosine (the forward's unit rows, bit for bit) -- added in
// ascending n, one fp32 rounding per addition: torch's index_add_ order, so the same bits as
// zeros(K, D).index_add_(0, k, rows) whatever the thread count. r_0 = x, r_{s+1} = r_s - e_s where
// indices[s * N + n] >= 0 (the forward's residual, bit for bit). A row with take set must have an
// index >= 0. Either output of a stage may be null (not wanted). grouped: no residual, stage
// (group) s's rows are x's columns [s D, (s + 1) D) of an N x (S D) x (GroupedVectorQuantizer's
// upkeep; not with cosine). Restart candidates (optional, per stage): where cand_n[s] > 0,
// cand[s] (cand_n[s] x D) gets stage s's input rows -- r_s, or its unit row when cosine, the same
// bits as the sums add -- at rows cand_rows[s][j] (each in [0, N)), and zeros where that row is
// not taken.
struct ResidualStatsArgs {
  int64_t N, D, S;
  const float* x;                // N x D, contiguous
  const float* const* codebooks;  // S entries, Ks[s] x D, contiguous
  const int64_t* Ks;
  const int64_t* indices;  // S x N
  const bool* take;        // S x N
  bool cosine;
  float* const* sums;       // S entries, Ks[s] x D or null
  int64_t* const* counts;   // S entries, Ks[s] or null
  bool grouped = false;
  const int64_t* const* cand_rows = nullptr;  // S entries (or null: no candidates)
  const int64_t* cand_n = nullptr;            // S entries
  float* const* cand = nullptr;               // S entries, cand_n[s] x D or null
};

// CPU entry points. num_threads <= 0 means one thread.
void cpu_residual_forward(const ResidualArgs& a, int num_threads);
void cpu_residual_backward(const ResidualBackwardArgs& a, int num_threads);
void cpu_grouped_forward(const GroupedArgs& a, int num_threads);
void cpu_residual_stats(const ResidualStatsArgs& a, int num_threads);
void cpu_forward(const ForwardArgs& a, int num_threads);
void cpu_backward(const BackwardArgs& a, int num_threads);
void cpu_grouped_backward(const GroupedBackwardArgs& a, int num_threads);
// The CPU search kernels a large search (K >= 128) will use: "avx512bf16", "avx512", "avx2",
// "neon" (aarch64; "neon_dot" only when forced) or "scalar" -- the best this CPU runs, or the one the VQK_CPU_ISA environment variable forces
// (small codebooks use "avx512" where "avx512bf16" would be picked). Throws if the forced one
// can't run here.
const char* cpu_isa();
// Threads of the CPU kernels. By default their own pool (csrc/cpu/thread_pool.cpp). After
// cpu_use_openmp(path, fall_back) with the path of an OpenMP runtime already loaded in the
// process (libgomp, or one exporting its GOMP_parallel: torch's), every parallel region runs on
// that runtime's threads instead; in a child after fork() the own pool again. With fall_back, a
// region whose team came late (a loaded machine) sends the next ones to the own pool for a while
// (50 ms, doubling while it recurs, up to 2 s). Returns whether the runtime was found (null or
// "": back to the own pool, returns false). cpu_pool(): "own", "own (falling back)" or that path.
bool cpu_use_openmp(const char* path, bool fall_back);
const char* cpu_pool();
// Rows the CPU forward has searched again exactly (no proof from the fast pass) since the module
// loaded, over all calls and threads: for tests and benchmarks.
int64_t cpu_exact_rows();
// Rows a reduced-precision first pass (avx512bf16, avx2_i16, neon_dot) handed to the fp32 search (it could not
// prove them), counted the same way.
int64_t cpu_set_aside_rows();
// Rows the neon_dot first pass settled by an fp32 check of its few candidate codes (its direct int8
// proof failed), counted the same way (rows that check could not settle count as set aside).
int64_t cpu_rechecked_rows();
// Rows the int8 tier (avx2_i8, avx512_vnni_i8) proved and finished itself (the rest went to the
// int16 pass), counted the same way.
int64_t cpu_int8_rows();

#ifdef VQK_WITH_CUDA
// CUDA entry points: all pointers are device pointers, work is queued on `stream`
// (a cudaStream_t passed as an integer). Errors throw std::runtime_error with CUDA's message.
void cuda_forward(const ForwardArgs& a, std::uintptr_t stream);
void cuda_backward(const BackwardArgs& a, std::uintptr_t stream);
// Workspace bytes the CUDA calls need for these sizes (the caller allocates them). The forward's
// depends only on the sizes and on the codebook pointer's alignment, and touches no device; the
// deterministic backward's includes CUB's sort storage, which is asked of the current device.
int64_t cuda_forward_workspace_bytes(DType dtype, int64_t N, int64_t K, int64_t D,
                                     std::uintptr_t codebook);
int64_t cuda_backward_workspace_bytes(DType dtype, int64_t N, int64_t K, int64_t D,
                                      bool deterministic);
#endif

}  // namespace vqk
