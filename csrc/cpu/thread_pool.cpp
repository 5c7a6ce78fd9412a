// A small persistent worker pool for the CPU kernels.
//
// Why not OpenMP: torch ships its own OpenMP runtime; linking a second one into this module gives
// two pools fighting for the same cores. Why not a thread per call: starting a thread costs tens of
// microseconds, as much as a whole small search. Workers are started once, the caller takes part as
// thread 0, and a worker spins briefly after each job (back-to-back calls, e.g. a training step,
// find it awake) before it sleeps on a condition variable, so an idle pool costs no CPU.
//
// A worker that has not started its part by the time the caller has finished its own is not
// waited for: the caller revokes the job (every job hands out its work dynamically, so by then
// nothing is left for that worker to do). Without this, a caller whose worker sat in the run
// queue behind another process, or behind torch's own OpenMP threads still spinning after the
// previous torch op, waited for the scheduler with all the work already done. Measured on this
// project's 2-vCPU VM with a busy process on one core (nearest_code 4096 x 512 x 64, medians of
// 150 calls, two runs): two threads 7.0 / 7.4 ms before, 4.4 / 4.5 ms after; one thread 3.5 / 4.6.
//
// Sharing torch's OpenMP threads (the default under torch, see vqkernels/native.py): after every
// parallel torch op, torch's OpenMP workers keep spinning for milliseconds (libgomp's default wait
// policy), so a call that follows a torch op, as every quantizer call in a training step does,
// finds the other cores busy with spinning threads and this pool's workers wait for the
// scheduler (or are revoked, leaving the caller alone). Running the parallel region on torch's own
// OpenMP runtime instead hands the work to those very threads, already awake. No second runtime
// is linked: the module calls GOMP_parallel in the runtime torch already loaded, found by path
// (dlopen with RTLD_NOLOAD: a runtime not yet in the process is never loaded). Measured on this
// project's 2-vCPU Ice Lake VM: see use_openmp_runtime's note in vqk.h. Not after fork() (the
// child uses this pool), and not in builds that never call use_openmp_runtime (the native
// driver, TSan).
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cpu_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_PAUSE() _mm_pause()
#else
#define VQK_PAUSE() std::this_thread::yield()
#endif

namespace vqk {
namespace cpu {
namespace {

enum : int { kFree = 0, kPosted = 1, kTaken = 2 };

// How long an idle worker keeps polling before it sleeps: long enough to bridge the gap between
// the pack and search phases of one call and between back-to-back calls, short enough not to steal
// a core from torch's own threads for long.
constexpr auto kSpin = std::chrono::microseconds(100);

struct alignas(64) Slot {
  std::atomic<uint64_t> seq{0};  // bumped (under `m`) for every job given to this worker
  // kPosted when a job waits for this worker; the worker takes it (kPosted -> kTaken) or the
  // caller revokes it (kPosted -> kFree) once its own share is done: exactly one of the two
  // compare-exchanges succeeds, and fn / ctx are read only by a worker that took the job.
  std::atomic<int> state{0};
  void (*fn)(void*, int) = nullptr;
  void* ctx = nullptr;
  std::mutex m;
  std::condition_variable cv;
};

struct Pool {
  std::mutex call_mu;                 // one parallel call at a time
  std::vector<Slot*> slots;           // slots[i] belongs to worker tid i + 1
  alignas(64) std::atomic<int> done{0};

  void grow(int workers) {
    while ((int)slots.size() < workers) {
      Slot* s = new Slot;
      const int tid = (int)slots.size() + 1;
      slots.push_back(s);
      std::thread([this, s, tid] { loop(s, tid); }).detach();
    }
  }

