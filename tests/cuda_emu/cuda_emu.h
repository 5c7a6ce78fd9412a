// A CPU emulator for the CUDA features vqkernels' kernels use, so that their logic (indexing,
// the pipeline's waits and barriers, fragment layouts, candidate merges, the epilogue) is tested
// on machines without a GPU. It is force-included (g++ -include) before csrc/cuda/*.cu compiled
// as C++ with -DVQK_CUDA_EMULATE; tests/cuda_emu/build.py does that.
//
// What it models:
//  - The threads of a block are fibers (ucontext) run round-robin in one OS thread. A fiber runs
//    until it reaches a barrier (__syncthreads, or the warp exchange behind a shuffle, ldmatrix
//    or mma), so a thread runs as far ahead of the others as the code lets it: a read that no
//    barrier orders after the write it needs sees the wrong data.
//  - cp.async copies land at once (eager) or as late as the waits allow (VQK_EMU_LAZY=1): a
//    missing wait shows up in lazy mode, a copy into a buffer still being read in eager mode.
//  - ldmatrix.x4 and mma.sync.m16n8k16 move data between lanes exactly as the PTX ISA's fragment
//    layouts say (products of 16-bit inputs are exact; the fp32 sum is in k order).
//  - Shared memory starts every block as 0xff bytes (NaN in every float format) and is fenced by
//    a canary; cp.async/ldmatrix addresses are checked to lie in it and be 16-byte aligned.
//  - VQK_EMU_SEED=n (n > 0) replaces round-robin with a seeded adversarial schedule: warps run
//    in a random priority order, each as far ahead of the rest as the barriers allow.
//  - A barrier that some thread never reaches (divergence) aborts with a message.
//  - The device's shared-memory limit per block is VQK_EMU_SMEM_OPTIN bytes (default 232448,
//    an H100), so the tests can force the kernels' paths for smaller devices.
// What it does not model: timing, occupancy, registers, memory coalescing, or hardware rounding
// details of the tensor cores; those need a GPU.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

using std::fma;  // fp32 fma for float arguments, as on the device
using std::isfinite;
using std::max;
using std::min;

// ------------------------------------------------------------------------------------------------
// 16-bit float storage types and their conversions (round to nearest even).
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }

inline float emu_bits_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t emu_float_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu;
  if (exp == 0) {
    const float f = (float)man * 5.9604644775390625e-08f;  // man * 2^-24, exact
    return sign ? -f : f;
  }
  if (exp == 31) return emu_bits_float(sign | 0x7f800000u | (man << 13));
  return emu_bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t b = emu_float_bits(f), sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{(unsigned short)(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return __half{(unsigned short)(sign | 0x7c00u)};  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 after rounding
    const float m = std::nearbyint(emu_bits_float(a) * 16777216.0f);
    return __half{(unsigned short)(sign | (uint32_t)m)};
  }
  uint32_t h = ((((a >> 23) - 112u)) << 10) | ((a & 0x7fffffu) >> 13);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return __half{(unsigned short)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 v) { return emu_bits_float((uint32_t)v.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t b = emu_float_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((b >> 16) | 0x40u)};
  b += 0x7fffu + ((b >> 16) & 1u);
  return __nv_bfloat16{(unsigned short)(b >> 16)};
}

// ------------------------------------------------------------------------------------------------
// The runtime API surface the host code uses.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
typedef struct CUstream_st* cudaStream_t;
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

[[noreturn]] inline void fail(const std::string& msg) {
  std::fprintf(stderr, "\nvqkernels CUDA emulator: %s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}
inline void require(bool ok, const char* msg) { if (!ok) fail(msg); }

inline int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : dflt;
}
inline int smem_optin() { return env_int("VQK_EMU_SMEM_OPTIN", 232448); }

inline cudaError_t& last_error() { static cudaError_t e = cudaSuccess; return e; }
inline std::map<const void*, int>& opted_in() { static std::map<const void*, int> m; return m; }

struct Copy { int group; void* dst; const void* src; int bytes; };
enum State { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
  ucontext_t ctx;
  State state = READY;
  unsigned tid = 0;
  int committed = 0;  // cp.async groups committed
  std::vector<Copy> pending;
};

struct Ctx {
  uint3 tid{0, 0, 0}, bid{0, 0, 0};
  dim3 bdim, gdim;
};

struct Block {
  std::vector<Fiber> fibers;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int block_arrived = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> xch;         // one exchange slot per thread (shuffles)
  std::vector<const void*> ptrs;     // ldmatrix row addresses
  std::vector<uint32_t> frag;        // mma fragments: 10 words per thread (a0-3, b0-1, c0-3)
  bool lazy = false;
};

inline Ctx& ctx() { static Ctx c; return c; }
inline Block*& block() { static Block* b = nullptr; return b; }
inline Fiber*& fiber() { static Fiber* f = nullptr; return f; }
inline ucontext_t& sched() { static ucontext_t c; return c; }
inline std::function<void()>*& body() { static std::function<void()>* b = nullptr; return b; }

inline void yield_to_scheduler() { swapcontext(&fiber()->ctx, &sched()); }

inline void syncthreads() {
  Block* b = block();
  fiber()->state = WAIT_BLOCK;
  if (++b->block_arrived == (int)b->fibers.size()) {
    b->block_arrived = 0;
    for (auto& f : b->fibers) if (f.state == WAIT_BLOCK) f.state = READY;
  }
  yield_to_scheduler();
}

inline void syncwarp() {
  Block* b = block();
  Fiber* me = fiber();
  const unsigned w = me->tid / 32;
  me->state = WAIT_WARP;
  if (++b->warp_arrived[w] == 32) {
    b->warp_arrived[w] = 0;
    for (unsigned t = w * 32; t < w * 32 + 32; ++t)
      if (b->fibers[t].state == WAIT_WARP) b->fibers[t].state = READY;
  }
  yield_to_scheduler();
}

inline void land(const Copy& c) {
  std::memcpy(c.dst, c.src, (size_t)c.bytes);
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, (size_t)(16 - c.bytes));
}

inline void land_groups_before(int limit) {  // every pending copy of a group < limit
  auto& p = fiber()->pending;
  for (const Copy& c : p) if (c.group < limit) land(c);
  p.erase(std::remove_if(p.begin(), p.end(), [&](const Copy& c) { return c.group < limit; }), p.end());
}

inline void check_smem(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  Block* b = block();
  if (c < b->smem || c + bytes > b->smem + b->smem_bytes) fail(std::string(what) + ": address outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(p) % 16) fail(std::string(what) + ": shared address not 16-byte aligned");
}

inline unsigned lane() { return fiber()->tid & 31u; }

inline void fiber_entry() {
  (*body())();
  fiber()->state = DONE;
}  // returns to uc_link: the scheduler

constexpr size_t kStack = 256 * 1024;
constexpr size_t kCanary = 64;

template <class... P, class... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 blk, size_t smem, cudaStream_t, Args... args) {
  const size_t nthreads = (size_t)blk.x * blk.y * blk.z;
  if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  require(blk.y == 1 && blk.z == 1 && grid.z == 1 && nthreads % 32 == 0,
          "the emulator runs 1-D blocks of whole warps, 2-D grids");
  auto it = opted_in().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = std::max<size_t>(48 * 1024, it == opted_in().end() ? 0 : (size_t)it->second);
  if (smem > allowed || smem > (size_t)smem_optin()) {
    last_error() = cudaErrorInvalidValue;
    return;
  }

  Block b;
  b.fibers.resize(nthreads);
  b.warp_arrived.assign(nthreads / 32, 0);
  b.xch.assign(nthreads, 0);
  b.ptrs.assign(nthreads, nullptr);
  b.frag.assign(nthreads * 10, 0);
  b.lazy = env_int("VQK_EMU_LAZY", 0) != 0;
  std::vector<unsigned char> smem_store(smem + kCanary + 16);
  auto* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_store.data()) + 15) & ~uintptr_t(15));
  b.smem = base;
  b.smem_bytes = smem;

  const size_t stack_total = nthreads * kStack;
  void* stacks = mmap(nullptr, stack_total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  require(stacks != MAP_FAILED, "could not map fiber stacks");
  for (size_t t = 0; t < nthreads; ++t)  // a guard page under every stack: overflow faults
    mprotect(static_cast<char*>(stacks) + t * kStack, 4096, PROT_NONE);

  // VQK_EMU_SEED=n (n > 0): adversarial schedules instead of round-robin (see below).
  const uint64_t seed = (uint64_t)env_int("VQK_EMU_SEED", 0);
  uint64_t rng = seed;
  auto next = [&]() {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (size_t)(rng >> 33);
  };
  std::vector<Fiber*> ready;
  std::vector<unsigned> prio(nthreads / 32);
  std::function<void()> fn = [&]() { kernel(args...); };
  body() = &fn;
  block() = &b;
  ctx().bdim = blk;
  ctx().gdim = grid;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      ctx().bid = uint3{bx, by, 0};
      std::memset(base, 0xff, smem);
      std::memset(base + smem, 0xa5, kCanary);
      b.block_arrived = 0;
      std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0);
      std::iota(prio.begin(), prio.end(), 0u);
      for (size_t i = prio.size(); i > 1; --i) std::swap(prio[i - 1], prio[next() % i]);
      for (size_t t = 0; t < nthreads; ++t) {
        Fiber& f = b.fibers[t];
        f.state = READY;
        f.tid = (unsigned)t;
        f.committed = 0;
        f.pending.clear();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = static_cast<char*>(stacks) + t * kStack + 4096;
        f.ctx.uc_stack.ss_size = kStack - 4096;
        f.ctx.uc_link = &sched();
        makecontext(&f.ctx, fiber_entry, 0);
      }
      auto resume = [&](Fiber& f) {
        fiber() = &f;
        ctx().tid = uint3{f.tid, 0, 0};
        swapcontext(&sched(), &f.ctx);
      };
      for (;;) {
        bool alive = false, ran = false;
        if (seed) {
          // Warps in a random priority order, fixed for the block: the first warp that can run
          // does, so one warp gets as far ahead of the others as the barriers allow (a write
          // that must wait for other warps' reads shows up); lanes in a random order.
          for (auto& f : b.fibers) alive |= f.state != DONE;
          for (unsigned w : prio) {
            ready.clear();
            for (unsigned t = w * 32; t < w * 32 + 32; ++t)
              if (b.fibers[t].state == READY) ready.push_back(&b.fibers[t]);
            if (ready.empty()) continue;
            resume(*ready[next() % ready.size()]);
            ran = true;
            break;
          }
        } else {
          for (auto& f : b.fibers) {
            if (f.state == DONE) continue;
            alive = true;
            if (f.state != READY) continue;
            resume(f);
            ran = true;
          }
        }
        if (!alive) break;
        if (!ran) fail("deadlock: some thread waits at a barrier the others never reach");
      }
      for (auto& f : b.fibers)
        if (!f.pending.empty()) fail("a thread ended with cp.async copies never waited for");
      for (size_t i = 0; i < kCanary; ++i)
        if (base[smem + i] != 0xa5) fail("shared memory written past the launch's dynamic size");
    }
  }
  block() = nullptr;
  fiber() = nullptr;
  body() = nullptr;
  munmap(stacks, stack_total);
}

}  // namespace emu

