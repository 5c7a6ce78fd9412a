// Multiply-add throughput of one core, and of the CPU kernels' inner-loop shapes (issue 16).
//
//     g++ -O2 benchmarks/fma_probe.cpp -o /tmp/fma_probe && /tmp/fma_probe
//
// Every loop is inline asm (x86-64 AT&T syntax, AVX2 + FMA), so what runs is exactly what is
// named. (The first version of this probe used intrinsics, and GCC computed the loop-invariant
// vpmaddwd once per iteration: its "int16 peak" timed 12 vpaddd and one vpmaddwd, and its "mixed"
// loop likewise. Its 55.0 and 72.3 GMAC/s figures were void.) Each reports GMAC/s (10^9
// multiply-adds per second; GFLOP/s = 2x) as the best of 5 runs timed with the thread's CPU clock
// (CLOCK_THREAD_CPUTIME_ID: a busy neighbour on a shared machine steals wall time, not this
// thread's CPU time).
//
// Part 3 (AVX-512 CPUs only): the 512-bit fp32 FMA, int16 vpmaddwd + vpaddd, VNNI vpdpwssd and
// vdpbf16ps pipes.
// Part 1, pipes: 12 independent accumulator chains (enough to cover latency x pipes), registers only.
//   fp32      vfmadd231ps ymm: 8 multiply-adds per instruction;
//   int16     vpmaddwd + vpaddd ymm (vpmaddwd cannot accumulate): 16 multiply-adds per pair;
//   and mixes of the two, plus vpmaddwd alone and FMA + vpmaddwd without the adds, which show
//   which pipes the instructions share.
// Part 2, the kernels' inner loops (search_impl.h's avx2 micro-kernel, search_avx2_i16.cpp's, and
// candidate mixed int16 + fp32 shapes): the same instructions with the loads and broadcasts one
// step of the kernel does (from L1, as in the kernels, whose row tile is reread for every panel).
// Both parts also hold the int8 (vpmaddubsw) shapes an int8 first pass would use, in the same
// 24-row tiles (issue 16, fourth look; benchmarks/results/cpu-avx2-i16-profile.md): a multiply-add
// there is still one x_d * e_kd product, so their GMAC/s compare directly with int16's.
#include <cstdio>
#include <cstdlib>
#include <ctime>

namespace {

double now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Register-only instructions: sources ymm14, ymm15; accumulators ymm0-11; products ymm12/13.
#define FMA(a) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #a "\n\t"
#define MUL(a) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #a "\n\t"
#define I16(a, t) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #t "\n\tvpaddd %%ymm" #t ", %%ymm" #a ", %%ymm" #a "\n\t"
// Kernel-step instructions: %1 = the row tile, %2 = the code panel.
#define LDX(off, r) "vmovaps " #off "(%1), %%ymm" #r "\n\t"            // fp32 row vector
#define BSS(off) "vbroadcastss " #off "(%2), %%ymm15\n\t"              // fp32 code value
#define BD(off) "vpbroadcastd " #off "(%2), %%ymm14\n\t"               // int16 code pair
#define FMAR(x, a) "vfmadd231ps %%ymm" #x ", %%ymm15, %%ymm" #a "\n\t"  // row x times code
#define I16M(off, a) "vpmaddwd " #off "(%1), %%ymm14, %%ymm15\n\tvpaddd %%ymm15, %%ymm" #a ", %%ymm" #a "\n\t"

// One probe: `pre` once, then `body` n times (registers and memory clobbered as the kernels do).
#define LOOPP(name, pre, body)                                                                    \
  __attribute__((noinline)) void name(long n, const void* x, const void* b) {                    \
    __asm__ volatile("vpxor %%xmm14, %%xmm14, %%xmm14\n\tvpxor %%xmm15, %%xmm15, %%xmm15\n\t" pre \
                     "1:\n\t" body "dec %0\n\tjnz 1b"                                              \
                     : "+r"(n)                                                                     \
                     : "r"(x), "r"(b)                                                              \
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",    \
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc",        \
                       "memory");                                                                  \
  }
#define LOOP(name, body) LOOPP(name, "", body)

// Part 1.
LOOP(fp32, FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7) FMA(8) FMA(9) FMA(10) FMA(11))
LOOP(int16, I16(0, 12) I16(1, 13) I16(2, 12) I16(3, 13) I16(4, 12) I16(5, 13) I16(6, 12) I16(7, 13)
                I16(8, 12) I16(9, 13) I16(10, 12) I16(11, 13))