  void loop(Slot* s, int tid) {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      bool ready = false;
      for (int spins = 0;; ++spins) {
        if (s->seq.load(std::memory_order_acquire) != seen) { ready = true; break; }
        VQK_PAUSE();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() > until) break;
      }
      if (!ready) {
        std::unique_lock<std::mutex> lk(s->m);
        s->cv.wait(lk, [&] { return s->seq.load(std::memory_order_acquire) != seen; });
      }
      seen = s->seq.load(std::memory_order_acquire);
      int posted = kPosted;
      if (!s->state.compare_exchange_strong(posted, kTaken, std::memory_order_acq_rel))
        continue;  // revoked: the caller finished without this worker
      s->fn(s->ctx, tid);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

// After fork() only the forking thread exists in the child: forget the parent's workers (their
// memory is leaked on purpose; their locks may be held) and start afresh on first use.
void reset_after_fork() { g_pool = nullptr; }

// The OpenMP runtime in use, if any: GOMP_parallel(fn, data, num_threads, flags) and
// omp_get_thread_num, from the process that registered them.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadNum = int (*)();
struct OmpRuntime {
  GompParallel parallel;
  OmpThreadNum thread_num;
  pid_t pid;
  bool fall_back;  // the own pool for a while after a team thread came late (see run_parallel)
  std::string path;
  // Tests only: VQK_DEBUG_OMP_LATE_US=n (read when the runtime is registered) makes every team
  // thread but the caller start n microseconds late, as on a loaded machine.
  int64_t debug_late_us;
};
std::atomic<const OmpRuntime*> g_omp{nullptr};

using Clock = std::chrono::steady_clock;
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// Falling back: until g_own_until (steady-clock ns) parallel regions take the own pool; each late
// team doubles the next period (50 ms up to 2 s), a team on time resets it.
constexpr int64_t kLateNs = 1000000, kFirstBackoffNs = 50000000, kMaxBackoffNs = 2000000000;
std::atomic<int64_t> g_own_until{0}, g_backoff_ns{kFirstBackoffNs};

struct OmpCall {
  void (*fn)(void*, int);
  void* ctx;
  OmpThreadNum thread_num;
  int64_t late_us;
  int64_t caller_done_ns;
};
void omp_body(void* p) {
  OmpCall& c = *static_cast<OmpCall*>(p);
  const int tid = c.thread_num();
  if (tid != 0 && c.late_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(c.late_us));
  c.fn(c.ctx, tid);
  if (tid == 0) c.caller_done_ns = now_ns();
}

// run_parallel on the OpenMP team; false if it should take the own pool instead (falling back).
// A team thread that has not started by the time the caller finishes its share is still waited
// for (the region's closing barrier), unlike the own pool's revocable jobs: on a machine whose
// other cores are busy with other processes that costs a scheduler wait (measured up to 2x a
// call's time, benchmarks/results/threads-icelake-busy.md). So, with fall_back set, a region
// whose closing wait exceeded both 1 ms and a quarter of the caller's own share sends the next
// regions to the own pool for a while.
bool run_on_openmp(const OmpRuntime& omp, int nthreads, void (*fn)(void*, int), void* ctx) {
  if (omp.fall_back && now_ns() < g_own_until.load(std::memory_order_relaxed)) return false;
  OmpCall call{fn, ctx, omp.thread_num, omp.debug_late_us, 0};
  const int64_t t0 = now_ns();
  omp.parallel(omp_body, &call, (unsigned)nthreads, 0);
  if (omp.fall_back) {
    const int64_t t1 = now_ns(), wait = t1 - call.caller_done_ns;
    if (wait > kLateNs && 4 * wait > call.caller_done_ns - t0) {
      const int64_t b = g_backoff_ns.load(std::memory_order_relaxed);
      g_own_until.store(t1 + b, std::memory_order_relaxed);
      g_backoff_ns.store(std::min(2 * b, kMaxBackoffNs), std::memory_order_relaxed);
    } else {
      g_backoff_ns.store(kFirstBackoffNs, std::memory_order_relaxed);
    }
  }
  return true;
}

}  // namespace

#if defined(__x86_64__) || defined(_M_X64)
IeeeDenormals::IeeeDenormals() {
  const unsigned csr = _mm_getcsr();
  saved_ = csr;
  const unsigned want = csr & ~0x8040u;  // FTZ (bit 15) and DAZ (bit 6) off
  if (want != csr) {
    _mm_setcsr(want);
    changed_ = true;
  }
}
IeeeDenormals::~IeeeDenormals() {
  if (changed_) _mm_setcsr((unsigned)saved_);
}
#elif defined(__aarch64__)
IeeeDenormals::IeeeDenormals() {
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  saved_ = fpcr;
  // FZ (bit 24), FZ16 (bit 19), FIZ (bit 0, FEAT_AFP; RES0 without it, so clearing it is harmless)
  const uint64_t want = fpcr & ~((uint64_t(1) << 24) | (uint64_t(1) << 19) | uint64_t(1));
  if (want != fpcr) {
    __asm__ __volatile__("msr fpcr, %0" : : "r"(want));
    changed_ = true;
  }
}
IeeeDenormals::~IeeeDenormals() {
  if (changed_) __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
}
#else
IeeeDenormals::IeeeDenormals() {}
IeeeDenormals::~IeeeDenormals() {}
#endif

namespace {
// Every participant of a parallel region runs fn with gradual underflow (IeeeDenormals): pool
// workers and OpenMP team threads keep whatever mode they were created with or last set.
struct Guarded {
  void (*fn)(void*, int);
  void* ctx;
};
void run_guarded(void* p, int tid) {
  IeeeDenormals ieee;
  const Guarded& g = *static_cast<const Guarded*>(p);
  g.fn(g.ctx, tid);
}
}  // namespace

void run_parallel(int nthreads, void (*fn)(void* ctx, int tid), void* ctx) {
  if (nthreads <= 1) {
    IeeeDenormals ieee;
    fn(ctx, 0);
    return;
  }
  Guarded guarded{fn, ctx};
  fn = run_guarded;
  ctx = &guarded;
  const OmpRuntime* omp = g_omp.load(std::memory_order_acquire);
  // Every thread of an OpenMP team runs fn with its OpenMP thread number (the team may be smaller
  // than asked for: fn hands out its work dynamically, so any team finishes it).
  if (omp && omp->pid == getpid() && run_on_openmp(*omp, nthreads, fn, ctx)) return;
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, reset_after_fork); });
  static std::mutex create_mu;
  Pool* pool;
  {
    std::lock_guard<std::mutex> lk(create_mu);
    if (!g_pool) g_pool = new Pool;  // never destroyed: workers may outlive static destructors
    pool = g_pool;
  }
  std::lock_guard<std::mutex> call(pool->call_mu);
  pool->grow(nthreads - 1);
  pool->done.store(0, std::memory_order_relaxed);
  for (int i = 0; i < nthreads - 1; ++i) {
    Slot* s = pool->slots[i];
    {
      std::lock_guard<std::mutex> lk(s->m);
      s->fn = fn;
      s->ctx = ctx;
      s->state.store(kPosted, std::memory_order_release);
      s->seq.fetch_add(1, std::memory_order_release);
    }
    s->cv.notify_one();
  }
  fn(ctx, 0);
  // Jobs hand out work dynamically, so by now every piece has been claimed: revoke the parts no
  // worker has taken yet, and wait only for the workers that did take theirs (they are finishing
  // their last piece). Yield while waiting: on a loaded machine a worker may be waiting for this
  // very core.
  int taken = 0;
  for (int i = 0; i < nthreads - 1; ++i) {
    int posted = kPosted;
    if (!pool->slots[i]->state.compare_exchange_strong(posted, kFree, std::memory_order_acq_rel))
      ++taken;
  }
  for (int spins = 0; pool->done.load(std::memory_order_acquire) < taken; ++spins) {
    if (spins < 4096) VQK_PAUSE();
    else std::this_thread::yield();
  }
}

}  // namespace cpu