#define threadIdx (::emu::ctx().tid)
#define blockIdx (::emu::ctx().bid)
#define blockDim (::emu::ctx().bdim)
#define gridDim (::emu::ctx().gdim)
#define VQK_DYNAMIC_SMEM(name) unsigned char* name = ::emu::block()->smem
#define VQK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)

inline void __syncthreads() { emu::syncthreads(); }

template <class T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  emu::require(mask == 0xffffffffu, "shuffle with a partial mask");
  emu::Block* b = emu::block();
  const unsigned t = emu::fiber()->tid, w0 = t & ~31u;
  std::memcpy(&b->xch[t], &v, sizeof(T));
  emu::syncwarp();
  T r;
  std::memcpy(&r, &b->xch[w0 + ((t & 31u) ^ (unsigned)lane_mask)], sizeof(T));
  emu::syncwarp();
  return r;
}

// One OS thread runs every fiber and fibers only switch at barriers: plain adds are atomic here.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p; *p = old + v; return old;
}
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
inline double atomicAdd(double* p, double v) { const double old = *p; *p = old + v; return old; }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p; if (v > old) *p = v; return old;
}
inline long long __double_as_longlong(double v) { long long b; std::memcpy(&b, &v, 8); return b; }
inline double __longlong_as_double(long long b) { double v; std::memcpy(&v, &b, 8); return v; }

// Test hooks of the exact re-search (issue 13), read by the kernels only under VQK_CUDA_EMULATE:
// the rows the fast pass flagged are counted here (defined in cpu_stubs.cpp, read by the tests
// through ctypes), and VQK_DEBUG_APPROX_ONLY=1 (the CPU kernel's switch too) finishes flagged
// rows with the fast pass's best, to show what the approximate pass alone would return.
extern "C" unsigned long long vqk_emu_flagged_rows;
namespace emu {
inline bool no_research() { return env_int("VQK_DEBUG_APPROX_ONLY", 0) != 0; }
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  if (a != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = emu::smem_optin();
  return cudaSuccess;
}
template <class F> cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute a, int v) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || v > emu::smem_optin())
    return cudaErrorInvalidValue;
  emu::opted_in()[reinterpret_cast<const void*>(kernel)] = v;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------