LOOP(madd_only, MUL(0) MUL(1) MUL(2) MUL(3) MUL(4) MUL(5) MUL(6) MUL(7) MUL(8) MUL(9) MUL(10) MUL(11))
LOOP(fma8_madd4, FMA(0) FMA(1) MUL(8) FMA(2) FMA(3) MUL(9) FMA(4) FMA(5) MUL(10) FMA(6) FMA(7) MUL(11))
LOOP(mix_6_6, I16(0, 12) FMA(6) I16(1, 13) FMA(7) I16(2, 12) FMA(8) I16(3, 13) FMA(9) I16(4, 12)
                  FMA(10) I16(5, 13) FMA(11))
LOOP(mix_4_8, I16(0, 12) FMA(4) FMA(5) I16(1, 13) FMA(6) FMA(7) I16(2, 12) FMA(8) FMA(9) I16(3, 13)
                  FMA(10) FMA(11))
LOOP(mix_8_4, I16(0, 12) I16(1, 13) FMA(8) I16(2, 12) I16(3, 13) FMA(9) I16(4, 12) I16(5, 13)
                  FMA(10) I16(6, 12) I16(7, 13) FMA(11))

// Part 2, one step of each kernel (rows x codes; the int16 steps cover 2 dimensions).
// avx2: 3 x 8 rows x 4 codes, one dimension: 3 row loads, 4 broadcasts, 12 FMAs.
LOOP(k_fp32_3x4, LDX(0, 12) LDX(32, 13) LDX(64, 14)
                     BSS(0) FMAR(12, 0) FMAR(13, 1) FMAR(14, 2) BSS(4) FMAR(12, 3) FMAR(13, 4) FMAR(14, 5)
                     BSS(8) FMAR(12, 6) FMAR(13, 7) FMAR(14, 8) BSS(12) FMAR(12, 9) FMAR(13, 10) FMAR(14, 11))
// avx2_i16: 3 x 8 rows x 4 codes, a dimension pair: the rows as vpmaddwd memory operands.
LOOP(k_i16_3x4, BD(0) I16M(0, 0) I16M(32, 1) I16M(64, 2) BD(4) I16M(0, 3) I16M(32, 4) I16M(64, 5)
                    BD(8) I16M(0, 6) I16M(32, 7) I16M(64, 8) BD(12) I16M(0, 9) I16M(32, 10) I16M(64, 11))
// Mixed, a dimension pair: NI codes in int16 (rows as memory operands), NF codes in fp32 (rows
// loaded into registers for both dimensions; FMA with a memory operand measured slower).
// 3 x 8 rows x (3 int16 + 1 fp32): 9 vpmaddwd, 6 FMAs.
LOOP(k_mix_3x_3i1f, BD(0) I16M(0, 0) I16M(32, 1) I16M(64, 2) BD(4) I16M(0, 3) I16M(32, 4) I16M(64, 5)
                        BD(8) I16M(0, 6) I16M(32, 7) I16M(64, 8)
                        LDX(96, 12) LDX(128, 13) LDX(160, 14) BSS(16) FMAR(12, 9) FMAR(13, 10) FMAR(14, 11)
                        LDX(192, 12) LDX(224, 13) LDX(256, 14) BSS(20) FMAR(12, 9) FMAR(13, 10) FMAR(14, 11))
// 3 x 8 rows x (2 int16 + 2 fp32): 6 vpmaddwd, 12 FMAs.
LOOP(k_mix_3x_2i2f, BD(0) I16M(0, 0) I16M(32, 1) I16M(64, 2) BD(4) I16M(0, 3) I16M(32, 4) I16M(64, 5)
                        LDX(96, 12) LDX(128, 13) LDX(160, 14)
                        BSS(8) FMAR(12, 6) FMAR(13, 7) FMAR(14, 8) BSS(12) FMAR(12, 9) FMAR(13, 10) FMAR(14, 11)
                        LDX(192, 12) LDX(224, 13) LDX(256, 14)
                        BSS(16) FMAR(12, 6) FMAR(13, 7) FMAR(14, 8) BSS(20) FMAR(12, 9) FMAR(13, 10) FMAR(14, 11))