bool cpu_use_openmp(const char* path, bool fall_back) {
  if (!path || !*path) {
    cpu::g_omp.store(nullptr, std::memory_order_release);
    return false;
  }
  void* h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);  // only a runtime already in the process
  if (!h) return false;
  auto par = reinterpret_cast<cpu::GompParallel>(dlsym(h, "GOMP_parallel"));
  auto num = reinterpret_cast<cpu::OmpThreadNum>(dlsym(h, "omp_get_thread_num"));
  if (!par || !num) {
    dlclose(h);
    return false;
  }
  const char* late = std::getenv("VQK_DEBUG_OMP_LATE_US");
  const int64_t late_us = late ? std::max<int64_t>(0, std::atoll(late)) : 0;
  cpu::g_own_until.store(0, std::memory_order_relaxed);
  cpu::g_backoff_ns.store(cpu::kFirstBackoffNs, std::memory_order_relaxed);
  // Never freed (nor dlclosed): a concurrent call may still be using the previous one, and
  // cpu_pool's answer stays valid.
  cpu::g_omp.store(new cpu::OmpRuntime{par, num, getpid(), fall_back, path, late_us}, std::memory_order_release);
  return true;
}

const char* cpu_pool() {
  const cpu::OmpRuntime* omp = cpu::g_omp.load(std::memory_order_acquire);
  if (!omp || omp->pid != getpid()) return "own";
  if (omp->fall_back && cpu::now_ns() < cpu::g_own_until.load(std::memory_order_relaxed))
    return "own (falling back)";
  return omp->path.c_str();
}

}  // namespace vqk
