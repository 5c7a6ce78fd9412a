// Peak multiply-add throughput of one core, for reading the CPU kernels' rates against (issue 16).
//
//     g++ -O2 -mavx2 -mfma benchmarks/fma_probe.cpp -o /tmp/fma_probe && /tmp/fma_probe
//
// Three loops of independent accumulator chains (12, enough to cover latency x pipes), timed with
// the thread's CPU clock (CLOCK_THREAD_CPUTIME_ID: a busy neighbour on a shared machine steals wall
// time, not this thread's CPU time):
//   fp32   vfmadd231ps ymm: 8 multiply-adds (16 flop) per instruction;
//   int16  vpmaddwd + vpaddd ymm, as the avx2_i16 search's inner loop: 16 multiply-adds per pair;
//   mixed  half of each, to show whether the two kinds issue on separate pipes.
// Each reports GMAC/s (10^9 multiply-adds per second; GFLOP/s = 2x) as the best of 5 runs.
#include <immintrin.h>

#include <cstdio>
#include <ctime>

namespace {

double now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// The asm statement keeps the compiler from hoisting the loop-invariant product out of the loop.
__attribute__((noinline)) float fp32_loop(long n, __m256 a, __m256 b) {
  __m256 c[12];
  for (int i = 0; i < 12; ++i) c[i] = _mm256_set1_ps((float)i);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) c[i] = _mm256_fmadd_ps(a, b, c[i]);
    __asm__ volatile("" : "+x"(a));
  }
  __m256 s = c[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, c[i]);
  return _mm256_cvtss_f32(s);
}

__attribute__((noinline)) int int16_loop(long n, __m256i a, __m256i b) {
  __m256i c[12];
  for (int i = 0; i < 12; ++i) c[i] = _mm256_set1_epi32(i);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) c[i] = _mm256_add_epi32(c[i], _mm256_madd_epi16(a, b));
    __asm__ volatile("" : "+x"(a));
  }
  __m256i s = c[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_epi32(s, c[i]);
  return _mm256_extract_epi32(s, 0);
}

__attribute__((noinline)) float mixed_loop(long n, __m256i a, __m256i b, __m256 x, __m256 y) {
  __m256i c[6];
  __m256 f[6];
  for (int i = 0; i < 6; ++i) {
    c[i] = _mm256_set1_epi32(i);
    f[i] = _mm256_set1_ps((float)i);
  }
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      c[i] = _mm256_add_epi32(c[i], _mm256_madd_epi16(a, b));
      f[i] = _mm256_fmadd_ps(x, y, f[i]);
    }
    __asm__ volatile("" : "+x"(a), "+x"(x));
  }
  __m256i s = c[0];
  __m256 g = f[0];
  for (int i = 1; i < 6; ++i) {
    s = _mm256_add_epi32(s, c[i]);
    g = _mm256_add_ps(g, f[i]);
  }
  return _mm256_cvtss_f32(g) + (float)_mm256_extract_epi32(s, 0);
}

}  // namespace

int main() {
  const long n = 20000000;
  double best[3] = {0, 0, 0};
  volatile float sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double t = now();
    sink = sink + fp32_loop(n, _mm256_set1_ps(1.0000001f), _mm256_set1_ps(0.9999f));
    double r = n * 12.0 * 8 / (now() - t) / 1e9;
    best[0] = r > best[0] ? r : best[0];
    t = now();
    sink = sink + (float)int16_loop(n, _mm256_set1_epi16(3), _mm256_set1_epi16(5));
    r = n * 12.0 * 16 / (now() - t) / 1e9;
    best[1] = r > best[1] ? r : best[1];
    t = now();
    sink = sink + mixed_loop(n, _mm256_set1_epi16(3), _mm256_set1_epi16(5), _mm256_set1_ps(1.0f),
                             _mm256_set1_ps(0.999f));
    r = n * 6.0 * (16 + 8) / (now() - t) / 1e9;
    best[2] = r > best[2] ? r : best[2];
  }
  std::printf("one core, best of 5 (thread CPU clock):\n");
  std::printf("  fp32 FMA (vfmadd231ps ymm):      %6.1f GMAC/s = %6.1f GFLOP/s\n", best[0], 2 * best[0]);
  std::printf("  int16 vpmaddwd + vpaddd (ymm):    %6.1f GMAC/s = %6.1f GOP/s\n", best[1], 2 * best[1]);
  std::printf("  mixed (half each):                %6.1f GMAC/s\n", best[2]);
  return 0;
}