// 2 x 8 rows x (4 int16 + 2 fp32): 8 vpmaddwd, 8 FMAs.
LOOP(k_mix_2x_4i2f, BD(0) I16M(0, 0) I16M(32, 1) BD(4) I16M(0, 2) I16M(32, 3) BD(8) I16M(0, 4) I16M(32, 5)
                        BD(12) I16M(0, 6) I16M(32, 7)
                        LDX(64, 12) LDX(96, 13) BSS(16) FMAR(12, 8) FMAR(13, 9) BSS(20) FMAR(12, 10) FMAR(13, 11)
                        LDX(128, 12) LDX(160, 13) BSS(24) FMAR(12, 8) FMAR(13, 9) BSS(28) FMAR(12, 10) FMAR(13, 11))

// Other int16 tile shapes (issue 16, third look): the same 12 accumulators with fewer loads per
// vpmaddwd. Two row vectors in registers and the third as a memory operand (10 loads per 12
// vpmaddwd instead of 16); 16 rows x 6 codes with both row vectors in registers (8 loads); and
// the 24 x 4 step unrolled over two dimension pairs. Under load (±8% run to run) none was clearly
// faster than the kernel's own shape.
#define I16R(x, a) "vpmaddwd %%ymm" #x ", %%ymm14, %%ymm15\n\tvpaddd %%ymm15, %%ymm" #a ", %%ymm" #a "\n\t"
#define LDI(off, r) "vmovdqa " #off "(%1), %%ymm" #r "\n\t"
LOOP(k_i16_3x4_r2, LDI(0, 12) LDI(32, 13)
                       BD(0) I16R(12, 0) I16R(13, 1) I16M(64, 2) BD(4) I16R(12, 3) I16R(13, 4) I16M(64, 5)
                       BD(8) I16R(12, 6) I16R(13, 7) I16M(64, 8) BD(12) I16R(12, 9) I16R(13, 10) I16M(64, 11))
LOOP(k_i16_2x6, LDI(0, 12) LDI(32, 13)
                    BD(0) I16R(12, 0) I16R(13, 1) BD(4) I16R(12, 2) I16R(13, 3) BD(8) I16R(12, 4) I16R(13, 5)
                    BD(12) I16R(12, 6) I16R(13, 7) BD(16) I16R(12, 8) I16R(13, 9) BD(20) I16R(12, 10) I16R(13, 11))
LOOP(k_i16_3x4_x2, BD(0) I16M(0, 0) I16M(32, 1) I16M(64, 2) BD(4) I16M(0, 3) I16M(32, 4) I16M(64, 5)
                       BD(8) I16M(0, 6) I16M(32, 7) I16M(64, 8) BD(12) I16M(0, 9) I16M(32, 10) I16M(64, 11)
                       BD(16) I16M(96, 0) I16M(128, 1) I16M(160, 2) BD(20) I16M(96, 3) I16M(128, 4) I16M(160, 5)
                       BD(24) I16M(96, 6) I16M(128, 7) I16M(160, 8) BD(28) I16M(96, 9) I16M(128, 10) I16M(160, 11))

