// The rows a reduced-precision first pass sets aside, and their hand-over to the exact fp32 search
// of search_impl.h. Shared by the three first passes: the int16 pass of avx2_i16 and avx512_i16
// (search_i16_common.h, which avx2_i8 reuses), neon_dot's int8 pass (search_neon_dot.cpp) and the
// bf16 pass of avx512bf16 (search_avx512bf16.cpp).
//
// A first pass proves most rows' nearest codes from cheaper dot products. A row it cannot prove is
// copied into this thread's tile of rows set aside (set_aside); when MR have gathered, or when the
// thread has no more tiles (flush_set_aside), that tile is searched by search_block<E>, the fp32
// build's own search, proof and exact re-search, which treats each of those rows exactly as the
// fp32 build would. Every row's answer depends on that row alone, so which rows go which way
// changes the speed only, never the output. A thread that sets aside too many of its first rows
// does plain fp32 tiles for the rest of the call (fp32_only_after, with each pass's own break-even
// fraction and its reasoning at the call).
//
// Include after search_impl.h (MR, Scratch, tile_floats, search_block, run_exact), in the unit's
// anonymous namespace's reach.
#pragma once

#include <cstdint>

namespace vqk {
namespace {

// Per-thread scratch: the generic search's [Exact][xt][et][xe] (search_impl.h), then
// [Pending][xp (rows set aside, packed like xt)][xb (the first pass's own packing of the tile)].
struct Pending {
  int64_t count;
  int64_t rowno[MR];
  int64_t seen, deferred;  // rows this thread has searched in the first pass, and set aside, this call
  bool fp32_only;          // too many set aside: plain fp32 tiles for the rest of the call
};
constexpr int64_t kHeaderFloats = (sizeof(Pending) + 63) / 64 * 16;

// xb's floats for a pass that packs pairs of elements (int16 or bf16) per 32-bit word.
[[maybe_unused]] int64_t pair_floats(int64_t D) { return ((D + 1) / 2 * MR + 15) / 16 * 16; }
// The scratch floats per thread with `packed` floats for xb.
int64_t set_aside_scratch_floats(int64_t D, int64_t packed) {
  return scratch_floats(D) + kHeaderFloats + tile_floats(D) + packed;
}

struct Areas {
  Scratch base;
  Pending* pend;
  float *xt, *et, *xp;
  uint32_t* xb;
  explicit Areas(float* s, int64_t D)
      : base(s, D), pend(reinterpret_cast<Pending*>(s + scratch_floats(D))), xt(base.xt),
        et(base.et), xp(s + scratch_floats(D) + kHeaderFloats),
        xb(reinterpret_cast<uint32_t*>(xp + tile_floats(D))) {}
};

// The rows set aside so far: searched again in fp32, as one tile (the unused lanes zero, rowno -1).
template <class E>
void run_pending(const cpu::FwdJob& job, const Areas& a) {
  const int64_t c = a.pend->count;
  if (c == 0) return;
  __atomic_fetch_add(&cpu::g_set_aside_rows, c, __ATOMIC_RELAXED);
  for (int64_t r = c; r < MR; ++r) {
    a.pend->rowno[r] = -1;
    for (int64_t d = 0; d < job.D; ++d) a.xp[d * MR + r] = 0.0f;
  }
  search_block<E>(job, a.pend->rowno, a.xp, a.base);
  a.pend->count = 0;
}

// Lane r of the packed tile xt (a.xt unless given), which the first pass could not prove: copied to the rows set
// aside and taken out of this tile (rowno[r] = -1: finish_tile skips it); a full tile of them is
// searched at once.
template <class E>
void set_aside(const cpu::FwdJob& job, const Areas& a, const float* xt, int64_t* rowno, int r) {
  Pending& p = *a.pend;
  for (int64_t d = 0; d < job.D; ++d) a.xp[d * MR + p.count] = xt[d * MR + r];
  p.rowno[p.count++] = rowno[r];
  ++p.deferred;
  rowno[r] = -1;
  if (p.count == MR) run_pending<E>(job, a);
}
template <class E>
void set_aside(const cpu::FwdJob& job, const Areas& a, int64_t* rowno, int r) {
  set_aside<E>(job, a, a.xt, rowno, r);
}

// After each tile: plain fp32 tiles for the rest of the call once more than 1/den of at least
// 4 MR rows seen were set aside (den from the pass's break-even, given at each call).
inline void fp32_only_after(Pending& p, int64_t den) {
  if (p.seen >= 4 * MR && den * p.deferred > p.seen) p.fp32_only = true;
}

// Called once by each thread after its last tile: the rows still set aside, then the fp32
// search's own exact re-search of what it could not prove.
void flush_set_aside(const cpu::FwdJob& job, float* scratch) {
  const Areas a(scratch, job.D);
  switch (job.dtype) {
    case DType::f16: run_pending<EF16>(job, a); return run_exact<EF16>(job, a.base);
    case DType::bf16: run_pending<EBF16>(job, a); return run_exact<EBF16>(job, a.base);
    default: run_pending<EF32>(job, a); return run_exact<EF32>(job, a.base);
  }
}

}  // namespace
}  // namespace vqk