// The PTX wrappers of csrc/cuda/common.cuh.
namespace vqk {
namespace cu {

inline void cp_async16(void* dst, const void* src, int bytes) {
  emu::check_smem(dst, 16, "cp.async destination");
  emu::require(bytes >= 0 && bytes <= 16, "cp.async source size outside [0, 16]");
  emu::require(reinterpret_cast<uintptr_t>(src) % 16 == 0, "cp.async global source not 16-byte aligned");
  emu::Fiber* f = emu::fiber();
  const emu::Copy c{f->committed, dst, src, bytes};
  if (emu::block()->lazy) f->pending.push_back(c); else emu::land(c);
}
inline void cp_async_commit() { ++emu::fiber()->committed; }
template <int N> inline void cp_async_wait() { emu::land_groups_before(emu::fiber()->committed - N); }
inline void cp_async_wait_all() { emu::land_groups_before(1 << 30); }

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane l
// receives, in r[i], elements 2(l%4) and 2(l%4)+1 of row l/4 of matrix i (low half first).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  emu::check_smem(p, 16, "ldmatrix row");
  emu::Block* b = emu::block();
  const unsigned t = emu::fiber()->tid, w0 = t & ~31u, l = t & 31u;
  b->ptrs[t] = p;
  emu::syncwarp();
  for (int i = 0; i < 4; ++i) {
    const auto* row = static_cast<const uint16_t*>(b->ptrs[w0 + 8 * i + l / 4]);
    r[i] = (uint32_t)row[2 * (l % 4)] | ((uint32_t)row[2 * (l % 4) + 1] << 16);
  }
  emu::syncwarp();
}

inline float emu_elt(__half, uint16_t bits) { return __half2float(__half{bits}); }
inline float emu_elt(__nv_bfloat16, uint16_t bits) { return __bfloat162float(__nv_bfloat16{bits}); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: with g = lane/4 and t = lane%4,
//   A regs: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B regs: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C/D:    c0,c1 = (g, 2t), (g, 2t+1); c2,c3 = (g+8, 2t), (g+8, 2t+1)
template <class S> inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Block* b = emu::block();
  const unsigned t = emu::fiber()->tid, w0 = t & ~31u, l = t & 31u;
  uint32_t* mine = &b->frag[t * 10];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  for (int i = 0; i < 4; ++i) mine[6 + i] = emu_float_bits(d[i]);
  emu::syncwarp();
  auto half_of = [](uint32_t w, int hi) { return (uint16_t)(hi ? w >> 16 : w & 0xffffu); };
  auto A = [&](int r, int k) {
    const uint32_t* f = &b->frag[(w0 + (r % 8) * 4 + (k % 8) / 2) * 10];
    return emu_elt(S{}, half_of(f[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2));
  };
  auto B = [&](int k, int n) {
    const uint32_t* f = &b->frag[(w0 + n * 4 + (k % 8) / 2) * 10];
    return emu_elt(S{}, half_of(f[4 + (k >= 8 ? 1 : 0)], k % 2));
  };
  auto C = [&](int r, int n) {
    const uint32_t* f = &b->frag[(w0 + (r % 8) * 4 + n / 2) * 10];
    return emu_bits_float(f[6 + (r >= 8 ? 2 : 0) + n % 2]);
  };
  float out[4];
  for (int j = 0; j < 4; ++j) {
    const int r = (int)(l / 4) + (j >= 2 ? 8 : 0), n = 2 * (int)(l % 4) + (j & 1);
    float s = C(r, n);
    for (int k = 0; k < 16; ++k) s = std::fma(A(r, k), B(k, n), s);
    out[j] = s;
  }
  emu::syncwarp();
  for (int j = 0; j < 4; ++j) d[j] = out[j];
}

}  // namespace cu
}  // namespace vqk

// ------------------------------------------------------------------------------------------------
// cub::DeviceRadixSort::SortPairs: a stable sort on key bits [begin_bit, end_bit), with the same
// two-call workspace protocol (the emulator keeps its permutation in the temporary storage).
namespace cub {
struct DeviceRadixSort {
  template <class K, class V, class NumItems>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* kin, K* kout, const V* vin,
                               V* vout, NumItems n, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t = nullptr) {
    const size_t need = 256 + (size_t)n * sizeof(uint32_t);
    if (!temp) { temp_bytes = need; return cudaSuccess; }
    if (temp_bytes < need || n < 0 || begin_bit < 0 || end_bit > (int)sizeof(K) * 8 || begin_bit > end_bit)
      return cudaErrorInvalidValue;
    auto* order = static_cast<uint32_t*>(temp);
    std::iota(order, order + n, 0u);
    const int width = end_bit - begin_bit;
    const uint64_t mask = width >= 64 ? ~uint64_t(0) : ((uint64_t(1) << width) - 1);
    auto bits = [&](uint32_t i) { return ((uint64_t)kin[i] >> begin_bit) & mask; };
    std::stable_sort(order, order + n, [&](uint32_t x, uint32_t y) { return bits(x) < bits(y); });
    std::vector<K> ks(n);
    std::vector<V> vs(n);
    for (NumItems i = 0; i < n; ++i) { ks[i] = kin[order[i]]; vs[i] = vin[order[i]]; }
    std::copy(ks.begin(), ks.end(), kout);
    std::copy(vs.begin(), vs.end(), vout);
    return cudaSuccess;
  }
};
}  // namespace cub