// int8 first-pass shapes (issue 16, fourth look). vpmaddubsw multiplies 32 unsigned bytes (its
// register source; AT&T's middle operand) by 32 signed bytes (the memory operand: the rows, as in
// avx2_i16) and adds neighbours into 16 int16 lanes, saturating; vpmaddwd with a vector of int16 ones
// then sums the int16 pairs into 8 int32 lanes (4 dimensions per lane), and vpaddd accumulates.
// Zen 3 runs integer ops in constant time, so the zero data does not flatter these loops.
//   (a) one vpmaddubsw + vpmaddwd(ones) + vpaddd per row vector x code: 32 multiply-adds, 3 ops.
//       No int16 saturation when 2 max|u| max|s| <= 32767: u in [0,255] with s in [-64,64], or
//       u in [0,127] with s in [-127,127] (2 * 127 * 127 = 32258).
//   (b) two vpmaddubsw (dimensions 0-3 and 4-7 of the lane) added in int16 by vpaddw before one
//       vpmaddwd(ones) + vpaddd: 64 multiply-adds, 5 ops. Needs 4 max|u| max|s| <= 32767, e.g.
//       u in [0,127] with s in [-64,64] (4 * 127 * 64 = 32512); vpaddw then never wraps (vpaddsw
//       would never saturate either: same result, same cost).
// Unsigned side = the code (an offset code q + c: p.(q + c) - c sum(p) is exact in int32, the row
// sum is one more integer per row), signed side = the row: either way round works for the bound.
// Registers: 12 accumulators need (a) bcast + temp + ones = 15; (b) two bcasts + two temps = 16,
// so (b) 24 x 4 takes the ones as a memory operand and (b) 24 x 3 keeps them in a register.
#define ONES "vpcmpeqw %%ymm13, %%ymm13, %%ymm13\n\tvpsrlw $15, %%ymm13, %%ymm13\n\t"  // int16 1s
#define I8A(a, t) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #t "\n\tvpmaddwd %%ymm13, %%ymm" #t ", %%ymm" #t \
                  "\n\tvpaddd %%ymm" #t ", %%ymm" #a ", %%ymm" #a "\n\t"
#define I8B(a) "vpmaddubsw %%ymm14, %%ymm15, %%ymm12\n\tvpmaddubsw %%ymm15, %%ymm14, %%ymm13\n\t"      \
               "vpaddw %%ymm13, %%ymm12, %%ymm12\n\tvpmaddwd 512(%2), %%ymm12, %%ymm12\n\t"             \
               "vpaddd %%ymm12, %%ymm" #a ", %%ymm" #a "\n\t"
#define BDR(off, r) "vpbroadcastd " #off "(%2), %%ymm" #r "\n\t"                 // 4 code bytes
#define I8AM(off, a) "vpmaddubsw " #off "(%1), %%ymm14, %%ymm15\n\tvpmaddwd %%ymm13, %%ymm15, %%ymm15\n\t" \
                     "vpaddd %%ymm15, %%ymm" #a ", %%ymm" #a "\n\t"
// (b), rows at off (dims 0-3) and off + 96 (dims 4-7), code bytes in ymm12 / ymm13, ones at 512(%2).
#define I8BM(off, off2, a) "vpmaddubsw " #off "(%1), %%ymm12, %%ymm14\n\t"                             \
                           "vpmaddubsw " #off2 "(%1), %%ymm13, %%ymm15\n\t"                            \
                           "vpaddw %%ymm15, %%ymm14, %%ymm14\n\tvpmaddwd 512(%2), %%ymm14, %%ymm14\n\t" \
                           "vpaddd %%ymm14, %%ymm" #a ", %%ymm" #a "\n\t"
// (b) with the ones in ymm13: code bytes in ymm9 / ymm10, temps ymm11 / ymm12 (9 accumulators).
#define I8BR(off, off2, a) "vpmaddubsw " #off "(%1), %%ymm9, %%ymm11\n\t"                              \
                           "vpmaddubsw " #off2 "(%1), %%ymm10, %%ymm12\n\t"                            \
                           "vpaddw %%ymm12, %%ymm11, %%ymm11\n\tvpmaddwd %%ymm13, %%ymm11, %%ymm11\n\t" \
                           "vpaddd %%ymm11, %%ymm" #a ", %%ymm" #a "\n\t"
// Pipes, registers only (ones from 512(%2) in (b)): 12 chains of (a), 12 of (b), vpmaddubsw alone.
LOOPP(int8_a, ONES, I8A(0, 12) I8A(1, 12) I8A(2, 12) I8A(3, 12) I8A(4, 12) I8A(5, 12) I8A(6, 12)
                        I8A(7, 12) I8A(8, 12) I8A(9, 12) I8A(10, 12) I8A(11, 12))
LOOPP(int8_b, ONES, I8B(0) I8B(1) I8B(2) I8B(3) I8B(4) I8B(5) I8B(6) I8B(7) I8B(8) I8B(9) I8B(10) I8B(11))
LOOP(maddubs_only, "vpmaddubsw %%ymm14, %%ymm15, %%ymm0\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm1\n\t"
                   "vpmaddubsw %%ymm14, %%ymm15, %%ymm2\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm3\n\t"
                   "vpmaddubsw %%ymm14, %%ymm15, %%ymm4\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm5\n\t"
                   "vpmaddubsw %%ymm14, %%ymm15, %%ymm6\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm7\n\t"
                   "vpmaddubsw %%ymm14, %%ymm15, %%ymm8\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm9\n\t"
                   "vpmaddubsw %%ymm14, %%ymm15, %%ymm10\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm11\n\t")
