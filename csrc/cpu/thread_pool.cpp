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
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
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

}  // namespace

void run_parallel(int nthreads, void (*fn)(void* ctx, int tid), void* ctx) {
  if (nthreads <= 1) {
    fn(ctx, 0);
    return;
  }
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
}  // namespace vqk