// Kernel steps. (a) 24 rows x 4 codes x 4 dimensions: 4 broadcasts, 12 x (vpmaddubsw with the row
// vector as memory operand, vpmaddwd ones, vpaddd).
LOOPP(k_i8a_3x4, ONES, BD(0) I8AM(0, 0) I8AM(32, 1) I8AM(64, 2) BD(4) I8AM(0, 3) I8AM(32, 4) I8AM(64, 5)
                           BD(8) I8AM(0, 6) I8AM(32, 7) I8AM(64, 8) BD(12) I8AM(0, 9) I8AM(32, 10) I8AM(64, 11))
// (b) 24 rows x 4 codes x 8 dimensions, ones from memory: 8 broadcasts, 24 vpmaddubsw, 12 vpaddw,
// 12 vpmaddwd, 12 vpaddd.
LOOPP(k_i8b_3x4, ONES, BDR(0, 12) BDR(4, 13) I8BM(0, 96, 0) I8BM(32, 128, 1) I8BM(64, 160, 2)
                           BDR(8, 12) BDR(12, 13) I8BM(0, 96, 3) I8BM(32, 128, 4) I8BM(64, 160, 5)
                           BDR(16, 12) BDR(20, 13) I8BM(0, 96, 6) I8BM(32, 128, 7) I8BM(64, 160, 8)
                           BDR(24, 12) BDR(28, 13) I8BM(0, 96, 9) I8BM(32, 128, 10) I8BM(64, 160, 11))
// (b) 24 rows x 3 codes x 8 dimensions, ones in a register: 9 accumulators.
LOOPP(k_i8b_3x3, ONES, BDR(0, 9) BDR(4, 10) I8BR(0, 96, 0) I8BR(32, 128, 1) I8BR(64, 160, 2)
                           BDR(8, 9) BDR(12, 10) I8BR(0, 96, 3) I8BR(32, 128, 4) I8BR(64, 160, 5)
                           BDR(16, 9) BDR(20, 10) I8BR(0, 96, 6) I8BR(32, 128, 7) I8BR(64, 160, 8))

struct Case {
  const char* label;
  void (*fn)(long, const void*, const void*);
  double macs;  // multiply-adds per iteration
};

double rate(const Case& c, const void* x, const void* b) {
  const long n = 20000000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t = now();
    c.fn(n, x, b);
    const double r = n * c.macs / (now() - t) / 1e9;
    best = r > best ? r : best;
  }
  return best;
}

}  // namespace

// Part 3, AVX-512 (run only where the CPU has it): the 512-bit forms of the pipes above, and the
// two 2-multiply-adds-per-lane instructions the avx512_vnni_i16 and avx512bf16 paths are built on.
#define Z(op, a) op " %%zmm14, %%zmm15, %%zmm" #a "\n\t"
#define Z12(op) Z(op, 0) Z(op, 1) Z(op, 2) Z(op, 3) Z(op, 4) Z(op, 5) Z(op, 6) Z(op, 7) Z(op, 8) \
  Z(op, 9) Z(op, 10) Z(op, 11)
#define ZI16(a, t) "vpmaddwd %%zmm14, %%zmm15, %%zmm" #t "\n\tvpaddd %%zmm" #t ", %%zmm" #a ", %%zmm" #a "\n\t"
LOOP(z_fp32, Z12("vfmadd231ps"))
LOOP(z_int16, ZI16(0, 12) ZI16(1, 13) ZI16(2, 12) ZI16(3, 13) ZI16(4, 12) ZI16(5, 13) ZI16(6, 12)
                  ZI16(7, 13) ZI16(8, 12) ZI16(9, 13) ZI16(10, 12) ZI16(11, 13))
LOOP(z_vnni, Z12("vpdpwssd"))
LOOP(z_bf16, Z12("vdpbf16ps"))

int main() {
  // The loops read (never write) these; zeros keep the FMAs away from subnormal slow paths.
  void* x = aligned_alloc(64, 4096);
  void* b = aligned_alloc(64, 4096);
  for (int i = 0; i < 1024; ++i) static_cast<int*>(x)[i] = static_cast<int*>(b)[i] = 0;
  for (int i = 128; i < 136; ++i) static_cast<int*>(b)[i] = 0x00010001;  // int16 ones at 512(b)
  const Case pipes[] = {
      {"fp32 vfmadd231ps (12)", fp32, 12 * 8},
      {"int16 vpmaddwd + vpaddd (12)", int16, 12 * 16},
      {"vpmaddwd alone (12, no add)", madd_only, 12 * 16},
      {"8 FMA + 4 vpmaddwd (no add)", fma8_madd4, 8 * 8 + 4 * 16},
      {"mixed 6 int16 + 6 FMA", mix_6_6, 6 * 16 + 6 * 8},
      {"mixed 4 int16 + 8 FMA", mix_4_8, 4 * 16 + 8 * 8},
      {"mixed 8 int16 + 4 FMA", mix_8_4, 8 * 16 + 4 * 8},
      {"int8 (a) vpmaddubsw+vpmaddwd 1s+vpaddd (12)", int8_a, 12 * 32},
      {"int8 (b) 2 vpmaddubsw+vpaddw+madd 1s+add(12)", int8_b, 12 * 64},
      {"vpmaddubsw alone (12, no add)", maddubs_only, 12 * 32},
  };
  const Case kernels[] = {
      {"avx2 (24 rows x 4 fp32 codes)", k_fp32_3x4, 24 * 4},
      {"avx2_i16 (24 x 4 int16, rows in memory)", k_i16_3x4, 24 * 4 * 2},
      {"avx2_i16 shape, 2 row vectors in registers", k_i16_3x4_r2, 24 * 4 * 2},
      {"int16 16 x 6, rows in registers", k_i16_2x6, 16 * 6 * 2},
      {"avx2_i16 shape, unrolled x2", k_i16_3x4_x2, 24 * 4 * 4},
      {"mixed 24 x (3 int16 + 1 fp32)", k_mix_3x_3i1f, 24 * 4 * 2},
      {"mixed 24 x (2 int16 + 2 fp32)", k_mix_3x_2i2f, 24 * 4 * 2},
      {"mixed 16 x (4 int16 + 2 fp32)", k_mix_2x_4i2f, 16 * 6 * 2},
      {"int8 (a) 24 x 4, 4 dims, rows in memory", k_i8a_3x4, 24 * 4 * 4},
      {"int8 (b) 24 x 4, 8 dims, ones in memory", k_i8b_3x4, 24 * 4 * 8},
      {"int8 (b) 24 x 3, 8 dims, ones in register", k_i8b_3x3, 24 * 3 * 8},
  };
  std::printf("one core, best of 5, thread CPU clock; GMAC/s (GFLOP/s = 2x)\n");
  std::printf("pipes (registers only):\n");
  for (const Case& c : pipes) std::printf("  %-44s %6.1f\n", c.label, rate(c, x, b));
  std::printf("kernel inner-loop steps (with their loads and broadcasts):\n");
  for (const Case& c : kernels) std::printf("  %-44s %6.1f\n", c.label, rate(c, x, b));
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    std::printf("AVX-512 pipes (registers only):\n");
    const Case z[] = {{"fp32 vfmadd231ps zmm (12)", z_fp32, 12 * 16},
                      {"int16 vpmaddwd + vpaddd zmm (12)", z_int16, 12 * 32}};
    for (const Case& c : z) std::printf("  %-44s %6.1f\n", c.label, rate(c, x, b));
    if (__builtin_cpu_supports("avx512vnni")) {
      const Case c = {"int16 vpdpwssd zmm (12, VNNI)", z_vnni, 12 * 32};
      std::printf("  %-44s %6.1f\n", c.label, rate(c, x, b));
    }
    if (__builtin_cpu_supports("avx512bf16")) {
      const Case c = {"bf16 vdpbf16ps zmm (12)", z_bf16, 12 * 32};
      std::printf("  %-44s %6.1f\n", c.label, rate(c, x, b));
    }
  } else {
    std::printf("AVX-512 pipes: not run (this CPU has no AVX-512 F/BW)\n");
  }
  free(x);
  free(b);
  return 0;
}
